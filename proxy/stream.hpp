// A byte stream to a client or to PostgreSQL: a TCP socket that may be upgraded to TLS
// in the middle of the startup phase (after SSLRequest). The TLS state is only
// allocated for connections that use it, so plain sessions stay small.
#pragma once
#include <memory>

#include "proxy/asio.hpp"

namespace pgwarden::proxy {

using boost::system::error_code;

class Stream {
public:
    explicit Stream(tcp::socket socket) : socket_(std::move(socket)) {}

    tcp::socket& socket() { return socket_; }
    bool is_tls() const { return tls_ != nullptr; }
    bool is_open() const { return socket_.is_open(); }

    // Reads at least one byte; 0 bytes and `ec` set on error or end of stream.
    awaitable<std::size_t> read_some(asio::mutable_buffer buffer, error_code& ec);
    // Reads exactly buffer.size() bytes.
    awaitable<std::size_t> read_exact(asio::mutable_buffer buffer, error_code& ec);
    // Writes all of `buffers` (a buffer sequence), in one gathering write where possible.
    template <class ConstBufferSequence>
    awaitable<void> write(const ConstBufferSequence& buffers, error_code& ec) {
        auto token = asio::redirect_error(asio::use_awaitable, ec);
        if (tls_)
            co_await asio::async_write(*tls_, buffers, token);
        else
            co_await asio::async_write(socket_, buffers, token);
    }

    // TLS handshakes; on failure `ec` is set and the stream stays plain.
    awaitable<void> accept_tls(asio::ssl::context& context, error_code& ec);
    awaitable<void> connect_tls(asio::ssl::context& context, const std::string& verify_name,
                                bool verify, error_code& ec);

    // Close both directions at once; safe to call twice.
    void close();

private:
    tcp::socket socket_;
    std::unique_ptr<asio::ssl::stream<tcp::socket&>> tls_;
};

}  // namespace pgwarden::proxy
