// Protocol constants and size limits, each with where PostgreSQL defines it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pgwarden::wire {

// Protocol version and special request codes: src/include/libpq/pqcomm.h.
inline constexpr std::uint32_t kProtocolV3 = 3u << 16;              // PG_PROTOCOL(3,0)
inline constexpr std::uint32_t kCancelRequestCode = 80877102;        // CANCEL_REQUEST_CODE
inline constexpr std::uint32_t kSslRequestCode = 80877103;           // NEGOTIATE_SSL_CODE
inline constexpr std::uint32_t kGssEncRequestCode = 80877104;        // NEGOTIATE_GSS_CODE

// MAX_STARTUP_PACKET_LENGTH, src/include/libpq/pqcomm.h.
inline constexpr std::size_t kMaxStartupPacketLength = 10000;
// The smallest startup packet: length word plus protocol code.
inline constexpr std::size_t kMinStartupPacketLength = 8;
// PQ_LARGE_MESSAGE_LIMIT (MaxAllocSize - 1), src/include/libpq/libpq.h: the server refuses
// any message longer than this, so a longer length word is a protocol violation.
inline constexpr std::size_t kMaxMessageLength = 0x3fffffff - 1;
// A typed message is a type byte and a 4-byte length that counts itself.
inline constexpr std::size_t kHeaderSize = 5;
// Startup parameter count a client may send; PostgreSQL has no fixed limit, but
// kMaxStartupPacketLength already caps it, so this only guards allocation.
inline constexpr std::size_t kMaxStartupParameters = 2000;

}  // namespace pgwarden::wire
