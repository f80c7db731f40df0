// Builds the messages pgwarden writes itself (errors, notices, synthesized completions,
// and the frontend messages it injects), appending to a caller-owned byte string so a
// batch of messages goes out in one write.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pgwarden::wire {

// Appends one typed message: the type byte and a length placeholder on construction,
// the length patched in by finish() (or the destructor).
class MessageBuilder {
public:
    MessageBuilder(std::string& out, char type);
    ~MessageBuilder() { finish(); }
    MessageBuilder(const MessageBuilder&) = delete;
    MessageBuilder& operator=(const MessageBuilder&) = delete;

    MessageBuilder& int8(std::uint8_t v);
    MessageBuilder& int16(std::int16_t v);
    MessageBuilder& int32(std::int32_t v);
    MessageBuilder& cstring(std::string_view s);  // NULs inside s are dropped
    MessageBuilder& bytes(std::string_view s);
    void finish();

private:
    std::string& out_;
    std::size_t start_;
    bool finished_ = false;
};

// What an ErrorResponse or NoticeResponse says.
struct Diagnostic {
    std::string severity = "ERROR";  // ERROR, FATAL, WARNING, NOTICE, ...
    std::string sqlstate;
    std::string message;
    std::string detail;   // optional
    std::string hint;     // optional
};

// ---- backend messages pgwarden synthesizes ---------------------------------------------
void append_error_response(std::string& out, const Diagnostic& d);
void append_notice_response(std::string& out, const Diagnostic& d);
// Re-encodes parsed error fields, e.g. after replacing some of them.
void append_error_fields(std::string& out, char type,
                         const std::vector<std::pair<char, std::string_view>>& fields);
void append_command_complete(std::string& out, std::string_view tag);
void append_ready_for_query(std::string& out, char status);
void append_empty_query_response(std::string& out);
void append_parse_complete(std::string& out);
void append_bind_complete(std::string& out);
void append_close_complete(std::string& out);
void append_no_data(std::string& out);
void append_parameter_status(std::string& out, std::string_view name, std::string_view value);
void append_backend_key_data(std::string& out, std::int32_t pid, std::int32_t secret);
void append_authentication(std::string& out, std::int32_t code, std::string_view data = {});
// AuthenticationSASL with the given mechanism list.
void append_authentication_sasl(std::string& out, const std::vector<std::string_view>& mechanisms);

// ---- frontend messages (injected by pgwarden, and used by tests) ------------------------
void append_query(std::string& out, std::string_view sql);
void append_parse(std::string& out, std::string_view statement, std::string_view sql,
                  const std::vector<std::int32_t>& param_types = {});
// Text-format parameters, all non-NULL; results in text format.
void append_bind(std::string& out, std::string_view portal, std::string_view statement,
                 const std::vector<std::string>& params = {});
// As append_bind, with std::nullopt written as a NULL parameter (length -1).
void append_bind_nullable(std::string& out, std::string_view portal, std::string_view statement,
                          const std::vector<std::optional<std::string>>& params);
void append_execute(std::string& out, std::string_view portal, std::int32_t max_rows = 0);
void append_describe(std::string& out, char target, std::string_view name);
void append_close(std::string& out, char target, std::string_view name);
void append_sync(std::string& out);
void append_flush(std::string& out);
void append_terminate(std::string& out);

// ---- startup-phase packets ---------------------------------------------------------------
void append_startup_message(std::string& out,
                            const std::vector<std::pair<std::string, std::string>>& params,
                            std::uint32_t protocol = 3u << 16);
void append_ssl_request(std::string& out);
void append_gssenc_request(std::string& out);
void append_cancel_request(std::string& out, std::int32_t pid, std::int32_t secret);

}  // namespace pgwarden::wire
