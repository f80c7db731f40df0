// Framing, the bounds-checked Reader and the per-direction type tables: the parts of the
// codec that run on every relayed byte.
#include <set>
#include <string>

#include <catch2/catch.hpp>

#include "tests/unit/wire_test_support.hpp"
#include "wire/frame.hpp"
#include "wire/limits.hpp"
#include "wire/message_types.hpp"
#include "wire/reader.hpp"

using namespace pgwarden::wire;
using namespace pgwarden::wire::test;
using namespace std::string_literals;
using namespace std::string_view_literals;

TEST_CASE("read_frame needs five bytes before it can say anything", "[wire][frame]") {
    const std::string whole = message('Q', cstr("SELECT 1"));
    for (std::size_t n = 0; n < kHeaderSize; ++n) {
        FrameHeader header;
        header.type = '?';
        CHECK(read_frame(std::string_view(whole).substr(0, n), header) == FrameStatus::kNeedHeader);
        CHECK(header.type == '?');  // untouched
    }
}

TEST_CASE("read_frame reads type and length of a complete message", "[wire][frame]") {
    const std::string whole = message('Q', cstr("SELECT 1"));
    FrameHeader header;
    REQUIRE(read_frame(whole, header) == FrameStatus::kComplete);
    CHECK(header.type == 'Q');
    CHECK(header.length == 4 + 9);
    CHECK(header.body_size() == 9);
    CHECK(header.total_size() == whole.size());
}

TEST_CASE("read_frame reports every strict prefix past the header as partial", "[wire][frame]") {
    const std::string whole = message('D', be16(1) + be32(3) + "abc");
    for (std::size_t n = kHeaderSize; n < whole.size(); ++n) {
        FrameHeader header;
        INFO("prefix of " << n << " bytes");
        REQUIRE(read_frame(std::string_view(whole).substr(0, n), header) == FrameStatus::kPartial);
        CHECK(header.type == 'D');
        CHECK(header.total_size() == whole.size());
    }
}

TEST_CASE("read_frame frames only the first message of a batch", "[wire][frame]") {
    const std::string first = message('P', cstr("") + cstr("SELECT $1") + be16(0));
    const std::string batch = first + message('S', "") + message('H', "");
    FrameHeader header;
    REQUIRE(read_frame(batch, header) == FrameStatus::kComplete);
    CHECK(header.type == 'P');
    CHECK(header.total_size() == first.size());

    REQUIRE(read_frame(std::string_view(batch).substr(first.size()), header) ==
            FrameStatus::kComplete);
    CHECK(header.type == 'S');
    CHECK(header.body_size() == 0);
}

TEST_CASE("read_frame accepts an empty body (length word 4)", "[wire][frame]") {
    FrameHeader header;
    REQUIRE(read_frame("S"s + be32(4), header) == FrameStatus::kComplete);
    CHECK(header.body_size() == 0);
    CHECK(header.total_size() == 5);
}

TEST_CASE("read_frame rejects length words that cannot cover themselves", "[wire][frame]") {
    for (std::uint32_t length : {0u, 1u, 2u, 3u}) {
        FrameHeader header;
        INFO("length " << length);
        CHECK(read_frame("Q"s + be32(length) + "xxxxxxxx", header) == FrameStatus::kInvalid);
    }
}

TEST_CASE("read_frame rejects oversized length words", "[wire][frame]") {
    FrameHeader header;
    SECTION("the default limit is PostgreSQL's") {
        const auto limit = static_cast<std::uint32_t>(kMaxMessageLength);
        CHECK(read_frame("d"s + be32(limit), header) == FrameStatus::kPartial);
        CHECK(header.length == limit);
        CHECK(read_frame("d"s + be32(limit + 1), header) == FrameStatus::kInvalid);
        CHECK(read_frame("d"s + be32(0x80000000u), header) == FrameStatus::kInvalid);
        CHECK(read_frame("d"s + be32(0xffffffffu), header) == FrameStatus::kInvalid);
    }
    SECTION("a caller-chosen limit counts the length word, not the type byte") {
        const std::string at_limit = message('Q', std::string(96, 'x'));  // length word 100
        CHECK(read_frame(at_limit, header, 100) == FrameStatus::kComplete);
        CHECK(read_frame(at_limit, header, 99) == FrameStatus::kInvalid);
        // The limit applies before the body arrives, so a huge claim is refused at once.
        CHECK(read_frame("Q"s + be32(101), header, 100) == FrameStatus::kInvalid);
    }
}

