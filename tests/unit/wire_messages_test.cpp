// Parsers: every message type round-trips build -> frame -> parse in its direction, and
// truncated, overlong or otherwise malformed bodies are rejected.
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/unit/wire_test_support.hpp"
#include "wire/builder.hpp"
#include "wire/frame.hpp"
#include "wire/message_types.hpp"
#include "wire/messages.hpp"

using namespace pgwarden::wire;
using namespace pgwarden::wire::test;
using namespace std::string_literals;
using namespace std::string_view_literals;

namespace {

enum class Direction { kFrontend, kBackend };

// One encoded message and what its parser must make of it.
struct Sample {
    std::string name;
    Direction direction;
    char type;
    std::string bytes;
    // Did the typed parser accept the body? Empty for types relayed without parsing.
    std::function<bool(std::string_view)> accepts;
    // Does the body decode to what was built?
    std::function<bool(std::string_view)> matches;
    // The body's end is implied by its content, so any truncation or extra byte must be
    // rejected. False for opaque payloads (CopyData, SASL continuation data).
    bool self_delimiting = true;
};

template <typename Parsed>
Sample typed(std::string name, Direction direction, char type, std::string bytes,
             std::optional<Parsed> (*parser)(std::string_view),
             std::function<bool(const Parsed&)> check, bool self_delimiting = true) {
    return Sample{std::move(name),
                  direction,
                  type,
                  std::move(bytes),
                  [parser](std::string_view body) { return parser(body).has_value(); },
                  [parser, check](std::string_view body) {
                      const auto parsed = parser(body);
                      return parsed && check(*parsed);
                  },
                  self_delimiting};
}

Sample empty(std::string name, Direction direction, char type, std::string bytes) {
    return Sample{std::move(name), direction,     type, std::move(bytes),
                  is_empty_body,   is_empty_body, true};
}

// Types the proxy relays without a typed parser: framing must still give back the body.
Sample opaque(std::string name, Direction direction, char type, std::string expected_body) {
    std::string bytes = message(type, expected_body);
    return Sample{std::move(name),
                  direction,
                  type,
                  std::move(bytes),
                  nullptr,
                  [expected_body](std::string_view body) { return body == expected_body; },
                  false};
}

template <typename Build>
std::string built(Build build) {
    std::string out;
    build(out);
    return out;
}

std::string function_call_body() {
    // OID 1299 (now()), one binary format code, two args (one NULL), text result.
    return be32(1299) + be16(1) + be16(1) + be16(2) + be32(3) + "abc" + be32(0xffffffffu) + be16(0);
}

std::vector<Sample> frontend_samples() {
    const auto fe_dir = Direction::kFrontend;
    std::vector<Sample> samples;
    samples.push_back(typed<Query>(
        "Query", fe_dir, fe::kQuery, built([](auto& o) { append_query(o, "SELECT 1; SELECT 2"); }),
        parse_query, [](const Query& q) { return q.sql == "SELECT 1; SELECT 2"; }));
    samples.push_back(typed<Parse>("Parse", fe_dir, fe::kParse, built([](auto& o) {
                                       append_parse(o, "s1", "SELECT $1, $2", {23, 25});
                                   }),
                                   parse_parse, [](const Parse& p) {
                                       return p.statement == "s1" && p.sql == "SELECT $1, $2" &&
                                              p.param_type_count == 2;
                                   }));
    samples.push_back(typed<Parse>(
        "Parse (unnamed, no types)", fe_dir, fe::kParse,
        built([](auto& o) { append_parse(o, "", "SELECT 1"); }), parse_parse,
        [](const Parse& p) { return p.statement.empty() && p.param_type_count == 0; }));
    samples.push_back(typed<Bind>("Bind", fe_dir, fe::kBind, built([](auto& o) {
                                      append_bind(o, "p1", "s1", {"42", "", "hello"});
                                  }),
                                  parse_bind, [](const Bind& b) {
                                      return b.portal == "p1" && b.statement == "s1" &&
                                             b.param_count == 3;
                                  }));
    samples.push_back(
        typed<Bind>("Bind (NULLs)", fe_dir, fe::kBind, built([](auto& o) {
                        append_bind_nullable(o, "", "s2", {std::nullopt, "x", std::nullopt});
                    }),
                    parse_bind, [](const Bind& b) {
                        return b.portal.empty() && b.statement == "s2" && b.param_count == 3;
                    }));
    samples.push_back(typed<Bind>(
        "Bind (format codes)", fe_dir, fe::kBind,
        message(fe::kBind, cstr("p") + cstr("s") + be16(2) + be16(1) + be16(0) + be16(2) + be32(4) +
                               "\0\0\0\x07"s + be32(1) + "7" + be16(1) + be16(1)),
        parse_bind, [](const Bind& b) { return b.param_count == 2; }));
    samples.push_back(typed<Execute>(
        "Execute", fe_dir, fe::kExecute, built([](auto& o) { append_execute(o, "p1", 100); }),
        parse_execute, [](const Execute& e) { return e.portal == "p1" && e.max_rows == 100; }));
    samples.push_back(typed<Describe>(
        "Describe", fe_dir, fe::kDescribe, built([](auto& o) { append_describe(o, 'P', "p1"); }),
        parse_describe, [](const Describe& d) { return d.target == 'P' && d.name == "p1"; }));
    samples.push_back(typed<Close>(
        "Close", fe_dir, fe::kClose, built([](auto& o) { append_close(o, 'S', "s1"); }),
        parse_close, [](const Close& c) { return c.target == 'S' && c.name == "s1"; }));
    samples.push_back(typed<CopyFail>(
        "CopyFail", fe_dir, fe::kCopyFail, message(fe::kCopyFail, cstr("client gave up")),
        parse_copy_fail, [](const CopyFail& f) { return f.message == "client gave up"; }));
    samples.push_back(typed<FunctionCall>(
        "FunctionCall", fe_dir, fe::kFunctionCall, message(fe::kFunctionCall, function_call_body()),
        parse_function_call,
        [](const FunctionCall& f) { return f.function_oid == 1299 && f.arg_count == 2; }));
    samples.push_back(empty("Sync", fe_dir, fe::kSync, built([](auto& o) { append_sync(o); })));
    samples.push_back(empty("Flush", fe_dir, fe::kFlush, built([](auto& o) { append_flush(o); })));
    samples.push_back(
        empty("Terminate", fe_dir, fe::kTerminate, built([](auto& o) { append_terminate(o); })));
    samples.push_back(empty("CopyDone", fe_dir, fe::kCopyDone, message(fe::kCopyDone, "")));
    samples.push_back(opaque("CopyData", fe_dir, fe::kCopyData, "1\tone\n2\ttwo\n\0\xff"s));
    samples.push_back(opaque("PasswordMessage", fe_dir, fe::kPassword, cstr("md5abcdef")));
    samples.push_back(opaque("SASLInitialResponse", fe_dir, fe::kPassword,
                             cstr("SCRAM-SHA-256") + be32(8) + "n,,n=,r="));
    return samples;
}

std::vector<Sample> backend_samples() {
    const auto be_dir = Direction::kBackend;
    std::vector<Sample> samples;
    const auto auth_sample = [&](std::string name, std::int32_t code, std::string data,
                                 bool self_delimiting) {
        samples.push_back(typed<Authentication>(
            std::move(name), be_dir, be::kAuthentication,
            built([&](auto& o) { append_authentication(o, code, data); }), parse_authentication,
            [code, data](const Authentication& a) { return a.code == code && a.data == data; },
            self_delimiting));
    };
    auth_sample("AuthenticationOk", auth::kOk, "", true);
    auth_sample("AuthenticationKerberosV5", auth::kKerberosV5, "", true);
    auth_sample("AuthenticationCleartextPassword", auth::kCleartextPassword, "", true);
    auth_sample("AuthenticationMD5Password", auth::kMd5Password, "\x01\x00\xfe\x7f"s, true);
    auth_sample("AuthenticationGSS", auth::kGss, "", true);
    auth_sample("AuthenticationGSSContinue", auth::kGssContinue, "\x60\x00token"s, false);
    auth_sample("AuthenticationSSPI", auth::kSspi, "", true);
    auth_sample("AuthenticationSASLContinue", auth::kSaslContinue, "r=abc,s=c2FsdA==,i=4096",
                false);
    auth_sample("AuthenticationSASLFinal", auth::kSaslFinal, "v=c2lnbmF0dXJl", false);
    samples.push_back(typed<Authentication>(
        "AuthenticationSASL", be_dir, be::kAuthentication, built([](auto& o) {
            append_authentication_sasl(o, {"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"});
        }),
        parse_authentication, [](const Authentication& a) {
            const auto mechanisms = parse_sasl_mechanisms(a.data);
            return a.code == auth::kSasl && mechanisms &&
                   *mechanisms ==
                       std::vector<std::string_view>{"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"};
        }));
    samples.push_back(
        typed<BackendKeyData>("BackendKeyData", be_dir, be::kBackendKeyData,
                              built([](auto& o) { append_backend_key_data(o, 4242, -559038737); }),
                              parse_backend_key_data, [](const BackendKeyData& k) {
                                  return k.process_id == 4242 && k.secret_key == -559038737;
                              }));
    samples.push_back(typed<ParameterStatus>(
        "ParameterStatus", be_dir, be::kParameterStatus,
        built([](auto& o) { append_parameter_status(o, "TimeZone", "Europe/Berlin"); }),
        parse_parameter_status, [](const ParameterStatus& s) {
            return s.name == "TimeZone" && s.value == "Europe/Berlin";
        }));
    for (const char status : {'I', 'T', 'E'}) {
        samples.push_back(typed<ReadyForQuery>(
            "ReadyForQuery "s + status, be_dir, be::kReadyForQuery,
            built([status](auto& o) { append_ready_for_query(o, status); }), parse_ready_for_query,
            [status](const ReadyForQuery& r) { return r.status == status; }));
    }
    samples.push_back(typed<CommandComplete>(
        "CommandComplete", be_dir, be::kCommandComplete,
        built([](auto& o) { append_command_complete(o, "INSERT 0 5"); }), parse_command_complete,
        [](const CommandComplete& c) { return c.tag == "INSERT 0 5"; }));
    samples.push_back(typed<ErrorFields>(
        "ErrorResponse", be_dir, be::kErrorResponse, built([](auto& o) {
            append_error_response(o, {"FATAL", "08P01", "pgwarden: protocol violation", "d", "h"});
        }),
        parse_error_fields, [](const ErrorFields& e) {
            return e.severity() == "FATAL" && e.sqlstate() == "08P01" &&
                   e.message() == "pgwarden: protocol violation" && e.get('D') == "d" &&
                   e.get('H') == "h";
        }));
    samples.push_back(typed<ErrorFields>(
        "NoticeResponse", be_dir, be::kNoticeResponse, built([](auto& o) {
            append_notice_response(o, {"NOTICE", "00000", "hello", "", ""});
        }),
        parse_error_fields, [](const ErrorFields& e) {
            return e.severity() == "NOTICE" && e.message() == "hello" && e.fields.size() == 4;
        }));
    samples.push_back(typed<NotificationResponse>(
        "NotificationResponse", be_dir, be::kNotificationResponse,
        message(be::kNotificationResponse, be32(77) + cstr("jobs") + cstr("{\"id\":1}")),
        parse_notification, [](const NotificationResponse& n) {
            return n.process_id == 77 && n.channel == "jobs" && n.payload == "{\"id\":1}";
        }));
    const auto copy_sample = [&](std::string name, char type) {
        samples.push_back(typed<CopyResponse>(
            std::move(name), be_dir, type, message(type, "\x01"s + be16(2) + be16(1) + be16(1)),
            parse_copy_response,
            [](const CopyResponse& c) { return c.format == 1 && c.column_count == 2; }));
    };
    copy_sample("CopyInResponse", be::kCopyInResponse);
    copy_sample("CopyOutResponse", be::kCopyOutResponse);
    copy_sample("CopyBothResponse", be::kCopyBothResponse);
    const std::string field_tail =
        be32(16384) + be16(1) + be32(23) + be16(4) + be32(0xffffffffu) + be16(0);
    samples.push_back(typed<RowDescription>(
        "RowDescription", be_dir, be::kRowDescription,
        message(be::kRowDescription, be16(2) + cstr("id") + field_tail + cstr("") + field_tail),
        parse_row_description, [](const RowDescription& r) { return r.field_count == 2; }));
    samples.push_back(empty("ParseComplete", be_dir, be::kParseComplete,
                            built([](auto& o) { append_parse_complete(o); })));
    samples.push_back(empty("BindComplete", be_dir, be::kBindComplete,
                            built([](auto& o) { append_bind_complete(o); })));
    samples.push_back(empty("CloseComplete", be_dir, be::kCloseComplete,
                            built([](auto& o) { append_close_complete(o); })));
    samples.push_back(
        empty("NoData", be_dir, be::kNoData, built([](auto& o) { append_no_data(o); })));
    samples.push_back(empty("EmptyQueryResponse", be_dir, be::kEmptyQueryResponse,
                            built([](auto& o) { append_empty_query_response(o); })));
    samples.push_back(
        empty("PortalSuspended", be_dir, be::kPortalSuspended, message(be::kPortalSuspended, "")));
    samples.push_back(empty("CopyDone", be_dir, be::kCopyDone, message(be::kCopyDone, "")));
    samples.push_back(opaque("CopyData", be_dir, be::kCopyData, "row\0data\n"s));
    samples.push_back(
        opaque("DataRow", be_dir, be::kDataRow, be16(2) + be32(1) + "1" + be32(0xffffffffu)));
    samples.push_back(
        opaque("FunctionCallResponse", be_dir, be::kFunctionCallResponse, be32(4) + "\0\0\0\x2a"s));
    samples.push_back(opaque("ParameterDescription", be_dir, be::kParameterDescription,
                             be16(2) + be32(23) + be32(25)));
    samples.push_back(opaque("NegotiateProtocolVersion", be_dir, be::kNegotiateProtocolVersion,
                             be32(0x00030000) + be32(1) + cstr("_pq_.unknown")));
    return samples;
}

std::vector<Sample> all_samples() {
    std::vector<Sample> samples = frontend_samples();
    for (Sample& sample : backend_samples())
        samples.push_back(std::move(sample));
    return samples;
}

}  // namespace

