// libFuzzer target: the input is a stream of server messages. Each framed message goes
// through the parser for its type; accepted ones must re-encode exactly.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tests/fuzz/fuzz_check.hpp"
#include "wire/builder.hpp"
#include "wire/frame.hpp"
#include "wire/message_types.hpp"
#include "wire/messages.hpp"

namespace {

using namespace pgwarden::wire;
using pgwarden::wire::fuzz::inside;
using pgwarden::wire::fuzz::require;

template <typename Build>
void require_rebuilds(std::string_view message, Build build) {
    std::string rebuilt;
    build(rebuilt);
    require(rebuilt == message);
}

void check_authentication(std::string_view message, std::string_view body) {
    const auto authentication = parse_authentication(body);
    if (!authentication) return;
    require_rebuilds(message, [&](std::string& o) {
        append_authentication(o, authentication->code, authentication->data);
    });
    if (authentication->code != auth::kSasl) return;
    // parse_authentication vetted the list, so it must parse, and rebuild identically.
    const auto mechanisms = parse_sasl_mechanisms(authentication->data);
    require(mechanisms.has_value());
    for (const std::string_view mechanism : *mechanisms) {
        require(!mechanism.empty() && inside(mechanism, body));
    }
    require_rebuilds(message, [&](std::string& o) { append_authentication_sasl(o, *mechanisms); });
}

void check_command_complete(std::string_view message, std::string_view body) {
    const auto complete = parse_command_complete(body);
    if (!complete) return;
    require_rebuilds(message, [&](std::string& o) { append_command_complete(o, complete->tag); });
    if (const auto rows = command_tag_rows(complete->tag)) {
        // The count is the tag's last word, written without leading zeros or not.
        const std::string digits = std::to_string(*rows);
        const std::size_t last_space = complete->tag.rfind(' ');
        require(last_space != std::string_view::npos);
        const std::string_view word = complete->tag.substr(last_space + 1);
        require(word.size() >= digits.size() && word.substr(word.size() - digits.size()) == digits);
    }
}

void parse_backend(char type, std::string_view message, std::string_view body) {
    switch (type) {
        case be::kAuthentication: check_authentication(message, body); break;
        case be::kBackendKeyData:
            if (const auto key = parse_backend_key_data(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    append_backend_key_data(o, key->process_id, key->secret_key);
                });
            }
            break;
        case be::kParameterStatus:
            if (const auto status = parse_parameter_status(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    append_parameter_status(o, status->name, status->value);
                });
            }
            break;
        case be::kReadyForQuery:
            if (const auto ready = parse_ready_for_query(body)) {
                require_rebuilds(message,
                                 [&](std::string& o) { append_ready_for_query(o, ready->status); });
            }
            break;
        case be::kCommandComplete: check_command_complete(message, body); break;
        case be::kErrorResponse:
        case be::kNoticeResponse:
            if (const auto error = parse_error_fields(body)) {
                require_rebuilds(
                    message, [&](std::string& o) { append_error_fields(o, type, error->fields); });
                require(error->severity() == error->get('V') || error->get('V').empty());
            }
            break;
        case be::kNotificationResponse:
            if (const auto notification = parse_notification(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    MessageBuilder(o, type)
                        .int32(notification->process_id)
                        .cstring(notification->channel)
                        .cstring(notification->payload);
                });
            }
            break;
        case be::kCopyInResponse:
        case be::kCopyOutResponse:
        case be::kCopyBothResponse:
            if (const auto copy = parse_copy_response(body)) {
                require(copy->column_count >= 0);
                require(body.size() == 3 + std::size_t(copy->column_count) * 2);
            }
            break;
        case be::kRowDescription:
            if (const auto description = parse_row_description(body)) {
                require(description->field_count >= 0);
                require(body.size() >= 2 + std::size_t(description->field_count) * 19);
            }
            break;
        case be::kParseComplete:
            if (is_empty_body(body)) require_rebuilds(message, append_parse_complete);
            break;
        case be::kBindComplete:
            if (is_empty_body(body)) require_rebuilds(message, append_bind_complete);
            break;
        case be::kCloseComplete:
            if (is_empty_body(body)) require_rebuilds(message, append_close_complete);
            break;
        case be::kNoData:
            if (is_empty_body(body)) require_rebuilds(message, append_no_data);
            break;
        case be::kEmptyQueryResponse:
            if (is_empty_body(body)) require_rebuilds(message, append_empty_query_response);
            break;
        default:  // DataRow, CopyData and the rest are relayed unparsed
            break;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    std::string_view rest(reinterpret_cast<const char*>(data), size);
    FrameHeader header;
    while (read_frame(rest, header) == FrameStatus::kComplete) {
        require(header.length >= 4 && header.total_size() <= rest.size());
        const std::string_view message = rest.substr(0, header.total_size());
        if (is_backend_type(header.type)) {
            parse_backend(header.type, message, message.substr(kHeaderSize));
        }
        rest.remove_prefix(header.total_size());
    }
    return 0;
}
