// The admin HTTP listener: /metrics, health checks and the JSON API (SPEC.md "Metrics and
// admin"). It only routes and guards requests; what each route does comes from AdminHandlers.
#pragma once
#include "proxy/asio.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "policy/config.hpp"

namespace pgwarden::proxy {

// What the routes call. Called on the admin server's strands, possibly from several threads
// of the io_context at once, so they must be thread-safe. An empty function makes its route
// answer 501; an exception answers 500 with its message.
struct AdminHandlers {
    std::function<std::string()> metrics;  // exposition text
    std::function<bool()> ready;           // upstream reachable
    std::function<nlohmann::json()> clients;
    // nullopt when the client was doomed, else why not (the id is unknown).
    std::function<std::optional<std::string>(std::uint64_t id, const std::string& reason)> doom;
    std::function<std::pair<bool, std::string>()> reload;  // ok, message
    std::function<nlohmann::json()> throttles;
};

// Bounds that keep a misbehaving admin client from holding memory or connections.
struct AdminLimits {
    std::size_t max_header_bytes = 8 * 1024;
    std::size_t max_body_bytes = 64 * 1024;
    // For each request to arrive (idle keep-alive included) and each response to be sent.
    std::chrono::milliseconds io_timeout{std::chrono::seconds(10)};
    std::size_t max_connections = 64;  // further clients wait in the listen backlog
};

// The reason a POST /api/clients/{id}/doom without a body gives.
inline constexpr const char* kDefaultDoomReason = "admin request";

class AdminServer {
public:
    AdminServer(asio::io_context& io, const policy::AdminConfig& config, AdminHandlers handlers,
                AdminLimits limits = {});
    // Stops; connections still open wind down as the io_context runs. The io_context must
    // outlive this object.
    ~AdminServer();
    AdminServer(const AdminServer&) = delete;
    AdminServer& operator=(const AdminServer&) = delete;

    // Binds and listens now (throws std::system_error when it cannot), then serves on the
    // io_context until stop(). Does nothing when the config disables the admin listener.
    void start();
    // Closes the listener and every open connection; safe from any thread.
    void stop();
    tcp::endpoint local_endpoint() const;  // the bound address, with the real port for :0
    // Replaces the bearer token /api/* requires (empty: none); for config reloads.
    void set_token(std::string token);

    struct State;  // opaque; named here only so admin_http.cpp's coroutines can share it

private:
    std::shared_ptr<State> state_;
};

}  // namespace pgwarden::proxy
