// sd_notify over a datagram socket; see sd_notify(3) for the protocol and unix(7) for
// abstract socket addresses (a leading NUL byte, and a length that counts only the name).
#include "proxy/systemd_notify.hpp"

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace pgwarden::proxy {

namespace {

// A stalled service manager must not stall pgwarden's startup or reload path for long.
constexpr long kSendTimeoutSeconds = 1;

struct SocketAddress {
    sockaddr_un address{};
    socklen_t length = 0;
};

std::optional<SocketAddress> unix_address(std::string_view name) {
    SocketAddress result;
    result.address.sun_family = AF_UNIX;
    constexpr std::size_t kPathCapacity = sizeof(result.address.sun_path);
    if (name.size() >= 2 && name.front() == '@') {
        // The name after the leading NUL is exactly as long as the address length says.
        const std::string_view abstract_name = name.substr(1);
        if (abstract_name.size() > kPathCapacity - 1) return std::nullopt;
        result.address.sun_path[0] = '\0';
        std::memcpy(result.address.sun_path + 1, abstract_name.data(), abstract_name.size());
        result.length =
            static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + abstract_name.size());
        return result;
    }
    if (name.empty() || name.front() != '/') return std::nullopt;
    if (name.size() > kPathCapacity - 1) return std::nullopt;  // room for the terminating NUL
    std::memcpy(result.address.sun_path, name.data(), name.size());
    result.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size() + 1);
    return result;
}

class FileDescriptor {
public:
    explicit FileDescriptor(int fd) : fd_(fd) {}
    ~FileDescriptor() {
        if (fd_ >= 0) ::close(fd_);
    }
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    int get() const { return fd_; }

private:
    int fd_;
};

}  // namespace

std::string notify_reloading_message(std::uint64_t monotonic_usec) {
    return "RELOADING=1\nMONOTONIC_USEC=" + std::to_string(monotonic_usec);
}

std::string notify_reloading_message() {
    timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC, &now);
    const auto usec = static_cast<std::uint64_t>(now.tv_sec) * 1'000'000u +
                      static_cast<std::uint64_t>(now.tv_nsec) / 1'000u;
    return notify_reloading_message(usec);
}

std::string notify_status_message(std::string_view text) {
    std::string message = "STATUS=";
    message.reserve(message.size() + text.size());
    for (char c : text)
        message += (c == '\n' || c == '\r') ? ' ' : c;
    return message;
}

const char* to_string(NotifyResult result) {
    switch (result) {
        case NotifyResult::kSent: return "sent";
        case NotifyResult::kNotRequested: return "not_requested";
        case NotifyResult::kFailed: return "failed";
    }
    return "unknown";
}

NotifyResult send_service_notification(std::string_view socket_name, std::string_view message) {
    if (message.empty()) return NotifyResult::kFailed;
    const auto address = unix_address(socket_name);
    if (!address) return NotifyResult::kFailed;

    FileDescriptor socket(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (socket.get() < 0) return NotifyResult::kFailed;
    const timeval send_timeout{kSendTimeoutSeconds, 0};
    ::setsockopt(socket.get(), SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);

    // systemd learns the sender's pid from the socket's credentials, so NotifyAccess=main
    // accepts this datagram only from pgwarden's own process, which is where it is sent.
    ssize_t sent = -1;
    do {
        sent = ::sendto(socket.get(), message.data(), message.size(), MSG_NOSIGNAL,
                        reinterpret_cast<const sockaddr*>(&address->address), address->length);
    } while (sent < 0 && errno == EINTR);
    return sent == static_cast<ssize_t>(message.size()) ? NotifyResult::kSent
                                                        : NotifyResult::kFailed;
}

NotifyResult notify_service_manager(std::string_view message) {
    const char* socket_name = std::getenv("NOTIFY_SOCKET");
    if (socket_name == nullptr || *socket_name == '\0') return NotifyResult::kNotRequested;
    return send_service_notification(socket_name, message);
}

}  // namespace pgwarden::proxy
