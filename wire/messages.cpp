// Parsers for the protocol messages pgwarden inspects. Each walks the whole body, so a
// message it accepts is one PostgreSQL would also decode, with nothing left over.
#include "wire/messages.hpp"

#include <algorithm>
#include <array>
#include <charconv>

#include "wire/limits.hpp"
#include "wire/message_types.hpp"
#include "wire/reader.hpp"

namespace pgwarden::wire {
namespace {

// An Int16 count (rejecting negatives) followed by that many Int16 format codes.
bool skip_signed_format_codes(Reader& reader) {
    const std::int16_t count = reader.int16();
    if (count < 0) return false;
    reader.bytes(std::size_t(count) * 2);
    return reader.ok();
}

// Bind's counts, which PostgreSQL reads as unsigned.
bool skip_unsigned_format_codes(Reader& reader) {
    const std::uint16_t count = reader.uint16();
    reader.bytes(std::size_t{count} * 2);
    return reader.ok();
}

// An Int32 length then that many bytes; -1 alone stands for NULL.
bool skip_value(Reader& reader) {
    const std::int32_t length = reader.int32();
    if (length == -1) return reader.ok();
    if (length < 0) return false;
    reader.bytes(static_cast<std::size_t>(length));
    return reader.ok();
}

// Walks a SASL mechanism list without building it, so parse_authentication stays
// allocation-free.
bool is_mechanism_list(std::string_view data) {
    Reader reader(data);
    while (true) {
        const std::string_view mechanism = reader.cstring();
        if (!reader.ok()) return false;
        if (mechanism.empty()) return reader.at_end();
    }
}

template <typename Named>
std::optional<Named> parse_targeted_name(std::string_view body) {
    Reader reader(body);
    Named message;
    message.target = static_cast<char>(reader.byte());
    message.name = reader.cstring();
    if (!reader.done()) return std::nullopt;
    if (message.target != 'S' && message.target != 'P') return std::nullopt;
    return message;
}

std::optional<std::uint64_t> parse_count(std::string_view digits) {
    if (digits.empty() || digits.front() < '0' || digits.front() > '9') return std::nullopt;
    std::uint64_t value = 0;
    const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (error != std::errc{} || end != digits.data() + digits.size()) return std::nullopt;
    return value;
}

}  // namespace

// ---- frontend -------------------------------------------------------------------------

std::optional<Query> parse_query(std::string_view body) {
    Reader reader(body);
    Query query{reader.cstring()};
    if (!reader.done()) return std::nullopt;
    return query;
}

std::optional<Parse> parse_parse(std::string_view body) {
    Reader reader(body);
    Parse parse;
    parse.statement = reader.cstring();
    parse.sql = reader.cstring();
    parse.param_type_count = reader.uint16();
    reader.bytes(std::size_t{parse.param_type_count} * 4);  // type OIDs
    if (!reader.done()) return std::nullopt;
    return parse;
}

// The format-code count is not checked against the parameter count: PostgreSQL answers
// that mismatch with an ordinary ERROR and keeps the session, so it is relayed to it.
std::optional<Bind> parse_bind(std::string_view body) {
    Reader reader(body);
    Bind bind;
    bind.portal = reader.cstring();
    bind.statement = reader.cstring();
    if (!skip_unsigned_format_codes(reader)) return std::nullopt;
    bind.param_count = reader.uint16();
    for (std::size_t i = 0; i < bind.param_count; ++i) {
        if (!skip_value(reader)) return std::nullopt;
    }
    if (!skip_unsigned_format_codes(reader)) return std::nullopt;
    if (!reader.done()) return std::nullopt;
    return bind;
}

std::optional<Execute> parse_execute(std::string_view body) {
    Reader reader(body);
    Execute execute;
    execute.portal = reader.cstring();
    execute.max_rows = reader.int32();
    if (!reader.done()) return std::nullopt;
    return execute;
}

std::optional<Describe> parse_describe(std::string_view body) {
    return parse_targeted_name<Describe>(body);
}

std::optional<Close> parse_close(std::string_view body) { return parse_targeted_name<Close>(body); }

std::optional<CopyFail> parse_copy_fail(std::string_view body) {
    Reader reader(body);
    CopyFail fail{reader.cstring()};
    if (!reader.done()) return std::nullopt;
    return fail;
}

std::optional<FunctionCall> parse_function_call(std::string_view body) {
    Reader reader(body);
    FunctionCall call;
    call.function_oid = reader.uint32();
    if (!skip_signed_format_codes(reader)) return std::nullopt;
    call.arg_count = reader.int16();
    if (call.arg_count < 0) return std::nullopt;
    for (std::int16_t i = 0; i < call.arg_count; ++i) {
        if (!skip_value(reader)) return std::nullopt;
    }
    reader.int16();  // result format code
    if (!reader.done()) return std::nullopt;
    return call;
}

bool is_empty_body(std::string_view body) { return body.empty(); }

// ---- backend --------------------------------------------------------------------------

std::optional<Authentication> parse_authentication(std::string_view body) {
    Reader reader(body);
    Authentication authentication;
    authentication.code = reader.int32();
    authentication.data = reader.rest();
    if (!reader.ok()) return std::nullopt;
    switch (authentication.code) {
        case auth::kOk:
        case auth::kKerberosV5:
        case auth::kCleartextPassword:
        case auth::kGss:
        case auth::kSspi:
            if (!authentication.data.empty()) return std::nullopt;
            break;
        case auth::kMd5Password:
            if (authentication.data.size() != 4) return std::nullopt;
            break;
        case auth::kSasl:
            if (!is_mechanism_list(authentication.data)) return std::nullopt;
            break;
        default:  // continuation payloads and codes we do not know are opaque
            break;
    }
    return authentication;
}

std::optional<BackendKeyData> parse_backend_key_data(std::string_view body) {
    Reader reader(body);
    BackendKeyData key;
    key.process_id = reader.int32();
    key.secret_key = reader.int32();
    if (!reader.done()) return std::nullopt;
    return key;
}

std::optional<ParameterStatus> parse_parameter_status(std::string_view body) {
    Reader reader(body);
    ParameterStatus status;
    status.name = reader.cstring();
    status.value = reader.cstring();
    if (!reader.done()) return std::nullopt;
    return status;
}

std::optional<ReadyForQuery> parse_ready_for_query(std::string_view body) {
    Reader reader(body);
    ReadyForQuery ready{static_cast<char>(reader.byte())};
    if (!reader.done()) return std::nullopt;
    if (ready.status != 'I' && ready.status != 'T' && ready.status != 'E') return std::nullopt;
    return ready;
}

std::optional<CommandComplete> parse_command_complete(std::string_view body) {
    Reader reader(body);
    CommandComplete complete{reader.cstring()};
    if (!reader.done()) return std::nullopt;
    return complete;
}

std::string_view ErrorFields::get(char code) const {
    for (const auto& [field_code, value] : fields) {
        if (field_code == code) return value;
    }
    return {};
}

std::optional<ErrorFields> parse_error_fields(std::string_view body) {
    Reader reader(body);
    ErrorFields error;
    while (true) {
        const std::uint8_t code = reader.byte();
        if (!reader.ok()) return std::nullopt;
        if (code == 0) break;
        const std::string_view value = reader.cstring();
        if (!reader.ok()) return std::nullopt;
        error.fields.emplace_back(static_cast<char>(code), value);
    }
    if (!reader.done()) return std::nullopt;
    return error;
}

std::optional<NotificationResponse> parse_notification(std::string_view body) {
    Reader reader(body);
    NotificationResponse notification;
    notification.process_id = reader.int32();
    notification.channel = reader.cstring();
    notification.payload = reader.cstring();
    if (!reader.done()) return std::nullopt;
    return notification;
}

std::optional<CopyResponse> parse_copy_response(std::string_view body) {
    Reader reader(body);
    CopyResponse response;
    response.format = static_cast<std::int8_t>(reader.byte());
    response.column_count = reader.int16();
    if (response.column_count < 0) return std::nullopt;
    reader.bytes(std::size_t(response.column_count) * 2);  // per-column format codes
    if (!reader.done()) return std::nullopt;
    return response;
}

std::optional<RowDescription> parse_row_description(std::string_view body) {
    // After each field's name: table OID, column number, type OID, type size, type
    // modifier, format code.
    constexpr std::size_t kFieldTailSize = 4 + 2 + 4 + 2 + 4 + 2;
    Reader reader(body);
    RowDescription description;
    description.field_count = reader.int16();
    if (description.field_count < 0) return std::nullopt;
    for (std::int16_t i = 0; i < description.field_count; ++i) {
        reader.cstring();
        reader.bytes(kFieldTailSize);
        if (!reader.ok()) return std::nullopt;
    }
    if (!reader.done()) return std::nullopt;
    return description;
}

std::optional<std::vector<std::string_view>> parse_sasl_mechanisms(std::string_view data) {
    if (!is_mechanism_list(data)) return std::nullopt;
    std::vector<std::string_view> mechanisms;
    Reader reader(data);
    for (std::string_view mechanism = reader.cstring(); !mechanism.empty();
         mechanism = reader.cstring()) {
        mechanisms.push_back(mechanism);
    }
    return mechanisms;
}

std::optional<std::uint64_t> command_tag_rows(std::string_view tag) {
    const std::size_t space = tag.find(' ');
    if (space == std::string_view::npos) return std::nullopt;
    const std::string_view verb = tag.substr(0, space);
    const std::string_view counts = tag.substr(space + 1);
    if (verb == "INSERT") {
        // "INSERT oid rows": the oid is always 0 since PostgreSQL 12 but still present.
        const std::size_t second = counts.find(' ');
        if (second == std::string_view::npos) return std::nullopt;
        if (!parse_count(counts.substr(0, second))) return std::nullopt;
        return parse_count(counts.substr(second + 1));
    }
    static constexpr std::array<std::string_view, 7> kCountedVerbs = {
        "UPDATE", "DELETE", "SELECT", "MOVE", "FETCH", "COPY", "MERGE"};
    if (std::find(kCountedVerbs.begin(), kCountedVerbs.end(), verb) == kCountedVerbs.end()) {
        return std::nullopt;
    }
    return parse_count(counts);
}

// ---- startup --------------------------------------------------------------------------

std::string_view StartupPacket::parameter(std::string_view name) const {
    for (const auto& [key, value] : parameters) {
        if (key == name) return value;
    }
    return {};
}

std::optional<StartupPacket> parse_startup_packet(std::string_view packet) {
    if (packet.size() < kMinStartupPacketLength || packet.size() > kMaxStartupPacketLength) {
        return std::nullopt;
    }
    Reader reader(packet);
    if (reader.uint32() != packet.size()) return std::nullopt;
    StartupPacket startup;
    startup.protocol = reader.uint32();

    // The fixed-size requests, with the exact lengths libpq sends.
    switch (startup.protocol) {
        case kCancelRequestCode:
            startup.kind = StartupKind::kCancelRequest;
            startup.process_id = reader.int32();
            startup.secret_key = reader.int32();
            if (!reader.done()) return std::nullopt;
            return startup;
        case kSslRequestCode:
            startup.kind = StartupKind::kSslRequest;
            if (!reader.done()) return std::nullopt;
            return startup;
        case kGssEncRequestCode:
            startup.kind = StartupKind::kGssEncRequest;
            if (!reader.done()) return std::nullopt;
            return startup;
        default: break;
    }
    // Any 3.x is a startup message: the server answers a newer minor version with
    // NegotiateProtocolVersion rather than refusing it.
    if ((startup.protocol >> 16) != (kProtocolV3 >> 16)) {
        startup.kind = StartupKind::kUnsupported;
        return startup;
    }
    startup.kind = StartupKind::kStartup;

    std::vector<std::string_view> names;
    while (true) {
        const std::string_view name = reader.cstring();
        if (!reader.ok()) return std::nullopt;
        if (name.empty()) break;
        const std::string_view value = reader.cstring();
        if (!reader.ok()) return std::nullopt;
        if (names.size() == kMaxStartupParameters) return std::nullopt;
        names.push_back(name);
        startup.parameters.emplace_back(name, value);
    }
    if (!reader.done()) return std::nullopt;

    std::sort(names.begin(), names.end());
    if (std::adjacent_find(names.begin(), names.end()) != names.end()) return std::nullopt;
    return startup;
}

}  // namespace pgwarden::wire
