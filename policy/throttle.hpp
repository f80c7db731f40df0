// [[throttle]]: per-client (user, database, rule) write rate limits. Each rule keeps token
// buckets that delay or reject the statements it matches; the buckets outlive reloads.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "policy/config.hpp"
#include "policy/match.hpp"
#include "policy/pipeline.hpp"

namespace pgwarden::policy {

class ThrottleBuckets;  // one rule's buckets (throttle.cpp)

// The buckets of every throttle rule, for the whole process. The proxy runtime owns one
// and hands it to each ThrottlePolicy it builds, so that a reload keeps what clients have
// used: a rule keeps its buckets as long as its name stays (a changed rate or burst keeps
// each bucket's tokens, capped at the new burst; a changed `bucket` scope starts afresh
// because the old keys name different things), and the buckets of removed rules go.
// Thread-safe.
class ThrottleState {
public:
    using ClockFunction = std::function<Clock::time_point()>;
    // Tests pass a clock they move by hand; everything else uses steady_clock.
    explicit ThrottleState(ClockFunction clock = &Clock::now);
    ~ThrottleState();
    ThrottleState(const ThrottleState&) = delete;
    ThrottleState& operator=(const ThrottleState&) = delete;

    Clock::time_point now() const { return clock_(); }

private:
    friend class ThrottlePolicy;
    // Makes `rules` the current rule set and returns each rule's buckets, in order.
    std::vector<std::shared_ptr<ThrottleBuckets>> adopt(const std::vector<ThrottleRule>& rules);

    ClockFunction clock_;
    std::mutex mutex_;
    std::map<std::string, std::shared_ptr<ThrottleBuckets>, std::less<>> rules_;
};

// Decides with the rules of one configuration. Building one makes its rules the current
// ones in `state` (see ThrottleState), so build it only for a configuration that is
// going live.
//
// How a bucket works (GCRA, the "virtual scheduling" form of a token bucket): each bucket
// holds one time, its theoretical arrival time (TAT): when it would be full again if
// nothing more came. A statement costing c tokens may start once the bucket holds c
// tokens (or, when c is more than the burst, once it is full); it then pushes the TAT c
// token intervals further. A delayed statement pushes the TAT at arrival, so it owns its
// slot: whoever comes next queues behind it, and waiters on one bucket start in arrival
// order without any queue. Times are integers (2^-32 ns), so the admitted count over any
// run is exactly rate * duration + burst, with no drift.
//
// Which statements count: those of the rule's `statements` kinds ("write", or an empty
// list, meaning every statement classified as a write), from clients its `match` takes.
// COMMIT, ROLLBACK, ROLLBACK TO, RELEASE, PREPARE TRANSACTION and COMMIT/ROLLBACK
// PREPARED are never throttled, even when listed: holding back the end of a transaction
// only keeps its locks longer, and refusing it throws away work already done.
//
// cost = "row": a statement needs one token to start and reserves it; after() replaces
// that token with the rows the statement affected (0 rows: the token comes back; 10,000
// rows: the bucket goes 9,999 tokens into debt, and later writes wait or fail until it
// has refilled). A statement that fails keeps its one token.
//
// For the interceptor (how to wire it):
// - before() judges one statement (extended protocol Execute, FunctionCall, a Query of
//   one statement). A Query of several statements is admitted or rejected whole: call
//   before_batch() once with all of them instead, and do not also call before() for them
//   (run this policy outside the Pipeline, or skip it there for batched statements).
// - Call it after the policies that may reject, with the statements that will really be
//   sent: an admission that is not delayed carries no handle and cannot be given back.
// - A delayed verdict carries one Reservation in `reservations`: release() it if the
//   statement is not forwarded after all (client gone, a later policy rejected it).
// - Call after() for every statement that was admitted and reached the server (it only
//   matters for cost = "row"; a rejected statement must not reach after()).
// - `throttle_events` lists what to count: one entry per delaying rule, or the rejecting
//   rule. Verdict::rule names the rejecting rule or the one that delays longest.
// - Rejections are 53400 "pgwarden: write rate limit exceeded", DETAIL "rule R, client C",
//   HINT "retry after N ms" (until a token is due, or the penalty ends).
class ThrottlePolicy : public Policy {
public:
    ThrottlePolicy(const std::vector<ThrottleRule>& rules, std::shared_ptr<ThrottleState> state);
    ~ThrottlePolicy() override;

    const char* name() const override { return "throttle"; }
    bool empty() const { return rules_.empty(); }
    // Whether this configuration has a rule of that name (cheap, unlike describe()).
    bool has_rule(std::string_view rule_name) const;

    Verdict before(const StatementContext& context) override;
    void after(const StatementContext& context, const Outcome& outcome) override;

    // A multi-statement Query, admitted or rejected as one: each bucket is asked once for
    // the sum of what its statements cost, every bucket must admit, and when one refuses,
    // what the others reserved goes back. The statements' contexts may name different
    // clients (comment tags are per statement).
    Verdict before_batch(const std::vector<const StatementContext*>& statements);

    // For GET /api/throttles: each rule's settings, counters, and its buckets with the
    // tokens they hold now (negative: in debt) and the penalty time left. A rule's single
    // bucket (bucket = "rule") has the key "". Lists the emptiest buckets first, at most
    // kDescribedBuckets per rule; bucket_count says how many there are.
    nlohmann::json describe() const;
    static constexpr std::size_t kDescribedBuckets = 1000;

private:
    struct Compiled;
    struct Demand;
    bool exempt(const StatementInfo& statement) const;  // no rule can count it
    bool applies(const Compiled& rule, const StatementContext& context) const;
    bool counts(const Compiled& rule, const StatementInfo& statement) const;
    // The rules whose match takes the context's client, from its cache when it is current.
    ThrottleMatchCache* matching_rules(const StatementContext& context) const;
    void add_demands(const StatementContext& context, std::vector<Demand>& demands, bool merge) const;
    Verdict admit(const std::vector<Demand>& demands, Clock::time_point arrived);

    std::shared_ptr<ThrottleState> state_;
    std::uint64_t serial_ = 0;  // unique per policy, for ThrottleMatchCache
    std::vector<Compiled> rules_;
    bool any_row_cost_ = false;
    std::uint32_t listed_kinds_ = 0;  // kinds some rule lists by name (bit per StatementKind)
};

}  // namespace pgwarden::policy