TEST_CASE("read_startup_frame frames untyped packets", "[wire][frame][startup]") {
    const std::string ssl = be32(8) + be32(kSslRequestCode);
    std::uint32_t length = 0;
    SECTION("complete") {
        REQUIRE(read_startup_frame(ssl + "extra", length) == StartupFrameStatus::kComplete);
        CHECK(length == 8);
    }
    SECTION("every prefix needs more") {
        for (std::size_t n = 0; n < ssl.size(); ++n) {
            INFO("prefix of " << n << " bytes");
            CHECK(read_startup_frame(std::string_view(ssl).substr(0, n), length) ==
                  StartupFrameStatus::kNeedMore);
        }
    }
    SECTION("lengths outside [8, 10000] are invalid before the body arrives") {
        for (std::uint32_t bad : {0u, 4u, 7u, 10001u, 0x7fffffffu, 0xffffffffu}) {
            INFO("length " << bad);
            CHECK(read_startup_frame(be32(bad), length) == StartupFrameStatus::kInvalid);
        }
        CHECK(read_startup_frame(be32(10000), length) == StartupFrameStatus::kNeedMore);
        CHECK(read_startup_frame(be32(10000) + std::string(9996, 'a'), length) ==
              StartupFrameStatus::kComplete);
        CHECK(length == 10000);
    }
}

TEST_CASE("Reader decodes network byte order", "[wire][reader]") {
    Reader reader("\x01\x02\xff\xfe\x80\x00\x00\x01\xff\xff\xff\xff\x7f"sv);
    CHECK(reader.int16() == 0x0102);
    CHECK(reader.int16() == -2);
    CHECK(reader.int32() == std::int32_t(0x80000001u));
    CHECK(reader.uint32() == 0xffffffffu);
    CHECK(reader.byte() == 0x7f);
    CHECK(reader.done());
    Reader unsigned_reader("\xff\xfe"sv);
    CHECK(unsigned_reader.uint16() == 0xfffe);
}

TEST_CASE("Reader reads strings and byte runs as views", "[wire][reader]") {
    const std::string body = "name\0\0tail"s;
    Reader reader(body);
    CHECK(reader.cstring() == "name");
    CHECK(reader.cstring().empty());
    CHECK(reader.ok());
    CHECK(reader.remaining() == 4);
    CHECK(reader.bytes(2) == "ta");
    CHECK(reader.rest() == "il");
    CHECK(reader.done());
    CHECK(reader.rest().empty());
    CHECK(reader.ok());
}

TEST_CASE("Reader errors are sticky and never read out of bounds", "[wire][reader]") {
    SECTION("short integer") {
        Reader reader("\x01\x02\x03"sv);
        CHECK(reader.int32() == 0);
        CHECK_FALSE(reader.ok());
        CHECK(reader.byte() == 0);  // even though a byte is there
        CHECK_FALSE(reader.done());
    }
    SECTION("unterminated string") {
        Reader reader("abc"sv);
        CHECK(reader.cstring().empty());
        CHECK_FALSE(reader.ok());
        CHECK(reader.remaining() == 3);
    }
    SECTION("huge byte count does not wrap") {
        Reader reader("abcd"sv);
        reader.byte();
        CHECK(reader.bytes(static_cast<std::size_t>(-1)).empty());
        CHECK_FALSE(reader.ok());
    }
    SECTION("empty body") {
        Reader reader(std::string_view{});
        CHECK(reader.at_end());
        CHECK(reader.done());
        CHECK(reader.int16() == 0);
        CHECK_FALSE(reader.done());
    }
}

TEST_CASE("frontend and backend type tables list exactly the protocol's types", "[wire][types]") {
    const std::set<char> frontend = {fe::kBind,         fe::kClose,    fe::kCopyData, fe::kCopyDone,
                                     fe::kCopyFail,     fe::kDescribe, fe::kExecute,  fe::kFlush,
                                     fe::kFunctionCall, fe::kParse,    fe::kPassword, fe::kQuery,
                                     fe::kSync,         fe::kTerminate};
    const std::set<char> backend = {be::kAuthentication,
                                    be::kBackendKeyData,
                                    be::kBindComplete,
                                    be::kCloseComplete,
                                    be::kCommandComplete,
                                    be::kCopyBothResponse,
                                    be::kCopyData,
                                    be::kCopyDone,
                                    be::kCopyInResponse,
                                    be::kCopyOutResponse,
                                    be::kDataRow,
                                    be::kEmptyQueryResponse,
                                    be::kErrorResponse,
                                    be::kFunctionCallResponse,
                                    be::kNegotiateProtocolVersion,
                                    be::kNoData,
                                    be::kNoticeResponse,
                                    be::kNotificationResponse,
                                    be::kParameterDescription,
                                    be::kParameterStatus,
                                    be::kParseComplete,
                                    be::kPortalSuspended,
                                    be::kReadyForQuery,
                                    be::kRowDescription};
    REQUIRE(frontend.size() == 14);
    REQUIRE(backend.size() == 24);
    for (int byte = 0; byte < 256; ++byte) {
        const char type = static_cast<char>(byte);
        INFO("type byte " << byte);
        CHECK(is_frontend_type(type) == (frontend.count(type) == 1));
        CHECK(is_backend_type(type) == (backend.count(type) == 1));
    }
    // Spot checks against the protocol documentation, independent of the constants.
    CHECK(is_frontend_type('Q'));
    CHECK_FALSE(is_frontend_type('Z'));
    CHECK(is_backend_type('Z'));
    CHECK_FALSE(is_backend_type('Q'));
    CHECK_FALSE(is_backend_type('p'));
    CHECK_FALSE(is_frontend_type('\0'));
}
