// libFuzzer target: the input is a stream of client messages after startup. Each framed
// message goes through the parser for its type; accepted ones must re-encode exactly.
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

void parse_frontend(char type, std::string_view message, std::string_view body) {
    switch (type) {
        case fe::kQuery:
            if (const auto query = parse_query(body)) {
                require_rebuilds(message, [&](std::string& o) { append_query(o, query->sql); });
            }
            break;
        case fe::kParse:
            if (const auto parse = parse_parse(body)) {
                require(inside(parse->statement, body) && inside(parse->sql, body));
                require(body.size() == parse->statement.size() + parse->sql.size() + 4 +
                                           std::size_t{parse->param_type_count} * 4);
            }
            break;
        case fe::kBind:
            if (const auto bind = parse_bind(body)) {
                require(inside(bind->portal, body) && inside(bind->statement, body));
                // Each counted parameter takes at least its 4-byte length.
                require(body.size() >= bind->portal.size() + bind->statement.size() + 8 +
                                           std::size_t{bind->param_count} * 4);
            }
            break;
        case fe::kExecute:
            if (const auto execute = parse_execute(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    append_execute(o, execute->portal, execute->max_rows);
                });
            }
            break;
        case fe::kDescribe:
            if (const auto describe = parse_describe(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    append_describe(o, describe->target, describe->name);
                });
            }
            break;
        case fe::kClose:
            if (const auto close = parse_close(body)) {
                require_rebuilds(
                    message, [&](std::string& o) { append_close(o, close->target, close->name); });
            }
            break;
        case fe::kCopyFail:
            if (const auto fail = parse_copy_fail(body)) {
                require_rebuilds(message, [&](std::string& o) {
                    MessageBuilder(o, fe::kCopyFail).cstring(fail->message);
                });
            }
            break;
        case fe::kFunctionCall:
            if (const auto call = parse_function_call(body)) {
                // Oid, format-code count, argument count and result format take 10
                // bytes; each counted argument takes at least its 4-byte length.
                require(call->arg_count >= 0);
                require(body.size() >= 10 + std::size_t(call->arg_count) * 4);
            }
            break;
        case fe::kSync:
            if (is_empty_body(body)) require_rebuilds(message, append_sync);
            break;
        case fe::kFlush:
            if (is_empty_body(body)) require_rebuilds(message, append_flush);
            break;
        case fe::kTerminate:
            if (is_empty_body(body)) require_rebuilds(message, append_terminate);
            break;
        case fe::kCopyDone: require(is_empty_body(body) == body.empty()); break;
        default:  // CopyData and password messages are relayed unparsed
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
        if (is_frontend_type(header.type)) {
            parse_frontend(header.type, message, message.substr(kHeaderSize));
        }
        rest.remove_prefix(header.total_size());
    }
    return 0;
}
