// libFuzzer target: the input is what a client sends first. The startup frame is read
// as the proxy reads it, and whatever parses must rebuild to the same bytes.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tests/fuzz/fuzz_check.hpp"
#include "wire/builder.hpp"
#include "wire/frame.hpp"
#include "wire/limits.hpp"
#include "wire/messages.hpp"

namespace {

using namespace pgwarden::wire;
using pgwarden::wire::fuzz::require;

void check_packet(std::string_view packet) {
    const auto startup = parse_startup_packet(packet);
    if (!startup) return;
    require(packet.size() >= kMinStartupPacketLength && packet.size() <= kMaxStartupPacketLength);
    std::string rebuilt;
    switch (startup->kind) {
        case StartupKind::kStartup:
            require(startup->parameters.size() <= kMaxStartupParameters);
            for (const auto& [name, value] : startup->parameters) {
                require(!name.empty());
                require(startup->parameter(name) == value);  // names are unique
            }
            append_startup_message(rebuilt, startup->parameters, startup->protocol);
            require(rebuilt == packet);
            break;
        case StartupKind::kSslRequest:
            append_ssl_request(rebuilt);
            require(rebuilt == packet);
            break;
        case StartupKind::kGssEncRequest:
            append_gssenc_request(rebuilt);
            require(rebuilt == packet);
            break;
        case StartupKind::kCancelRequest:
            append_cancel_request(rebuilt, startup->process_id, startup->secret_key);
            require(rebuilt == packet);
            break;
        case StartupKind::kUnsupported:
            require((startup->protocol >> 16) != 3 && startup->parameters.empty());
            break;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    // The whole input as one packet exercises the length-word cross-check ...
    check_packet(input);
    // ... and framing first is what the proxy does with a client's bytes.
    std::uint32_t length = 0;
    if (read_startup_frame(input, length) == StartupFrameStatus::kComplete) {
        require(length >= kMinStartupPacketLength && length <= input.size());
        check_packet(input.substr(0, length));
    }
    return 0;
}
