// sd_notify without libsystemd: a datagram socket stands in for systemd, bound to a path or
// an abstract name, and checks what arrives and from which process.
#include <catch2/catch.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>

#include "proxy/systemd_notify.hpp"

using namespace pgwarden;
using proxy::NotifyResult;

namespace {

constexpr int kReceiveTimeoutMs = 5000;  // a datagram to a local socket arrives at once

struct Datagram {
    std::string text;
    pid_t sender_pid = 0;
};

// What systemd does on its side: a bound datagram socket that asks for the sender's
// credentials with every message.
class FakeServiceManager {
public:
    // `name` as NOTIFY_SOCKET would carry it: "/path" or "@abstract".
    explicit FakeServiceManager(std::string name) : name_(std::move(name)) {
        fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        REQUIRE(fd_ >= 0);
        const int on = 1;
        REQUIRE(::setsockopt(fd_, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) == 0);
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        socklen_t length = 0;
        if (name_.front() == '@') {
            std::memcpy(address.sun_path + 1, name_.data() + 1, name_.size() - 1);
            length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name_.size());
        } else {
            std::memcpy(address.sun_path, name_.data(), name_.size());
            length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name_.size() + 1);
        }
        REQUIRE(::bind(fd_, reinterpret_cast<const sockaddr*>(&address), length) == 0);
    }
    ~FakeServiceManager() {
        ::close(fd_);
        if (name_.front() == '/') ::unlink(name_.c_str());
    }
    FakeServiceManager(const FakeServiceManager&) = delete;
    FakeServiceManager& operator=(const FakeServiceManager&) = delete;

    const std::string& name() const { return name_; }

    // The next datagram, or nullopt when none arrives within `timeout_ms`.
    std::optional<Datagram> receive(int timeout_ms = kReceiveTimeoutMs) {
        pollfd ready{fd_, POLLIN, 0};
        if (::poll(&ready, 1, timeout_ms) != 1) return std::nullopt;
        char buffer[4096];
        iovec io{buffer, sizeof buffer};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))];
        msghdr message{};
        message.msg_iov = &io;
        message.msg_iovlen = 1;
        message.msg_control = control;
        message.msg_controllen = sizeof control;
        const ssize_t size = ::recvmsg(fd_, &message, MSG_DONTWAIT);
        if (size < 0) return std::nullopt;
        Datagram datagram{std::string(buffer, static_cast<std::size_t>(size)), 0};
        for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
             header = CMSG_NXTHDR(&message, header)) {
            if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_CREDENTIALS) {
                ucred credentials{};
                std::memcpy(&credentials, CMSG_DATA(header), sizeof credentials);
                datagram.sender_pid = credentials.pid;
            }
        }
        return datagram;
    }

private:
    std::string name_;
    int fd_ = -1;
};

// Sets or clears NOTIFY_SOCKET for one test and puts back what was there.
class NotifySocketVariable {
public:
    explicit NotifySocketVariable(const char* value) {
        if (const char* old = std::getenv("NOTIFY_SOCKET")) saved_ = old;
        if (value)
            ::setenv("NOTIFY_SOCKET", value, 1);
        else
            ::unsetenv("NOTIFY_SOCKET");
    }
    ~NotifySocketVariable() {
        if (saved_)
            ::setenv("NOTIFY_SOCKET", saved_->c_str(), 1);
        else
            ::unsetenv("NOTIFY_SOCKET");
    }
    NotifySocketVariable(const NotifySocketVariable&) = delete;
    NotifySocketVariable& operator=(const NotifySocketVariable&) = delete;

private:
    std::optional<std::string> saved_;
};

// A socket path of our own in the temp directory; unique per test run.
std::string temp_socket_path(const char* tag) {
    static int counter = 0;
    return (std::filesystem::temp_directory_path() /
            ("pgwarden-notify-" + std::to_string(::getpid()) + "-" + tag + "-" +
             std::to_string(++counter) + ".sock"))
        .string();
}

std::string abstract_name(const char* tag) {
    static int counter = 0;
    return "@pgwarden-notify-test/" + std::to_string(::getpid()) + "/" + tag + "/" +
           std::to_string(++counter);
}

std::uint64_t monotonic_usec_now() {
    timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC, &now);
    return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000u +
           static_cast<std::uint64_t>(now.tv_nsec) / 1'000u;
}

}  // namespace

TEST_CASE("READY=1 reaches the path socket NOTIFY_SOCKET names, sent by this process") {
    FakeServiceManager manager(temp_socket_path("ready"));
    NotifySocketVariable variable(manager.name().c_str());

    CHECK(proxy::notify_service_manager(proxy::kNotifyReady) == NotifyResult::kSent);

    const auto datagram = manager.receive();
    REQUIRE(datagram);
    CHECK(datagram->text == "READY=1");
    // NotifyAccess=main only accepts datagrams whose credentials name the main process.
    CHECK(datagram->sender_pid == ::getpid());
}