TEST_CASE("the samples cover every message type of both directions", "[wire][messages]") {
    std::set<char> frontend_seen;
    std::set<char> backend_seen;
    for (const Sample& sample : all_samples()) {
        INFO(sample.name);
        if (sample.direction == Direction::kFrontend) {
            CHECK(is_frontend_type(sample.type));
            frontend_seen.insert(sample.type);
        } else {
            CHECK(is_backend_type(sample.type));
            backend_seen.insert(sample.type);
        }
    }
    for (int byte = 0; byte < 256; ++byte) {
        const char type = static_cast<char>(byte);
        INFO("type byte " << byte);
        CHECK(is_frontend_type(type) == (frontend_seen.count(type) == 1));
        CHECK(is_backend_type(type) == (backend_seen.count(type) == 1));
    }
}

TEST_CASE("every message type round-trips build -> frame -> parse", "[wire][messages]") {
    for (const Sample& sample : all_samples()) {
        INFO(sample.name);
        const std::string_view body = framed_body(sample.bytes, sample.type);
        if (sample.accepts) CHECK(sample.accepts(body));
        CHECK(sample.matches(body));
    }
}

TEST_CASE("a batch of every message frames back into the same sequence", "[wire][messages]") {
    const std::vector<Sample> samples = all_samples();
    std::string stream;
    for (const Sample& sample : samples)
        stream += sample.bytes;
    std::string_view rest = stream;
    for (const Sample& sample : samples) {
        INFO(sample.name);
        FrameHeader header;
        REQUIRE(read_frame(rest, header) == FrameStatus::kComplete);
        CHECK(header.type == sample.type);
        CHECK(sample.matches(rest.substr(kHeaderSize, header.body_size())));
        rest.remove_prefix(header.total_size());
    }
    CHECK(rest.empty());
}

