// Helpers shared by the wire unit tests: raw byte encoding independent of the builders,
// so a builder bug cannot hide behind the same bug in the test's expectation.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include <catch2/catch.hpp>

#include "wire/frame.hpp"

namespace pgwarden::wire::test {

inline std::string be16(std::uint16_t v) {
    return {static_cast<char>(v >> 8), static_cast<char>(v & 0xff)};
}

inline std::string be32(std::uint32_t v) {
    return {static_cast<char>(v >> 24), static_cast<char>((v >> 16) & 0xff),
            static_cast<char>((v >> 8) & 0xff), static_cast<char>(v & 0xff)};
}

inline std::string cstr(std::string_view s) { return std::string(s) + '\0'; }

// A typed message: type byte, length counting itself, body.
inline std::string message(char type, std::string_view body) {
    return std::string(1, type) + be32(static_cast<std::uint32_t>(body.size() + 4)) +
           std::string(body);
}

// An untyped startup-phase packet: length counting itself, then the body.
inline std::string packet(std::string_view body) {
    return be32(static_cast<std::uint32_t>(body.size() + 4)) + std::string(body);
}

// Frames `bytes` as exactly one complete message of `type` and returns its body.
inline std::string_view framed_body(std::string_view bytes, char type) {
    FrameHeader header;
    REQUIRE(read_frame(bytes, header) == FrameStatus::kComplete);
    REQUIRE(header.type == type);
    REQUIRE(header.total_size() == bytes.size());
    return bytes.substr(kHeaderSize);
}

}  // namespace pgwarden::wire::test
