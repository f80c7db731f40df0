// Plain-or-TLS stream operations.
#include "proxy/stream.hpp"

#include <openssl/ssl.h>

namespace pgwarden::proxy {

awaitable<std::size_t> Stream::read_some(asio::mutable_buffer buffer, error_code& ec) {
    std::size_t n = 0;
    if (try_read(buffer, n, ec)) co_return n;
    co_return co_await wait_read(buffer, ec);
}

awaitable<std::size_t> Stream::read_exact(asio::mutable_buffer buffer, error_code& ec) {
    auto token = asio::redirect_error(asio::use_awaitable, ec);
    if (tls_) co_return co_await asio::async_read(*tls_, buffer, token);
    co_return co_await asio::async_read(socket_, buffer, token);
}

awaitable<void> Stream::accept_tls(asio::ssl::context& context, error_code& ec) {
    auto tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, context);
    co_await tls->async_handshake(asio::ssl::stream_base::server,
                                  asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) tls_ = std::move(tls);
}

awaitable<void> Stream::connect_tls(asio::ssl::context& context, const std::string& verify_name,
                                    bool verify, error_code& ec) {
    auto tls = std::make_unique<asio::ssl::stream<tcp::socket&>>(socket_, context);
    if (verify) {
        tls->set_verify_mode(asio::ssl::verify_peer);
        tls->set_verify_callback(asio::ssl::host_name_verification(verify_name));
    } else {
        tls->set_verify_mode(asio::ssl::verify_none);
    }
    // SNI only makes sense for names, not addresses.
    error_code parse_ec;
    asio::ip::make_address(verify_name, parse_ec);
    if (parse_ec) SSL_set_tlsext_host_name(tls->native_handle(), verify_name.c_str());
    co_await tls->async_handshake(asio::ssl::stream_base::client,
                                  asio::redirect_error(asio::use_awaitable, ec));
    if (!ec) tls_ = std::move(tls);
}

void Stream::close() {
    error_code ignored;
    if (socket_.is_open()) {
        socket_.shutdown(tcp::socket::shutdown_both, ignored);
        socket_.close(ignored);
    }
}

}  // namespace pgwarden::proxy
