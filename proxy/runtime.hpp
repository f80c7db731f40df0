// State shared by every session of one pgwarden process: the live configuration (swapped
// whole on reload), TLS contexts, the cancel table and connection counts. Sessions read
// the config through a snapshot pointer, so a reload never changes one mid-statement.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

#include "policy/config.hpp"
#include "proxy/asio.hpp"
#include "proxy/cancel_registry.hpp"

namespace pgwarden::proxy {

class Runtime {
public:
    explicit Runtime(policy::Config config);

    std::shared_ptr<const policy::Config> config() const { return config_.load(std::memory_order_acquire); }
    void set_config(policy::Config config);

    asio::ssl::context* client_tls() const { return client_tls_.get(); }
    asio::ssl::context* upstream_tls() const { return upstream_tls_.get(); }

    CancelRegistry& cancels() { return cancels_; }

    std::uint64_t next_session_id() { return next_session_id_.fetch_add(1, std::memory_order_relaxed); }

    std::atomic<int> client_connections{0};
    std::atomic<int> unauthenticated{0};
    std::atomic<int> server_connections{0};
    std::atomic<bool> shutting_down{false};

private:
    std::atomic<std::shared_ptr<const policy::Config>> config_;
    std::unique_ptr<asio::ssl::context> client_tls_;
    std::unique_ptr<asio::ssl::context> upstream_tls_;
    CancelRegistry cancels_;
    std::atomic<std::uint64_t> next_session_id_{1};
};

}  // namespace pgwarden::proxy
