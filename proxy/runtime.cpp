// Shared process state.
#include "proxy/runtime.hpp"

#include "proxy/tls.hpp"

namespace pgwarden::proxy {

Runtime::Runtime(policy::Config config)
    : client_tls_(make_client_side_tls(config.tls)), upstream_tls_(make_upstream_tls(config.upstream_tls)) {
    config_.store(std::make_shared<const policy::Config>(std::move(config)));
}

void Runtime::set_config(policy::Config config) {
    config_.store(std::make_shared<const policy::Config>(std::move(config)), std::memory_order_release);
}

}  // namespace pgwarden::proxy
