// Tells systemd (Type=notify) when pgwarden is ready, reloading or stopping: the sd_notify
// protocol spoken directly, one datagram to the AF_UNIX socket in $NOTIFY_SOCKET, no libsystemd.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace pgwarden::proxy {

// Messages from sd_notify(3). A message may hold several of them, one per line.
inline constexpr std::string_view kNotifyReady = "READY=1";        // listeners accept connections
inline constexpr std::string_view kNotifyStopping = "STOPPING=1";  // graceful shutdown began

// "RELOADING=1" with MONOTONIC_USEC, the CLOCK_MONOTONIC time systemd 253+ needs to tell
// this reload from an earlier one; older versions ignore the extra field. Send READY=1
// once the reload is over, whether or not the new configuration was accepted.
std::string notify_reloading_message();
std::string notify_reloading_message(std::uint64_t monotonic_usec);
// "STATUS=<text>" for `systemctl status`; line breaks in `text` become spaces, since a
// line break would start another field.
std::string notify_status_message(std::string_view text);

enum class NotifyResult {
    kSent,
    kNotRequested,  // $NOTIFY_SOCKET unset or empty: not started by a service manager that listens
    kFailed,        // the socket name is unusable, the message empty, or sending failed
};
const char* to_string(NotifyResult result);

// Sends `message` to the socket $NOTIFY_SOCKET names. Leaves the variable set, so later
// notifications (reloads, stopping) reach it too. Blocks for at most a second, when the
// manager's queue is full; never throws.
NotifyResult notify_service_manager(std::string_view message);

// Sends `message` to `socket_name`: an absolute path, or "@name" for a socket in the
// abstract namespace (what systemd uses). Other forms (vsock:...) are not supported.
NotifyResult send_service_notification(std::string_view socket_name, std::string_view message);

}  // namespace pgwarden::proxy
