// Encodes the messages pgwarden writes itself. Every function leaves a complete,
// well-formed message in `out`, whatever strings it is given.
#include "wire/builder.hpp"

#include "wire/limits.hpp"
#include "wire/message_types.hpp"

namespace pgwarden::wire {
namespace {

void append_uint32(std::string& out, std::uint32_t value) {
    for (int shift = 24; shift >= 0; shift -= 8) {
        out.push_back(static_cast<char>((value >> shift) & 0xff));
    }
}

void patch_uint32(std::string& out, std::size_t at, std::uint32_t value) {
    for (std::size_t i = 0; i < 4; ++i) {
        out[at + i] = static_cast<char>((value >> (24 - 8 * i)) & 0xff);
    }
}

// The startup phase's packets have no type byte, so they cannot use MessageBuilder.
class UntypedPacket {
public:
    explicit UntypedPacket(std::string& out) : out_(out), start_(out.size()) {
        append_uint32(out_, 0);
    }
    ~UntypedPacket() {
        patch_uint32(out_, start_, static_cast<std::uint32_t>(out_.size() - start_));
    }
    UntypedPacket(const UntypedPacket&) = delete;
    UntypedPacket& operator=(const UntypedPacket&) = delete;

private:
    std::string& out_;
    std::size_t start_;
};

void append_diagnostic(std::string& out, char type, const Diagnostic& diagnostic) {
    MessageBuilder message(out, type);
    // 'S' may be localized by a server; 'V' never is. We are not localized, so both match.
    message.int8('S').cstring(diagnostic.severity);
    message.int8('V').cstring(diagnostic.severity);
    message.int8('C').cstring(diagnostic.sqlstate);
    message.int8('M').cstring(diagnostic.message);
    if (!diagnostic.detail.empty()) message.int8('D').cstring(diagnostic.detail);
    if (!diagnostic.hint.empty()) message.int8('H').cstring(diagnostic.hint);
    message.int8(0);
}

// `value_of` maps a parameter to its text, or std::nullopt for NULL.
template <typename Params, typename ValueOf>
void append_text_bind(std::string& out, std::string_view portal, std::string_view statement,
                      const Params& params, ValueOf value_of) {
    MessageBuilder message(out, fe::kBind);
    message.cstring(portal).cstring(statement);
    message.int16(0);  // no format codes: every parameter is text
    message.int16(static_cast<std::int16_t>(params.size()));
    for (const auto& param : params) {
        const std::optional<std::string_view> value = value_of(param);
        if (!value) {
            message.int32(-1);
            continue;
        }
        message.int32(static_cast<std::int32_t>(value->size())).bytes(*value);
    }
    message.int16(0);  // results in text
}

}  // namespace

MessageBuilder::MessageBuilder(std::string& out, char type) : out_(out) {
    out_.push_back(type);
    start_ = out_.size();
    append_uint32(out_, 0);
}

MessageBuilder& MessageBuilder::int8(std::uint8_t v) {
    out_.push_back(static_cast<char>(v));
    return *this;
}

MessageBuilder& MessageBuilder::int16(std::int16_t v) {
    const auto bits = static_cast<std::uint16_t>(v);
    out_.push_back(static_cast<char>(bits >> 8));
    out_.push_back(static_cast<char>(bits & 0xff));
    return *this;
}

MessageBuilder& MessageBuilder::int32(std::int32_t v) {
    append_uint32(out_, static_cast<std::uint32_t>(v));
    return *this;
}

MessageBuilder& MessageBuilder::cstring(std::string_view s) {
    // An embedded NUL would end the string early and shift every later field.
    for (const char c : s) {
        if (c != '\0') out_.push_back(c);
    }
    out_.push_back('\0');
    return *this;
}

MessageBuilder& MessageBuilder::bytes(std::string_view s) {
    out_.append(s);
    return *this;
}

void MessageBuilder::finish() {
    if (finished_) return;
    finished_ = true;
    // Called from the destructor: never write outside a buffer someone shrank meanwhile.
    if (out_.size() < start_ + 4) return;
    patch_uint32(out_, start_, static_cast<std::uint32_t>(out_.size() - start_));
}

// ---- backend ----------------------------------------------------------------------------

void append_error_response(std::string& out, const Diagnostic& d) {
    append_diagnostic(out, be::kErrorResponse, d);
}

void append_notice_response(std::string& out, const Diagnostic& d) {
    append_diagnostic(out, be::kNoticeResponse, d);
}

void append_error_fields(std::string& out, char type,
                         const std::vector<std::pair<char, std::string_view>>& fields) {
    MessageBuilder message(out, type);
    for (const auto& [code, value] : fields) {
        if (code == '\0') continue;  // would read as the terminator
        message.int8(static_cast<std::uint8_t>(code)).cstring(value);
    }
    message.int8(0);
}

void append_command_complete(std::string& out, std::string_view tag) {
    MessageBuilder(out, be::kCommandComplete).cstring(tag);
}

void append_ready_for_query(std::string& out, char status) {
    MessageBuilder(out, be::kReadyForQuery).int8(static_cast<std::uint8_t>(status));
}

void append_empty_query_response(std::string& out) { MessageBuilder(out, be::kEmptyQueryResponse); }
void append_parse_complete(std::string& out) { MessageBuilder(out, be::kParseComplete); }
void append_bind_complete(std::string& out) { MessageBuilder(out, be::kBindComplete); }
void append_close_complete(std::string& out) { MessageBuilder(out, be::kCloseComplete); }
void append_no_data(std::string& out) { MessageBuilder(out, be::kNoData); }

void append_parameter_status(std::string& out, std::string_view name, std::string_view value) {
    MessageBuilder(out, be::kParameterStatus).cstring(name).cstring(value);
}

void append_backend_key_data(std::string& out, std::int32_t pid, std::int32_t secret) {
    MessageBuilder(out, be::kBackendKeyData).int32(pid).int32(secret);
}

void append_authentication(std::string& out, std::int32_t code, std::string_view data) {
    MessageBuilder(out, be::kAuthentication).int32(code).bytes(data);
}

void append_authentication_sasl(std::string& out, const std::vector<std::string_view>& mechanisms) {
    MessageBuilder message(out, be::kAuthentication);
    message.int32(auth::kSasl);
    for (const std::string_view mechanism : mechanisms) {
        if (mechanism.empty()) continue;  // would end the list early
        message.cstring(mechanism);
    }
    message.int8(0);
}

// ---- frontend ---------------------------------------------------------------------------

void append_query(std::string& out, std::string_view sql) {
    MessageBuilder(out, fe::kQuery).cstring(sql);
}

void append_parse(std::string& out, std::string_view statement, std::string_view sql,
                  const std::vector<std::int32_t>& param_types) {
    MessageBuilder message(out, fe::kParse);
    message.cstring(statement).cstring(sql);
    message.int16(static_cast<std::int16_t>(param_types.size()));
    for (const std::int32_t type_oid : param_types)
        message.int32(type_oid);
}

void append_bind(std::string& out, std::string_view portal, std::string_view statement,
                 const std::vector<std::string>& params) {
    append_text_bind(out, portal, statement, params, [](const std::string& value) {
        return std::optional<std::string_view>(value);
    });
}

void append_bind_nullable(std::string& out, std::string_view portal, std::string_view statement,
                          const std::vector<std::optional<std::string>>& params) {
    append_text_bind(out, portal, statement, params, [](const std::optional<std::string>& value) {
        return value ? std::optional<std::string_view>(*value) : std::nullopt;
    });
}

void append_execute(std::string& out, std::string_view portal, std::int32_t max_rows) {
    MessageBuilder(out, fe::kExecute).cstring(portal).int32(max_rows);
}

void append_describe(std::string& out, char target, std::string_view name) {
    MessageBuilder(out, fe::kDescribe).int8(static_cast<std::uint8_t>(target)).cstring(name);
}

void append_close(std::string& out, char target, std::string_view name) {
    MessageBuilder(out, fe::kClose).int8(static_cast<std::uint8_t>(target)).cstring(name);
}

void append_sync(std::string& out) { MessageBuilder(out, fe::kSync); }
void append_flush(std::string& out) { MessageBuilder(out, fe::kFlush); }
void append_terminate(std::string& out) { MessageBuilder(out, fe::kTerminate); }

// ---- startup ----------------------------------------------------------------------------

void append_startup_message(std::string& out,
                            const std::vector<std::pair<std::string, std::string>>& params,
                            std::uint32_t protocol) {
    UntypedPacket packet(out);
    append_uint32(out, protocol);
    for (const auto& [name, value] : params) {
        // Filter NULs like MessageBuilder::cstring; an empty name would end the list.
        std::size_t written = 0;
        for (const char c : name) {
            if (c != '\0') {
                out.push_back(c);
                ++written;
            }
        }
        if (written == 0) continue;
        out.push_back('\0');
        for (const char c : value) {
            if (c != '\0') out.push_back(c);
        }
        out.push_back('\0');
    }
    out.push_back('\0');
}

void append_ssl_request(std::string& out) {
    UntypedPacket packet(out);
    append_uint32(out, kSslRequestCode);
}

void append_gssenc_request(std::string& out) {
    UntypedPacket packet(out);
    append_uint32(out, kGssEncRequestCode);
}

void append_cancel_request(std::string& out, std::int32_t pid, std::int32_t secret) {
    UntypedPacket packet(out);
    append_uint32(out, kCancelRequestCode);
    append_uint32(out, static_cast<std::uint32_t>(pid));
    append_uint32(out, static_cast<std::uint32_t>(secret));
}

}  // namespace pgwarden::wire
