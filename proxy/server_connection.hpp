// pgwarden's connection to PostgreSQL: connecting (TCP, optional TLS), the startup
// packet, and what the server told us at login. Kept apart from the client session so
// that a server connection can later outlive the client that opened it (pooling).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "policy/config.hpp"
#include "proxy/asio.hpp"
#include "proxy/buffer.hpp"
#include "proxy/stream.hpp"

namespace pgwarden::proxy {

class ServerConnection {
public:
    explicit ServerConnection(asio::any_io_executor executor) : stream_(tcp::socket(executor)) {}

    // Connects and negotiates TLS per `tls_mode`. On failure returns false with a
    // human-readable `error`.
    awaitable<bool> connect(const policy::Endpoint& upstream, policy::UpstreamTlsMode tls_mode,
                            asio::ssl::context* tls, const std::string& tls_server_name,
                            std::chrono::milliseconds timeout, std::string& error);

    Stream& stream() { return stream_; }
    Buffer& buffer() { return buffer_; }

    std::int32_t process_id = 0;
    std::int32_t secret_key = 0;

private:
    Stream stream_;
    Buffer buffer_;
};

}  // namespace pgwarden::proxy
