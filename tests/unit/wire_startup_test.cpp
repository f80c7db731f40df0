// parse_startup_packet: the first bytes a client sends, before it is authenticated, so
// every malformed variant must be refused without trusting any length in it.
#include <optional>
#include <string>
#include <utility>
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

namespace {

using Parameters = std::vector<std::pair<std::string, std::string>>;

std::string startup(const Parameters& params, std::uint32_t protocol = kProtocolV3) {
    std::string out;
    append_startup_message(out, params, protocol);
    return out;
}

// `count` parameters with distinct two-byte names and empty values: 4 bytes each.
Parameters many_parameters(std::size_t count) {
    Parameters params;
    for (std::size_t i = 0; i < count; ++i) {
        const char high = static_cast<char>(1 + i / 255);
        const char low = static_cast<char>(1 + i % 255);
        params.emplace_back(std::string{high, low}, "");
    }
    return params;
}

}  // namespace

TEST_CASE("StartupMessage parameters are kept in order", "[wire][startup]") {
    const std::string bytes = startup({{"user", "alice"},
                                       {"database", "app"},
                                       {"application_name", "psql"},
                                       {"options", "-c search_path=x"},
                                       {"_pq_.extension", ""}});
    std::uint32_t length = 0;
    REQUIRE(read_startup_frame(bytes, length) == StartupFrameStatus::kComplete);
    REQUIRE(length == bytes.size());
    const auto parsed = parse_startup_packet(bytes);
    REQUIRE(parsed);
    CHECK(parsed->kind == StartupKind::kStartup);
    CHECK(parsed->protocol == kProtocolV3);
    REQUIRE(parsed->parameters.size() == 5);
    CHECK(parsed->parameters[0] == std::pair<std::string, std::string>{"user", "alice"});
    CHECK(parsed->parameters[4].first == "_pq_.extension");
    CHECK(parsed->parameter("database") == "app");
    CHECK(parsed->parameter("options") == "-c search_path=x");
    CHECK(parsed->parameter("missing").empty());
    CHECK(parsed->parameter("").empty());
}

TEST_CASE("StartupMessage parameters own their text", "[wire][startup]") {
    std::optional<StartupPacket> parsed;
    {
        std::string bytes = startup({{"user", "alice"}});
        parsed = parse_startup_packet(bytes);
        bytes.assign(bytes.size(), 'Z');
    }
    REQUIRE(parsed);
    CHECK(parsed->parameter("user") == "alice");
}

TEST_CASE("a StartupMessage with no parameters is well-formed", "[wire][startup]") {
    // PostgreSQL refuses a missing user later, as an authentication error, not here.
    const auto parsed = parse_startup_packet(startup({}));
    REQUIRE(parsed);
    CHECK(parsed->kind == StartupKind::kStartup);
    CHECK(parsed->parameters.empty());
}

TEST_CASE("any 3.x protocol is a StartupMessage; other majors are unsupported", "[wire][startup]") {
    for (const std::uint32_t minor_version : {0x00030001u, 0x00030002u, 0x0003ffffu}) {
        INFO("protocol " << std::hex << minor_version);
        const auto parsed = parse_startup_packet(startup({{"user", "u"}}, minor_version));
        REQUIRE(parsed);
        CHECK(parsed->kind == StartupKind::kStartup);
        CHECK(parsed->protocol == minor_version);
        CHECK(parsed->parameter("user") == "u");
    }
    const std::uint32_t kOtherCode = (1234u << 16) | 5681;  // next to the real request codes
    for (const std::uint32_t other : {0x00020000u, 0x00040000u, 0x00000000u, 0x0002ffffu,
                                      0xffffffffu, 0x00000003u, kOtherCode}) {
        INFO("protocol " << std::hex << other);
        // The body is not inspected: PostgreSQL answers without reading parameters.
        const auto parsed = parse_startup_packet(packet(be32(other) + "no terminator"));
        REQUIRE(parsed);
        CHECK(parsed->kind == StartupKind::kUnsupported);
        CHECK(parsed->protocol == other);
        CHECK(parsed->parameters.empty());
    }
}

TEST_CASE("SSLRequest and GSSENCRequest are exactly eight bytes", "[wire][startup]") {
    std::string ssl;
    append_ssl_request(ssl);
    const auto ssl_packet = parse_startup_packet(ssl);
    REQUIRE(ssl_packet);
    CHECK(ssl_packet->kind == StartupKind::kSslRequest);
    CHECK(ssl_packet->protocol == kSslRequestCode);

    std::string gss;
    append_gssenc_request(gss);
    const auto gss_packet = parse_startup_packet(gss);
    REQUIRE(gss_packet);
    CHECK(gss_packet->kind == StartupKind::kGssEncRequest);
    CHECK(gss_packet->protocol == kGssEncRequestCode);

    CHECK_FALSE(parse_startup_packet(packet(be32(kSslRequestCode) + '\0')));
    CHECK_FALSE(parse_startup_packet(packet(be32(kSslRequestCode) + be32(0))));
    CHECK_FALSE(parse_startup_packet(packet(be32(kGssEncRequestCode) + be32(0))));
}

