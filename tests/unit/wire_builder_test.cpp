// MessageBuilder and the append_* helpers: exact bytes against hand-encoded expectations,
// and the guarantee that whatever strings they get, the message stays well-formed.
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/unit/wire_test_support.hpp"
#include "wire/builder.hpp"
#include "wire/frame.hpp"
#include "wire/limits.hpp"
#include "wire/messages.hpp"

using namespace pgwarden::wire;
using namespace pgwarden::wire::test;
using namespace std::string_literals;

TEST_CASE("MessageBuilder writes type, big-endian length and fields", "[wire][builder]") {
    std::string out;
    {
        MessageBuilder builder(out, 'x');
        builder.int8(0xfe).int16(-2).int32(0x01020304).cstring("ab").bytes("\0z"s);
    }
    CHECK(out == "x"s + be32(4 + 1 + 2 + 4 + 3 + 2) + "\xfe\xff\xfe\x01\x02\x03\x04" + "ab\0\0z"s);
}

TEST_CASE("MessageBuilder patches the length once, at finish or destruction", "[wire][builder]") {
    std::string out = "prefix";
    MessageBuilder builder(out, 'Q');
    builder.cstring("SELECT 1");
    CHECK(out.substr(6, 5) == "Q"s + be32(0));  // placeholder until finished
    builder.finish();
    CHECK(out == "prefix" + message('Q', cstr("SELECT 1")));
    builder.finish();  // idempotent
    CHECK(out == "prefix" + message('Q', cstr("SELECT 1")));
}

TEST_CASE("a finished MessageBuilder leaves later messages alone", "[wire][builder]") {
    std::string out;
    {
        MessageBuilder first(out, 'Q');
        first.cstring("SELECT 1");
        first.finish();
        append_sync(out);  // the destructor below must not stretch 'Q' over it
    }
    CHECK(out == message('Q', cstr("SELECT 1")) + message('S', ""));
}

TEST_CASE("MessageBuilder::cstring drops embedded NULs", "[wire][builder]") {
    std::string out;
    append_query(out, "SELECT 1\0; DROP TABLE t"s);
    CHECK(out == message('Q', cstr("SELECT 1; DROP TABLE t")));
    const auto query = parse_query(framed_body(out, 'Q'));
    REQUIRE(query);
    CHECK(query->sql == "SELECT 1; DROP TABLE t");

    std::string status;
    append_parameter_status(status, "a\0b"s, "\0\0"s);
    CHECK(status == message('S', cstr("ab") + cstr("")));
}

TEST_CASE("builders append, so a batch goes out in one write", "[wire][builder]") {
    std::string out;
    append_parse_complete(out);
    append_bind_complete(out);
    append_command_complete(out, "SELECT 1");
    append_ready_for_query(out, 'I');
    CHECK(out ==
          message('1', "") + message('2', "") + message('C', cstr("SELECT 1")) + message('Z', "I"));
}

TEST_CASE("Diagnostic encodes S, V, C, M, then optional D and H", "[wire][builder]") {
    std::string out;
    SECTION("all fields") {
        append_error_response(out, {"ERROR", "53400", "pgwarden: write rate limit exceeded",
                                    "rule writes", "retry after 250 ms"});
        CHECK(out == message('E',
                             "SERROR\0VERROR\0C53400\0"
                             "Mpgwarden: write rate limit exceeded\0"
                             "Drule writes\0Hretry after 250 ms\0\0"s));
    }
    SECTION("without detail and hint") {
        append_notice_response(out, {"WARNING", "01000", "careful", "", ""});
        CHECK(out == message('N', "SWARNING\0VWARNING\0C01000\0Mcareful\0\0"s));
    }
    SECTION("hint without detail") {
        append_error_response(out, {"FATAL", "08P01", "pgwarden: protocol violation", "", "h"});
        CHECK(out ==
              message('E', "SFATAL\0VFATAL\0C08P01\0Mpgwarden: protocol violation\0Hh\0\0"s));
    }
    SECTION("NULs in client text cannot cut the message short") {
        append_error_response(out, {"ERROR", "42501", "bad \0name"s, "", ""});
        const auto error = parse_error_fields(framed_body(out, 'E'));
        REQUIRE(error);
        CHECK(error->message() == "bad name");
        CHECK(error->fields.size() == 4);
    }
}

TEST_CASE("append_error_fields re-encodes parsed fields", "[wire][builder]") {
    const std::string original = "SERROR\0VERROR\0C42P01\0Mrelation missing\0P15\0\0"s;
    const auto parsed = parse_error_fields(original);
    REQUIRE(parsed);
    std::string out;
    append_error_fields(out, 'E', parsed->fields);
    CHECK(out == message('E', original));

    std::string skipped;
    append_error_fields(skipped, 'N', {{'M', "kept"}, {'\0', "dropped"}, {'H', "also kept"}});
    CHECK(skipped == message('N', "Mkept\0Halso kept\0\0"s));
}

