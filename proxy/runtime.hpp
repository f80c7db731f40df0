// State shared by every session of one pgwarden process: the live configuration (swapped
// whole on reload), TLS contexts, the cancel table and connection counts. Sessions read
// the config through a snapshot pointer, so a reload never changes one mid-statement.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/pipeline.hpp"
#include "policy/rules.hpp"
#include "policy/throttle.hpp"
#include "proxy/asio.hpp"
#include "proxy/cancel_registry.hpp"
#include "proxy/session_directory.hpp"

namespace pgwarden::proxy {

// The policies built from one configuration; replaced whole on reload.
struct Policies {
    Policies(const policy::Config& config, std::shared_ptr<policy::ThrottleState> throttle_state);
    policy::Pipeline pipeline;  // rules: per statement
    std::shared_ptr<policy::RulePolicy> rules;
    // Throttles judge a whole Query at once (admitted or rejected whole), so they run
    // after the pipeline rather than in it. Null when no [[throttle]] is configured.
    std::shared_ptr<policy::ThrottlePolicy> throttle;
    bool has_throttle(const std::string& rule) const;
};

class Runtime {
public:
    explicit Runtime(policy::Config config);

    std::shared_ptr<const policy::Config> config() const { return config_.load(std::memory_order_acquire); }
    void set_config(policy::Config config);
    std::shared_ptr<const Policies> policies() const { return policies_.load(std::memory_order_acquire); }
    // The calling thread's classifier (libpg_query and its cache are per thread), rebuilt
    // when a reload changes what classification depends on.
    policy::Classifier& classifier();

    asio::ssl::context* client_tls() const { return client_tls_.get(); }
    asio::ssl::context* upstream_tls() const { return upstream_tls_.get(); }

    CancelRegistry& cancels() { return cancels_; }
    SessionDirectory& sessions() { return sessions_; }

    std::uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
    std::uint64_t next_session_id() { return next_session_id_.fetch_add(1, std::memory_order_relaxed); }

    std::atomic<int> client_connections{0};
    std::atomic<int> unauthenticated{0};
    std::atomic<int> server_connections{0};
    std::atomic<bool> shutting_down{false};

private:
    std::atomic<std::shared_ptr<const policy::Config>> config_;
    std::shared_ptr<policy::ThrottleState> throttle_state_ = std::make_shared<policy::ThrottleState>();
    std::atomic<std::shared_ptr<const Policies>> policies_;
    std::atomic<std::uint64_t> generation_{1};
    std::unique_ptr<asio::ssl::context> client_tls_;
    std::unique_ptr<asio::ssl::context> upstream_tls_;
    CancelRegistry cancels_;
    SessionDirectory sessions_;
    std::atomic<std::uint64_t> next_session_id_{1};
};

}  // namespace pgwarden::proxy
