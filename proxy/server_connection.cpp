// Connecting to PostgreSQL.
#include "proxy/server_connection.hpp"

#include "proxy/deadline.hpp"
#include "wire/builder.hpp"

namespace pgwarden::proxy {

awaitable<bool> ServerConnection::connect(const policy::Endpoint& upstream, policy::UpstreamTlsMode tls_mode,
                                          asio::ssl::context* tls, const std::string& tls_server_name,
                                          std::chrono::milliseconds timeout, std::string& error) {
    auto executor = co_await asio::this_coro::executor;
    error_code ec;
    tcp::resolver resolver(executor);
    auto endpoints = co_await resolver.async_resolve(upstream.host, std::to_string(upstream.port),
                                                     asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
        error = "cannot resolve " + upstream.host + ": " + ec.message();
        co_return false;
    }
    // The whole setup, TLS included, must finish within the connect timeout.
    Deadline deadline(executor, timeout, [this] { stream_.close(); });
    co_await asio::async_connect(stream_.socket(), endpoints, asio::redirect_error(asio::use_awaitable, ec));
    if (deadline.expired()) {
        error = "connection timed out";
        co_return false;
    }
    if (ec) {
        error = ec.message();
        co_return false;
    }
    stream_.socket().set_option(tcp::no_delay(true), ec);
    stream_.socket().set_option(asio::socket_base::keep_alive(true), ec);

    if (tls_mode == policy::UpstreamTlsMode::kDisable || tls == nullptr) co_return true;

    std::string request;
    wire::append_ssl_request(request);
    co_await stream_.write(asio::buffer(request), ec);
    char answer = 0;
    if (!ec) co_await stream_.read_exact(asio::buffer(&answer, 1), ec);
    if (ec) {
        error = deadline.expired() ? "TLS negotiation timed out" : "TLS negotiation failed: " + ec.message();
        co_return false;
    }
    if (answer == 'S') {
        bool verify = tls_mode == policy::UpstreamTlsMode::kVerifyFull;
        std::string name = tls_server_name.empty() ? upstream.host : tls_server_name;
        co_await stream_.connect_tls(*tls, name, verify, ec);
        if (ec) {
            error = "TLS handshake with upstream failed: " + ec.message();
            co_return false;
        }
        co_return true;
    }
    if (answer != 'N') {
        error = "upstream answered SSLRequest with an unexpected byte";
        co_return false;
    }
    if (tls_mode == policy::UpstreamTlsMode::kPrefer) co_return true;
    error = "upstream does not support TLS but upstream_tls mode requires it";
    co_return false;
}

}  // namespace pgwarden::proxy