TEST_CASE("backend builders match the documented layouts", "[wire][builder]") {
    std::string out;
    SECTION("BackendKeyData") {
        append_backend_key_data(out, 1234, -1);
        CHECK(out == message('K', be32(1234) + be32(0xffffffffu)));
    }
    SECTION("AuthenticationMD5Password") {
        append_authentication(out, 5, "salt");
        CHECK(out == message('R', be32(5) + "salt"));
    }
    SECTION("AuthenticationOk") {
        append_authentication(out, 0);
        CHECK(out == message('R', be32(0)));
    }
    SECTION("AuthenticationSASL skips empty names, which would end the list") {
        append_authentication_sasl(out, {"SCRAM-SHA-256", "", "OTHER"});
        CHECK(out == message('R', be32(10) + cstr("SCRAM-SHA-256") + cstr("OTHER") + '\0'));
    }
    SECTION("AuthenticationSASL with nothing left to offer") {
        append_authentication_sasl(out, {});
        CHECK(out == message('R', be32(10) + '\0'));
    }
    SECTION("EmptyQueryResponse, CloseComplete, NoData") {
        append_empty_query_response(out);
        append_close_complete(out);
        append_no_data(out);
        CHECK(out == message('I', "") + message('3', "") + message('n', ""));
    }
}

TEST_CASE("frontend builders match the documented layouts", "[wire][builder]") {
    std::string out;
    SECTION("Parse") {
        append_parse(out, "s", "SELECT $1", {23});
        CHECK(out == message('P', cstr("s") + cstr("SELECT $1") + be16(1) + be32(23)));
    }
    SECTION("Bind") {
        append_bind(out, "", "s", {"1", ""});
        CHECK(out == message('B', cstr("") + cstr("s") + be16(0) + be16(2) + be32(1) + "1" +
                                      be32(0) + be16(0)));
    }
    SECTION("Bind with NULL") {
        append_bind_nullable(out, "p", "", {std::nullopt, "ab"});
        CHECK(out == message('B', cstr("p") + cstr("") + be16(0) + be16(2) + be32(0xffffffffu) +
                                      be32(2) + "ab" + be16(0)));
    }
    SECTION("Bind values may hold NULs: they are length-prefixed, not terminated") {
        append_bind(out, "", "", {"a\0b"s});
        CHECK(out ==
              message('B', cstr("") + cstr("") + be16(0) + be16(1) + be32(3) + "a\0b"s + be16(0)));
    }
    SECTION("Execute, Describe, Close, Sync, Flush, Terminate") {
        append_execute(out, "p", 0);
        append_describe(out, 'S', "s");
        append_close(out, 'P', "p");
        append_sync(out);
        append_flush(out);
        append_terminate(out);
        CHECK(out == message('E', cstr("p") + be32(0)) + message('D', "S" + cstr("s")) +
                         message('C', "P" + cstr("p")) + message('S', "") + message('H', "") +
                         message('X', ""));
    }
}

TEST_CASE("startup-phase packets match libpq's bytes", "[wire][builder][startup]") {
    std::string out;
    SECTION("SSLRequest") {
        append_ssl_request(out);
        CHECK(out == "\x00\x00\x00\x08\x04\xd2\x16\x2f"s);
    }
    SECTION("GSSENCRequest") {
        append_gssenc_request(out);
        CHECK(out == "\x00\x00\x00\x08\x04\xd2\x16\x30"s);
    }
    SECTION("CancelRequest") {
        append_cancel_request(out, 0x01020304, -1);
        CHECK(out == "\x00\x00\x00\x10\x04\xd2\x16\x2e\x01\x02\x03\x04\xff\xff\xff\xff"s);
    }
    SECTION("StartupMessage") {
        append_startup_message(out, {{"user", "alice"}, {"database", "app"}});
        CHECK(out == packet(be32(0x00030000) + cstr("user") + cstr("alice") + cstr("database") +
                            cstr("app") + '\0'));
    }
    SECTION("StartupMessage drops NULs and parameters whose name would be empty") {
        append_startup_message(out, {{"us\0er"s, "al\0ice"s}, {"\0"s, "x"}, {"", "y"}}, 0x00030001);
        CHECK(out == packet(be32(0x00030001) + cstr("user") + cstr("alice") + '\0'));
    }
    SECTION("appends after existing bytes") {
        out = "keep";
        append_ssl_request(out);
        CHECK(out == "keep\x00\x00\x00\x08\x04\xd2\x16\x2f"s);
    }
}