TEST_CASE("a message truncated at any byte is rejected", "[wire][messages]") {
    for (const Sample& sample : all_samples()) {
        INFO(sample.name);
        const std::string_view whole = sample.bytes;
        for (std::size_t n = 0; n < whole.size(); ++n) {
            INFO("cut after " << n << " bytes");
            FrameHeader header;
            const FrameStatus status = read_frame(whole.substr(0, n), header);
            CHECK(status == (n < kHeaderSize ? FrameStatus::kNeedHeader : FrameStatus::kPartial));
        }
        if (!sample.accepts || !sample.self_delimiting) continue;
        // A lying length word can still cut the body short: the parser must notice.
        const std::string_view body = whole.substr(kHeaderSize);
        for (std::size_t n = 0; n < body.size(); ++n) {
            INFO("body cut after " << n << " bytes");
            CHECK_FALSE(sample.accepts(body.substr(0, n)));
        }
    }
}

TEST_CASE("trailing bytes after a complete body are rejected", "[wire][messages]") {
    for (const Sample& sample : all_samples()) {
        if (!sample.accepts || !sample.self_delimiting) continue;
        INFO(sample.name);
        const std::string body(sample.bytes.substr(kHeaderSize));
        CHECK_FALSE(sample.accepts(body + '\0'));
        CHECK_FALSE(sample.accepts(body + 'x'));
        CHECK_FALSE(sample.accepts(body + "\0\0\0\0"s));
    }
}

