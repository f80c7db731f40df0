// Typed, non-owning views of the protocol messages pgwarden must read. Each parse_*
// takes a message body (after type byte and length) and returns std::nullopt when the
// body is malformed (truncated, unterminated string, trailing bytes, bad counts).
// Views point into the caller's buffer: they live as long as it does.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pgwarden::wire {

// ---- frontend -------------------------------------------------------------------------

struct Query { std::string_view sql; };
// Parse and Bind counts are unsigned 16-bit on the wire: PostgreSQL reads them with
// pq_getmsgint(msg, 2) and libpq sends up to PQ_QUERY_PARAM_MAX_LIMIT (65535) parameters.
struct Parse {
    std::string_view statement;  // "" = unnamed
    std::string_view sql;
    std::uint16_t param_type_count = 0;
};
struct Bind {
    std::string_view portal;     // "" = unnamed
    std::string_view statement;
    std::uint16_t param_count = 0;
};
struct Execute { std::string_view portal; std::int32_t max_rows = 0; };
struct Describe { char target = 'S'; std::string_view name; };  // 'S' statement, 'P' portal
struct Close { char target = 'S'; std::string_view name; };
struct CopyFail { std::string_view message; };
struct FunctionCall { std::uint32_t function_oid = 0; std::int16_t arg_count = 0; };

std::optional<Query> parse_query(std::string_view body);
std::optional<Parse> parse_parse(std::string_view body);
std::optional<Bind> parse_bind(std::string_view body);
std::optional<Execute> parse_execute(std::string_view body);
// Describe and Close also reject a target other than 'S' or 'P'.
std::optional<Describe> parse_describe(std::string_view body);
std::optional<Close> parse_close(std::string_view body);
std::optional<CopyFail> parse_copy_fail(std::string_view body);
std::optional<FunctionCall> parse_function_call(std::string_view body);
// Sync, Flush, CopyDone and Terminate have empty bodies.
bool is_empty_body(std::string_view body);

// ---- backend --------------------------------------------------------------------------

struct Authentication {
    std::int32_t code = 0;       // wire::auth::k*
    std::string_view data;       // salt, SASL payload, mechanism list...
};
struct BackendKeyData { std::int32_t process_id = 0; std::int32_t secret_key = 0; };
struct ParameterStatus { std::string_view name; std::string_view value; };
struct ReadyForQuery { char status = 'I'; };  // 'I' idle, 'T' in block, 'E' failed block
struct CommandComplete { std::string_view tag; };
struct NotificationResponse { std::int32_t process_id = 0; std::string_view channel, payload; };
struct CopyResponse { std::int8_t format = 0; std::int16_t column_count = 0; };
struct RowDescription { std::int16_t field_count = 0; };

// ErrorResponse and NoticeResponse: a list of (field code, value).
struct ErrorFields {
    std::vector<std::pair<char, std::string_view>> fields;
    std::string_view get(char code) const;  // "" when absent
    std::string_view severity() const { return get('V').empty() ? get('S') : get('V'); }
    std::string_view sqlstate() const { return get('C'); }
    std::string_view message() const { return get('M'); }
};

// Where the code fixes the data's shape it is checked: empty for Ok, cleartext, Kerberos,
// GSS and SSPI; a 4-byte salt for MD5; a well-formed mechanism list for SASL.
std::optional<Authentication> parse_authentication(std::string_view body);
std::optional<BackendKeyData> parse_backend_key_data(std::string_view body);
std::optional<ParameterStatus> parse_parameter_status(std::string_view body);
std::optional<ReadyForQuery> parse_ready_for_query(std::string_view body);
std::optional<CommandComplete> parse_command_complete(std::string_view body);
std::optional<ErrorFields> parse_error_fields(std::string_view body);  // 'E' and 'N'
std::optional<NotificationResponse> parse_notification(std::string_view body);
std::optional<CopyResponse> parse_copy_response(std::string_view body);  // 'G', 'H', 'W'
std::optional<RowDescription> parse_row_description(std::string_view body);

// The SASL mechanisms offered in AuthenticationSASL's data (a list of cstrings ended by
// an empty one), or nullopt when malformed.
std::optional<std::vector<std::string_view>> parse_sasl_mechanisms(std::string_view data);

// The row count at the end of a CommandComplete tag ("INSERT 0 5" -> 5, "UPDATE 3" -> 3,
// "SELECT 2" -> 2, "COPY 10" -> 10), or nullopt for tags without one ("BEGIN").
std::optional<std::uint64_t> command_tag_rows(std::string_view tag);

// ---- startup --------------------------------------------------------------------------

enum class StartupKind { kStartup, kSslRequest, kGssEncRequest, kCancelRequest, kUnsupported };

struct StartupPacket {
    StartupKind kind = StartupKind::kUnsupported;
    std::uint32_t protocol = 0;  // protocol version or request code
    // kStartup: parameters in the order sent (user, database, options, application_name, ...)
    std::vector<std::pair<std::string, std::string>> parameters;
    // kCancelRequest
    std::int32_t process_id = 0;
    std::int32_t secret_key = 0;

    // "" when absent.
    std::string_view parameter(std::string_view name) const;
};

// Parses a whole startup-phase packet including its length word. nullopt when malformed:
// wrong length, unterminated strings, a parameter name without value, duplicate names,
// more than kMaxStartupParameters. A protocol major version other
// than 3 parses as kUnsupported (the caller answers with an error, as PostgreSQL does).
std::optional<StartupPacket> parse_startup_packet(std::string_view packet);

}  // namespace pgwarden::wire
