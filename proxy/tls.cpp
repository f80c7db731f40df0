// TLS context setup.
#include "proxy/tls.hpp"

#include <openssl/ssl.h>

#include <stdexcept>

namespace pgwarden::proxy {
namespace {

void harden(asio::ssl::context& ctx) {
    SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION);
    // Forward-secret AEAD suites only for TLS 1.2; TLS 1.3 suites are all fine.
    SSL_CTX_set_cipher_list(ctx.native_handle(),
                            "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!RC4");
    ctx.set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_compression |
                    asio::ssl::context::single_dh_use);
}

}  // namespace

std::unique_ptr<asio::ssl::context> make_client_side_tls(const policy::ClientTlsConfig& config) {
    if (config.mode == policy::ClientTlsMode::kDisable) return nullptr;
    auto ctx = std::make_unique<asio::ssl::context>(asio::ssl::context::tls_server);
    harden(*ctx);
    boost::system::error_code ec;
    ctx->use_certificate_chain_file(config.cert_file, ec);
    if (ec) throw std::runtime_error("cannot load TLS certificate " + config.cert_file + ": " + ec.message());
    ctx->use_private_key_file(config.key_file, asio::ssl::context::pem, ec);
    if (ec) throw std::runtime_error("cannot load TLS key " + config.key_file + ": " + ec.message());
    return ctx;
}

std::unique_ptr<asio::ssl::context> make_upstream_tls(const policy::UpstreamTlsConfig& config) {
    if (config.mode == policy::UpstreamTlsMode::kDisable) return nullptr;
    auto ctx = std::make_unique<asio::ssl::context>(asio::ssl::context::tls_client);
    harden(*ctx);
    boost::system::error_code ec;
    if (config.mode == policy::UpstreamTlsMode::kVerifyFull) {
        if (config.ca_file.empty())
            ctx->set_default_verify_paths(ec);
        else
            ctx->load_verify_file(config.ca_file, ec);
        if (ec) throw std::runtime_error("cannot load upstream CA " + config.ca_file + ": " + ec.message());
    }
    return ctx;
}

}  // namespace pgwarden::proxy
