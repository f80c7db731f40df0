// Combining the verdicts of several policies.
#include "policy/pipeline.hpp"

#include <atomic>

namespace pgwarden::policy {

std::uint64_t next_policy_serial() {
    static std::atomic<std::uint64_t> serials{0};
    return serials.fetch_add(1, std::memory_order_relaxed) + 1;
}

const char* to_string(TxState s) {
    switch (s) {
        case TxState::kIdle: return "idle";
        case TxState::kInBlock: return "in_transaction";
        case TxState::kFailed: return "failed_transaction";
    }
    return "unknown";
}

Verdict Pipeline::before(const StatementContext& context) const {
    // One policy (the usual case: the rules) has nothing to combine with.
    if (policies_.size() == 1) return policies_.front()->before(context);
    Verdict combined;
    for (const auto& policy : policies_) {
        Verdict v = policy->before(context);
        for (auto& n : v.notices) combined.notices.push_back(std::move(n));
        for (auto& h : v.hits) combined.hits.push_back(std::move(h));
        // Kept whatever decides: a delay reserved before a later rejection must still be
        // released, and every throttle decision counted.
        for (auto& r : v.reservations) combined.reservations.push_back(std::move(r));
        for (auto& e : v.throttle_events) combined.throttle_events.push_back(std::move(e));
        if (v.doom_reason && !combined.doom_reason) {
            combined.doom_reason = v.doom_reason;
            combined.rule = v.rule;
        }
        if (v.delay_until && (!combined.delay_until || *v.delay_until > *combined.delay_until))
            combined.delay_until = v.delay_until;
        if (v.action != Verdict::Action::kAllow) {
            v.notices = std::move(combined.notices);
            v.hits = std::move(combined.hits);
            v.reservations = std::move(combined.reservations);
            v.throttle_events = std::move(combined.throttle_events);
            if (!v.doom_reason) v.doom_reason = combined.doom_reason;
            if (!v.delay_until) v.delay_until = combined.delay_until;
            return v;
        }
    }
    return combined;
}

void Pipeline::after(const StatementContext& context, const Outcome& outcome) const {
    for (const auto& policy : policies_) policy->after(context, outcome);
}

}  // namespace pgwarden::policy
