// The policy pipeline: every statement passes through each policy before pgwarden
// forwards it, and each policy sees the outcome afterwards. Policies are values that
// the pipeline calls; they decide, the proxy acts (relays, delays, rejects, rewrites).
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/identity.hpp"

namespace pgwarden::policy {

using Clock = std::chrono::steady_clock;

// The transaction state as pgwarden predicts it when the statement is sent: it agrees
// with the server's ReadyForQuery whenever nothing is in flight.
enum class TxState : std::uint8_t { kIdle, kInBlock, kFailed };
const char* to_string(TxState s);

// An error or notice pgwarden sends in the server's name.
struct Message {
    std::string sqlstate;
    std::string message;
    std::string detail;
    std::string hint;
};

// Which rules of a policy take a session's client (user, database, application_name,
// address and client name), remembered between its statements: a session keeps one per
// policy kind and passes it in its StatementContexts, and the policy refills it when any
// of those or the configuration changed. Only that policy reads or writes it.
struct ClientMatchCache {
    std::uint64_t policy = 0;            // the policy's serial (0: empty)
    std::uint64_t identity_version = 0;  // ClientIdentity::match_version()
    std::string client;
    std::vector<std::uint32_t> rules;    // indexes of the rules whose match takes the client

    // Makes `rules` the indexes below `count` that `takes` accepts, unless the cache was
    // already filled for this policy serial, identity and client. True when it refilled:
    // then whatever the policy keeps beside `rules` is stale too.
    template <typename Takes>
    bool refresh(std::uint64_t serial, const ClientIdentity& identity, std::string_view name, std::size_t count,
                 Takes takes) {
        if (policy == serial && identity_version == identity.match_version() && client == name) return false;
        rules.clear();
        for (std::size_t i = 0; i < count; ++i)
            if (takes(i)) rules.push_back(static_cast<std::uint32_t>(i));
        policy = serial;
        identity_version = identity.match_version();
        client.assign(name);
        return true;
    }
};

// Policies get a unique serial each, for ClientMatchCache.
std::uint64_t next_policy_serial();

// The throttles' ClientMatchCache, with where the client's buckets were found.
struct ThrottleMatchCache : ClientMatchCache {
    // For each of `rules`: where the client's bucket of that rule was found last time, so
    // that a statement need not hash the key and look it up again. Its shard's sweep count
    // says whether the bucket is still there; throttle.cpp alone reads these.
    struct BucketHint {
        std::size_t hash = 0;        // of the bucket key
        bool hashed = false;
        void* bucket = nullptr;      // the Bucket, valid while its shard's sweeps == sweeps
        std::uint64_t sweeps = 0;
    };
    std::vector<BucketHint> buckets;
};

// The rules' ClientMatchCache, with which rules' table patterns take the tables of the
// session's last statement: an application sends the same few statements again and
// again, and a table pattern costs a comparison per table each time.
struct RuleMatchCache : ClientMatchCache {
    std::vector<std::string> tables;         // of the statement the answers below are for
    std::vector<std::int8_t> table_matches;  // per rule: 1 taken, 0 not, -1 not asked yet
};

// Everything a policy may look at for one statement.
struct StatementContext {
    const StatementInfo& statement;
    std::string_view sql;            // this statement's text
    const ClientIdentity& identity;
    std::string_view client;         // resolved client name
    TxState tx = TxState::kIdle;
    int nesting_depth = 0;           // nested BEGINs inside the current block
    bool extended_protocol = false;
    std::uint64_t session_id = 0;
    ThrottleMatchCache* match_cache = nullptr;  // the session's, if it keeps one
    // When pgwarden received the statement, read once for its latency metric too; unset
    // (epoch), a policy that needs the time reads the clock itself.
    Clock::time_point arrived{};
    RuleMatchCache* rule_matches = nullptr;  // the session's, for RulePolicy
};

// A rule that matched, for metrics and logs (pgwarden_rule_hits_total{rule,action}).
struct RuleHit {
    std::string rule;
    RuleAction action;
};

// Capacity a policy set aside for a statement it delayed. If the statement will never be
// forwarded (the client went away while it waited), release() gives the capacity back
// at once, for the statements that arrive next. Releasing twice does nothing.
class Reservation {
public:
    virtual ~Reservation() = default;
    virtual void release() = 0;
};

// A throttle decision to count: pgwarden_throttle_rejected_total{rule,client}, or
// pgwarden_throttle_delayed_total{rule,client} and pgwarden_throttle_delay_seconds{rule}.
struct ThrottleEvent {
    std::string rule;
    std::string client;
    bool rejected = false;
    Clock::duration delay{};  // delayed: how long this rule holds the statement back
};

struct Verdict {
    enum class Action : std::uint8_t { kAllow, kReject, kRewrite };
    Action action = Action::kAllow;
    Message error;                   // kReject: what the client sees
    std::string rewrite_sql;         // kRewrite: sent to the server instead
    std::string client_tag;          // kRewrite: the command tag the client sees ("" = server's)
    std::optional<Clock::time_point> delay_until;  // wait before forwarding (throttling)
    std::vector<Message> notices;    // NOTICEs sent to the client before the statement's results
    std::string policy;              // which policy decided (for logs and metrics)
    std::string rule;                // which rule, if any
    std::vector<RuleHit> hits;       // every rule that matched
    std::optional<std::string> doom_reason;  // doom the current transaction ("rule", ...)
    std::vector<std::shared_ptr<Reservation>> reservations;  // release if never forwarded
    std::vector<ThrottleEvent> throttle_events;              // for metrics

    static Verdict allow() { return {}; }
    bool rejects() const { return action == Action::kReject; }
};

// What happened to a statement that reached the server.
struct Outcome {
    std::string_view command_tag;           // "" when it failed
    std::optional<std::uint64_t> rows;      // from the tag
    std::string_view sqlstate;              // "" when it succeeded
    Clock::duration duration{};
};

class Policy {
public:
    virtual ~Policy() = default;
    virtual const char* name() const = 0;
    // Called before forwarding; a policy that has nothing to say returns allow().
    virtual Verdict before(const StatementContext& context) = 0;
    // Called when the statement's result (or error) arrives.
    virtual void after(const StatementContext& /*context*/, const Outcome& /*outcome*/) {}
};

// Runs policies in order: the first rejection or rewrite wins; delays and notices of
// policies that allow are kept (the latest delay applies).
class Pipeline {
public:
    void add(std::shared_ptr<Policy> policy) { policies_.push_back(std::move(policy)); }
    bool empty() const { return policies_.empty(); }
    Verdict before(const StatementContext& context) const;
    void after(const StatementContext& context, const Outcome& outcome) const;

private:
    std::vector<std::shared_ptr<Policy>> policies_;
};

}  // namespace pgwarden::policy