TEST_CASE("strings without terminators are rejected", "[wire][messages]") {
    CHECK_FALSE(parse_query("SELECT 1"));
    CHECK_FALSE(parse_query(""));
    CHECK_FALSE(parse_parse(cstr("s") + "SELECT 1"));
    CHECK_FALSE(parse_bind("portal"));
    CHECK_FALSE(parse_execute("p" + be32(0)));
    CHECK_FALSE(parse_describe("Sname"));
    CHECK_FALSE(parse_close("P"));
    CHECK_FALSE(parse_copy_fail("oops"));
    CHECK_FALSE(parse_parameter_status(cstr("name") + "value"));
    CHECK_FALSE(parse_command_complete("SELECT 1"));
    CHECK_FALSE(parse_notification(be32(1) + cstr("channel") + "payload"));
    CHECK_FALSE(parse_error_fields("SERROR"));
    CHECK_FALSE(parse_row_description(be16(1) + "name"));
}

TEST_CASE("embedded NULs shift the message and are rejected", "[wire][messages]") {
    CHECK_FALSE(parse_query("SELECT 1\0; DROP TABLE t\0"s));
    CHECK_FALSE(parse_command_complete("SELECT\0 1\0"s));
    CHECK_FALSE(parse_parameter_status("a\0b\0c\0"s));
}

