// Message boundaries from headers alone: the proxy relays bodies it never parses.
#include "wire/frame.hpp"

#include "wire/reader.hpp"

namespace pgwarden::wire {

FrameStatus read_frame(std::string_view data, FrameHeader& header, std::size_t max_length) {
    if (data.size() < kHeaderSize) return FrameStatus::kNeedHeader;
    Reader reader(data.substr(0, kHeaderSize));
    const char type = static_cast<char>(reader.byte());
    const std::uint32_t length = reader.uint32();
    // A length below 4 cannot even cover itself; one above the limit is what PostgreSQL
    // refuses as "invalid message length", and would otherwise let a client make us wait
    // on (or buffer) gigabytes.
    if (length < 4 || length > max_length) return FrameStatus::kInvalid;
    header.type = type;
    header.length = length;
    return data.size() >= header.total_size() ? FrameStatus::kComplete : FrameStatus::kPartial;
}

StartupFrameStatus read_startup_frame(std::string_view data, std::uint32_t& length) {
    if (data.size() < 4) return StartupFrameStatus::kNeedMore;
    Reader reader(data.substr(0, 4));
    const std::uint32_t packet_length = reader.uint32();
    if (packet_length < kMinStartupPacketLength || packet_length > kMaxStartupPacketLength) {
        return StartupFrameStatus::kInvalid;
    }
    if (data.size() < packet_length) return StartupFrameStatus::kNeedMore;
    length = packet_length;
    return StartupFrameStatus::kComplete;
}

}  // namespace pgwarden::wire
