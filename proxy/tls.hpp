// TLS contexts for both sides: the one pgwarden presents to clients (after SSLRequest)
// and the one it uses towards PostgreSQL. TLS 1.2 is the floor on both.
#pragma once
#include <memory>
#include <string>

#include "policy/config.hpp"
#include "proxy/asio.hpp"

namespace pgwarden::proxy {

// nullptr when mode is disable. Throws std::runtime_error with a readable message when
// the certificate or key cannot be loaded.
std::unique_ptr<asio::ssl::context> make_client_side_tls(const policy::ClientTlsConfig& config);
std::unique_ptr<asio::ssl::context> make_upstream_tls(const policy::UpstreamTlsConfig& config);

}  // namespace pgwarden::proxy