TEST_CASE("Parse counts parameter types as unsigned, like PostgreSQL", "[wire][messages]") {
    std::string body = cstr("") + cstr("INSERT ...") + be16(65535);
    for (int i = 0; i < 65535; ++i)
        body += be32(25);
    const auto parse = parse_parse(body);
    REQUIRE(parse);
    CHECK(parse->param_type_count == 65535);
    CHECK_FALSE(parse_parse(body.substr(0, body.size() - 1)));
    CHECK_FALSE(parse_parse(cstr("") + cstr("x") + be16(1)));  // count without the OID
}

TEST_CASE("Bind is fully walked", "[wire][messages][bind]") {
    const std::string names = cstr("p") + cstr("s");
    SECTION("more than 32767 parameters, as libpq allows") {
        std::string body = names + be16(0) + be16(40000);
        for (int i = 0; i < 40000; ++i)
            body += be32(0xffffffffu);
        body += be16(0);
        const auto bind = parse_bind(body);
        REQUIRE(bind);
        CHECK(bind->param_count == 40000);
    }
    SECTION("NULL parameters take no bytes; empty ones take a zero length") {
        const std::string body = names + be16(0) + be16(2) + be32(0xffffffffu) + be32(0) + be16(0);
        const auto bind = parse_bind(body);
        REQUIRE(bind);
        CHECK(bind->param_count == 2);
    }
    SECTION("a negative length other than -1 is malformed") {
        CHECK_FALSE(parse_bind(names + be16(0) + be16(1) + be32(0xfffffffeu) + be16(0)));
        CHECK_FALSE(parse_bind(names + be16(0) + be16(1) + be32(0x80000000u) + be16(0)));
    }
    SECTION("a parameter length past the end is malformed") {
        CHECK_FALSE(parse_bind(names + be16(0) + be16(1) + be32(5) + "abcd" + be16(0)));
        CHECK_FALSE(parse_bind(names + be16(0) + be16(1) + be32(0x7fffffff) + be16(0)));
    }
    SECTION("format code arrays must be present in full") {
        CHECK_FALSE(parse_bind(names + be16(3) + be16(0) + be16(0)));
        CHECK_FALSE(parse_bind(names + be16(0) + be16(0) + be16(2) + be16(1)));
        CHECK_FALSE(parse_bind(names + be16(0) + be16(0)));  // result format count missing
    }
    SECTION("fewer parameters than counted is malformed") {
        CHECK_FALSE(
            parse_bind(names + be16(0) + be16(3) + be32(1) + "a" + be32(1) + "b" + be16(0)));
    }
}

