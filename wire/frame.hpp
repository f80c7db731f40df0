// Framing: finds message boundaries in a byte stream by reading headers only, so bodies
// that need no inspection (DataRow, CopyData) can be relayed without being copied.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "wire/limits.hpp"

namespace pgwarden::wire {

enum class FrameStatus {
    kComplete,  // header and whole body are in the buffer
    kPartial,   // header is known, body is not all there yet
    kNeedHeader,  // fewer than kHeaderSize bytes
    kInvalid,   // length word below 4 or above the limit
};

struct FrameHeader {
    char type = 0;
    std::uint32_t length = 0;  // as on the wire: counts itself, not the type byte

    std::size_t body_size() const { return length - 4; }
    std::size_t total_size() const { return std::size_t{length} + 1; }
};

// Reads the header at the front of `data`. On kComplete and kPartial `header` is set.
// Inline: the relay calls it for every message in both directions.
inline FrameStatus read_frame(std::string_view data, FrameHeader& header,
                              std::size_t max_length = kMaxMessageLength) {
    if (data.size() < kHeaderSize) return FrameStatus::kNeedHeader;
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    const std::uint32_t length = (std::uint32_t{p[1]} << 24) | (std::uint32_t{p[2]} << 16) |
                                 (std::uint32_t{p[3]} << 8) | std::uint32_t{p[4]};
    // A length below 4 cannot even cover itself; one above the limit is what PostgreSQL
    // refuses as "invalid message length", and would otherwise let a client make us wait
    // on (or buffer) gigabytes.
    if (length < 4 || length > max_length) return FrameStatus::kInvalid;
    header.type = static_cast<char>(p[0]);
    header.length = length;
    return data.size() >= header.total_size() ? FrameStatus::kComplete : FrameStatus::kPartial;
}

// The startup phase has untyped packets: a 4-byte length (counting itself) then a body.
enum class StartupFrameStatus { kComplete, kNeedMore, kInvalid };
// On kComplete `length` is the whole packet length including the length word.
StartupFrameStatus read_startup_frame(std::string_view data, std::uint32_t& length);

}  // namespace pgwarden::wire
