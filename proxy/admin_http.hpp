// The admin HTTP listener: /metrics, health checks and the JSON API (SPEC.md "Metrics and
// admin"). It reads requests and writes the answers admin_routes.hpp gives; what each route
// does comes from AdminHandlers.
#pragma once
#include "proxy/asio.hpp"

#include <memory>
#include <string>

#include "policy/config.hpp"
#include "proxy/admin_routes.hpp"

namespace pgwarden::proxy {

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