TEST_CASE("CancelRequest is exactly sixteen bytes", "[wire][startup]") {
    std::string cancel;
    append_cancel_request(cancel, 31337, -123456789);
    const auto parsed = parse_startup_packet(cancel);
    REQUIRE(parsed);
    CHECK(parsed->kind == StartupKind::kCancelRequest);
    CHECK(parsed->protocol == kCancelRequestCode);
    CHECK(parsed->process_id == 31337);
    CHECK(parsed->secret_key == -123456789);

    CHECK_FALSE(parse_startup_packet(packet(be32(kCancelRequestCode))));
    CHECK_FALSE(parse_startup_packet(packet(be32(kCancelRequestCode) + be32(1))));
    CHECK_FALSE(parse_startup_packet(packet(be32(kCancelRequestCode) + be32(1) + be32(2) + "x")));
}

TEST_CASE("the length word must equal the parsed's size", "[wire][startup]") {
    const std::string good = startup({{"user", "alice"}});
    CHECK(parse_startup_packet(good));
    CHECK_FALSE(parse_startup_packet(good + '\0'));  // longer than the length word says
    std::string short_claim = good;
    short_claim[3] = static_cast<char>(short_claim[3] - 1);
    CHECK_FALSE(parse_startup_packet(short_claim));
    for (std::size_t n = 0; n < kMinStartupPacketLength; ++n) {
        INFO(n << " bytes");
        CHECK_FALSE(parse_startup_packet(good.substr(0, n)));
    }
}

TEST_CASE("a StartupMessage cut anywhere is rejected", "[wire][startup]") {
    const std::string whole = startup({{"user", "alice"}, {"database", "app"}});
    const std::string body = whole.substr(4);
    for (std::size_t n = 0; n < body.size(); ++n) {
        INFO("body cut after " << n << " bytes");
        // As framed (length word still claims the whole parsed) ...
        CHECK_FALSE(parse_startup_packet(std::string_view(whole).substr(0, 4 + n)));
        // ... and with a length word that agrees with the cut.
        CHECK_FALSE(parse_startup_packet(packet(body.substr(0, n))));
    }
}

TEST_CASE("malformed parameter lists are rejected", "[wire][startup]") {
    const std::string v3 = be32(kProtocolV3);
    SECTION("missing final terminator") {
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user") + cstr("alice"))));
        CHECK_FALSE(parse_startup_packet(packet(v3)));
    }
    SECTION("a name without a value") {
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user"))));
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user") + cstr("a") + cstr("db"))));
    }
    SECTION("unterminated value") {
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user") + "alice")));
    }
    SECTION("bytes after the terminator") {
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user") + cstr("a") + '\0' + '\0')));
        CHECK_FALSE(parse_startup_packet(packet(v3 + cstr("user") + cstr("a") + '\0' + "x")));
        CHECK_FALSE(parse_startup_packet(packet(v3 + '\0' + cstr("user") + cstr("a") + '\0')));
    }
    SECTION("duplicate names") {
        CHECK_FALSE(parse_startup_packet(startup({{"user", "a"}, {"user", "b"}})));
        CHECK_FALSE(parse_startup_packet(startup({{"user", "a"}, {"user", "a"}})));
        Parameters params = many_parameters(1000);
        params.push_back(params[3]);
        CHECK_FALSE(parse_startup_packet(startup(params)));
        CHECK(parse_startup_packet(startup({{"user", "a"}, {"User", "a"}})));  // case matters
    }
}

TEST_CASE("startup packets over 10000 bytes are refused", "[wire][startup]") {
    // user=<padding> sized so the whole parsed is exactly the limit.
    const std::size_t fixed = 4 + 4 + 5 + 1 + 1;  // length, protocol, "user\0", value NUL, end
    const std::string padding(kMaxStartupPacketLength - fixed, 'u');
    const std::string at_limit = startup({{"user", padding}});
    REQUIRE(at_limit.size() == kMaxStartupPacketLength);
    const auto parsed = parse_startup_packet(at_limit);
    REQUIRE(parsed);
    CHECK(parsed->parameter("user").size() == padding.size());

    const std::string over_limit = startup({{"user", padding + 'u'}});
    REQUIRE(over_limit.size() == kMaxStartupPacketLength + 1);
    CHECK_FALSE(parse_startup_packet(over_limit));
    std::uint32_t length = 0;
    CHECK(read_startup_frame(over_limit, length) == StartupFrameStatus::kInvalid);

    const std::string huge = startup({{"user", std::string(70000, 'x')}});
    CHECK_FALSE(parse_startup_packet(huge));
    CHECK(read_startup_frame(huge, length) == StartupFrameStatus::kInvalid);
}

TEST_CASE("up to kMaxStartupParameters parameters are accepted", "[wire][startup]") {
    REQUIRE(kMaxStartupParameters == 2000);
    const std::string at_limit = startup(many_parameters(kMaxStartupParameters));
    REQUIRE(at_limit.size() <= kMaxStartupPacketLength);
    const auto parsed = parse_startup_packet(at_limit);
    REQUIRE(parsed);
    CHECK(parsed->parameters.size() == kMaxStartupParameters);
    CHECK(parsed->parameters.back().first == many_parameters(kMaxStartupParameters).back().first);

    const std::string over_limit = startup(many_parameters(kMaxStartupParameters + 1));
    REQUIRE(over_limit.size() <= kMaxStartupPacketLength);  // refused for the count alone
    CHECK_FALSE(parse_startup_packet(over_limit));
}