TEST_CASE("FunctionCall is fully walked", "[wire][messages]") {
    CHECK(parse_function_call(function_call_body()));
    CHECK(parse_function_call(be32(42) + be16(0) + be16(0) + be16(0)));
    SECTION("negative counts") {
        CHECK_FALSE(parse_function_call(be32(42) + be16(0xffff) + be16(0) + be16(0)));
        CHECK_FALSE(parse_function_call(be32(42) + be16(0) + be16(0x8000) + be16(0)));
    }
    SECTION("argument lengths") {
        CHECK(parse_function_call(be32(42) + be16(0) + be16(1) + be32(0xffffffffu) + be16(0)));
        CHECK_FALSE(
            parse_function_call(be32(42) + be16(0) + be16(1) + be32(0xfffffffdu) + be16(0)));
        CHECK_FALSE(
            parse_function_call(be32(42) + be16(0) + be16(1) + be32(9) + "short" + be16(0)));
    }
    SECTION("the result format code is required") {
        CHECK_FALSE(parse_function_call(be32(42) + be16(0) + be16(0)));
    }
}

TEST_CASE("Describe and Close accept only statement and portal targets", "[wire][messages]") {
    CHECK(parse_describe("S" + cstr("")));
    CHECK(parse_close("P" + cstr("")));
    for (const char target : {'s', 'p', 'X', '\0'}) {
        INFO("target " << int(target));
        CHECK_FALSE(parse_describe(std::string(1, target) + cstr("x")));
        CHECK_FALSE(parse_close(std::string(1, target) + cstr("x")));
    }
}

TEST_CASE("Authentication data must fit its code", "[wire][messages][auth]") {
    CHECK_FALSE(parse_authentication(""));
    CHECK_FALSE(parse_authentication("\0\0\0"s));
    CHECK_FALSE(parse_authentication(be32(auth::kOk) + "x"));
    CHECK_FALSE(parse_authentication(be32(auth::kCleartextPassword) + "x"));
    CHECK_FALSE(parse_authentication(be32(auth::kMd5Password) + "abc"));
    CHECK_FALSE(parse_authentication(be32(auth::kMd5Password) + "abcde"));
    CHECK_FALSE(parse_authentication(be32(auth::kSasl)));
    CHECK_FALSE(parse_authentication(be32(auth::kSasl) + cstr("SCRAM-SHA-256")));
    // Continuation payloads and unknown codes are opaque and relayed.
    const std::string unknown_body = be32(99) + "whatever";
    const auto unknown = parse_authentication(unknown_body);
    REQUIRE(unknown);
    CHECK(unknown->code == 99);
    CHECK(unknown->data == "whatever");
    CHECK(parse_authentication(be32(auth::kSaslContinue)));
}

