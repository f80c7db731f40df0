// Shared process state.
#include "proxy/runtime.hpp"

#include "proxy/tls.hpp"

namespace pgwarden::proxy {

Policies::Policies(const policy::Config& config, std::shared_ptr<policy::ThrottleState> throttle_state)
    : rules(std::make_shared<policy::RulePolicy>(config.rules)) {
    if (!config.rules.empty()) pipeline.add(rules);
    // Built even without rules, so that a reload that removes every throttle drops
    // their buckets from the shared state.
    auto t = std::make_shared<policy::ThrottlePolicy>(config.throttles, std::move(throttle_state));
    if (!t->empty()) throttle = std::move(t);
}

bool Policies::has_throttle(const std::string& rule) const {
    return throttle && throttle->has_rule(rule);
}

Runtime::Runtime(policy::Config config)
    : client_tls_(make_client_side_tls(config.tls)), upstream_tls_(make_upstream_tls(config.upstream_tls)) {
    policies_.store(std::make_shared<const Policies>(config, throttle_state_));
    config_.store(std::make_shared<const policy::Config>(std::move(config)));
}

void Runtime::set_config(policy::Config config) {
    policies_.store(std::make_shared<const Policies>(config, throttle_state_), std::memory_order_release);
    config_.store(std::make_shared<const policy::Config>(std::move(config)), std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
}

policy::Classifier& Runtime::classifier() {
    struct PerThread {
        std::uint64_t generation = 0;
        std::vector<std::string> write_functions;
        std::size_t cache_entries = 0;
        std::unique_ptr<policy::Classifier> classifier;
    };
    thread_local PerThread mine;
    std::uint64_t now = generation_.load(std::memory_order_acquire);
    if (!mine.classifier || mine.generation != now) {
        auto config = this->config();
        if (!mine.classifier || mine.write_functions != config->classify.write_functions ||
            mine.cache_entries != config->classify.cache_entries) {
            mine.classifier = std::make_unique<policy::Classifier>(config->classify);
            mine.write_functions = config->classify.write_functions;
            mine.cache_entries = config->classify.cache_entries;
        }
        mine.generation = now;
    }
    return *mine.classifier;
}

}  // namespace pgwarden::proxy