TEST_CASE("an abstract NOTIFY_SOCKET (leading @) is reached without a file") {
    FakeServiceManager manager(abstract_name("abstract"));
    NotifySocketVariable variable(manager.name().c_str());

    CHECK(proxy::notify_service_manager(proxy::kNotifyStopping) == NotifyResult::kSent);

    const auto datagram = manager.receive();
    REQUIRE(datagram);
    CHECK(datagram->text == "STOPPING=1");
}

TEST_CASE("a name differing only after the abstract prefix is a different socket") {
    // The address length must count the name exactly: a padded or truncated length would
    // reach no socket, or the wrong one.
    FakeServiceManager manager(abstract_name("exact"));
    FakeServiceManager longer(manager.name() + "x");
    NotifySocketVariable variable(longer.name().c_str());

    CHECK(proxy::notify_service_manager(proxy::kNotifyReady) == NotifyResult::kSent);

    const auto datagram = longer.receive();
    REQUIRE(datagram);
    CHECK(datagram->text == "READY=1");
    CHECK_FALSE(manager.receive(100));
}

TEST_CASE("a reload sends RELOADING=1 with MONOTONIC_USEC in one datagram, then READY=1") {
    FakeServiceManager manager(abstract_name("reload"));
    NotifySocketVariable variable(manager.name().c_str());

    const std::uint64_t before = monotonic_usec_now();
    CHECK(proxy::notify_service_manager(proxy::notify_reloading_message()) == NotifyResult::kSent);
    const std::uint64_t after = monotonic_usec_now();
    CHECK(proxy::notify_service_manager(proxy::kNotifyReady) == NotifyResult::kSent);

    const auto reloading = manager.receive();
    REQUIRE(reloading);
    const std::string prefix = "RELOADING=1\nMONOTONIC_USEC=";
    REQUIRE(reloading->text.starts_with(prefix));
    const std::uint64_t stamp = std::stoull(reloading->text.substr(prefix.size()));
    CHECK(stamp >= before);
    CHECK(stamp <= after);

    // The variable stays set: the second notification found the socket too.
    const auto ready = manager.receive();
    REQUIRE(ready);
    CHECK(ready->text == "READY=1");
}

TEST_CASE("the reloading and status messages are formatted as systemd parses them") {
    CHECK(proxy::notify_reloading_message(1234567) == "RELOADING=1\nMONOTONIC_USEC=1234567");
    CHECK(proxy::notify_status_message("listening on 127.0.0.1:6432") ==
          "STATUS=listening on 127.0.0.1:6432");
    CHECK(proxy::notify_status_message("two\nlines\r") == "STATUS=two lines ");
}

TEST_CASE("without NOTIFY_SOCKET nothing is sent and that is not an error") {
    {
        NotifySocketVariable variable(nullptr);
        CHECK(proxy::notify_service_manager(proxy::kNotifyReady) == NotifyResult::kNotRequested);
    }
    {
        NotifySocketVariable variable("");
        CHECK(proxy::notify_service_manager(proxy::kNotifyReady) == NotifyResult::kNotRequested);
    }
}

TEST_CASE("unusable socket names and messages fail without throwing") {
    FakeServiceManager manager(abstract_name("unusable"));

    SECTION("a relative path") {
        CHECK(proxy::send_service_notification("notify.sock", proxy::kNotifyReady) ==
              NotifyResult::kFailed);
    }
    SECTION("a path nobody listens on") {
        CHECK(proxy::send_service_notification(temp_socket_path("absent"), proxy::kNotifyReady) ==
              NotifyResult::kFailed);
    }
    SECTION("a name longer than sockaddr_un holds") {
        CHECK(proxy::send_service_notification("/" + std::string(200, 'a'), proxy::kNotifyReady) ==
              NotifyResult::kFailed);
        CHECK(proxy::send_service_notification("@" + std::string(200, 'a'), proxy::kNotifyReady) ==
              NotifyResult::kFailed);
    }
    SECTION("a bare @") {
        CHECK(proxy::send_service_notification("@", proxy::kNotifyReady) == NotifyResult::kFailed);
    }
    SECTION("a vsock address") {
        CHECK(proxy::send_service_notification("vsock:2:1234", proxy::kNotifyReady) ==
              NotifyResult::kFailed);
    }
    SECTION("an empty message, even to a listening socket") {
        CHECK(proxy::send_service_notification(manager.name(), "") == NotifyResult::kFailed);
        CHECK_FALSE(manager.receive(100));
    }
}