TEST_CASE("parse_sasl_mechanisms reads the offered list", "[wire][messages][auth]") {
    using Mechanisms = std::vector<std::string_view>;
    SECTION("well-formed") {
        CHECK(parse_sasl_mechanisms(cstr("SCRAM-SHA-256-PLUS") + cstr("SCRAM-SHA-256") + '\0') ==
              Mechanisms{"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"});
        CHECK(parse_sasl_mechanisms(cstr("SCRAM-SHA-256") + '\0') == Mechanisms{"SCRAM-SHA-256"});
        const auto none = parse_sasl_mechanisms("\0"sv);
        REQUIRE(none);
        CHECK(none->empty());
    }
    SECTION("malformed") {
        CHECK_FALSE(parse_sasl_mechanisms(""));
        CHECK_FALSE(parse_sasl_mechanisms("SCRAM-SHA-256"));
        CHECK_FALSE(parse_sasl_mechanisms(cstr("SCRAM-SHA-256")));  // list terminator missing
        CHECK_FALSE(parse_sasl_mechanisms(cstr("SCRAM-SHA-256") + '\0' + "x"));
        CHECK_FALSE(parse_sasl_mechanisms("\0\0"s));
        CHECK_FALSE(parse_sasl_mechanisms(cstr("A") + cstr("B")));
    }
}

TEST_CASE("ErrorFields keeps every field and prefers the unlocalized severity",
          "[wire][messages][error]") {
    const std::string body = "SFEHLER\0VERROR\0C42501\0Mdenied\0Fpostgres.c\0L12\0\0"s;
    const auto error = parse_error_fields(body);
    REQUIRE(error);
    CHECK(error->fields.size() == 6);
    CHECK(error->severity() == "ERROR");
    CHECK(error->get('S') == "FEHLER");
    CHECK(error->sqlstate() == "42501");
    CHECK(error->message() == "denied");
    CHECK(error->get('L') == "12");
    CHECK(error->get('H').empty());
    // Servers before 9.6 send no 'V'.
    const std::string old_body = "SERROR\0Mx\0\0"s;
    const auto old = parse_error_fields(old_body);
    REQUIRE(old);
    CHECK(old->severity() == "ERROR");
    // No fields at all is still a well-formed (if useless) message.
    const auto bare = parse_error_fields("\0"sv);
    REQUIRE(bare);
    CHECK(bare->fields.empty());
    CHECK_FALSE(parse_error_fields(""));
    CHECK_FALSE(parse_error_fields("SERROR\0"s));  // terminator missing
    CHECK_FALSE(parse_error_fields("S"));
}

TEST_CASE("counts and enumerations out of range are rejected", "[wire][messages]") {
    CHECK_FALSE(parse_ready_for_query("X"));
    CHECK_FALSE(parse_ready_for_query(""));
    CHECK_FALSE(parse_copy_response("\0"s + be16(0xffff)));
    CHECK(parse_copy_response("\0"s + be16(0)));
    CHECK_FALSE(parse_row_description(be16(0x8000)));
    CHECK(parse_row_description(be16(0)));
    CHECK_FALSE(parse_backend_key_data(be32(1)));
}

TEST_CASE("command_tag_rows reads the row count of counted tags", "[wire][messages][tag]") {
    struct Row {
        const char* tag;
        std::optional<std::uint64_t> rows;
    };
    const std::vector<Row> table = {
        {"INSERT 0 5", 5},
        {"INSERT 0 0", 0},
        {"INSERT 16385 1", 1},
        {"UPDATE 3", 3},
        {"DELETE 0", 0},
        {"SELECT 2", 2},
        {"MOVE 7", 7},
        {"FETCH 100", 100},
        {"COPY 10", 10},
        {"MERGE 4", 4},
        {"SELECT 18446744073709551615", 18446744073709551615ull},
        {"SELECT 18446744073709551616", std::nullopt},  // overflow
        {"BEGIN", std::nullopt},
        {"COMMIT", std::nullopt},
        {"CREATE TABLE", std::nullopt},
        {"SELECT", std::nullopt},
        {"INSERT 5", std::nullopt},  // the oid is missing
        {"INSERT 0 ", std::nullopt},
        {"INSERT 0 5 6", std::nullopt},
        {"UPDATE", std::nullopt},
        {"UPDATE ", std::nullopt},
        {"UPDATE -1", std::nullopt},
        {"UPDATE +1", std::nullopt},
        {"UPDATE 1x", std::nullopt},
        {"UPDATE  1", std::nullopt},
        {"update 1", std::nullopt},
        {"SET 1", std::nullopt},
        {"", std::nullopt},
    };
    for (const Row& row : table) {
        INFO("tag \"" << row.tag << "\"");
        CHECK(command_tag_rows(row.tag) == row.rows);
    }
}
