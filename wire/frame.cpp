// Message boundaries from headers alone: the proxy relays bodies it never parses.
#include "wire/frame.hpp"

#include "wire/reader.hpp"

namespace pgwarden::wire {

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
