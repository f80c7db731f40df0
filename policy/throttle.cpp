// Token buckets for [[throttle]] rules (GCRA over integer time) and the policy that asks
// every matching rule's bucket before a statement may go.
#include "policy/throttle.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>
#include <unordered_map>

namespace pgwarden::policy {

namespace {

// Times and token intervals in units of 2^-32 ns. Integers, so that adding an interval a
// million times lands exactly where multiplying it would (float accumulation drifts), and
// fine enough that a rate like 7/s, whose interval is no whole number of nanoseconds, is
// still exact to a few parts in 10^19. 64 bits would overflow: steady_clock is already
// around 2^50 ns. __int128 is a GCC/Clang extension, hence __extension__.
__extension__ typedef __int128 Fixed;
constexpr Fixed kOneNs = Fixed(1) << 32;
constexpr Fixed kOneMs = kOneNs * 1'000'000;
// Earlier than any clock reading: a bucket whose TAT is in the past is full.
constexpr Fixed kLongAgo = -(Fixed(1) << 120);

// Bounds that keep every product well below 2^127: a token comes back at least every
// 10^6 s (rate >= 1e-6/s), one statement or batch costs at most 2^40 tokens, a bucket
// owes at most 2^40 tokens, and max_delay and penalty are at most a century.
constexpr long double kMinRate = 1e-6L;
constexpr std::uint64_t kMaxTokens = std::uint64_t(1) << 40;
constexpr Duration kMaxWait = std::chrono::hours(24 * 365 * 100);

Fixed to_fixed(Clock::duration d) {
    return Fixed(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()) * kOneNs;
}
Fixed to_fixed(Clock::time_point t) { return to_fixed(t.time_since_epoch()); }
Fixed to_fixed(Duration d) { return to_fixed(std::chrono::duration_cast<Clock::duration>(std::min(d, kMaxWait))); }
// Rounded up, so that nothing starts before its slot (>> floors, also below zero).
std::int64_t ceil_ns(Fixed f) { return static_cast<std::int64_t>((f + kOneNs - 1) >> 32); }
Clock::time_point to_time_point(Fixed f) {
    return Clock::time_point(std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(ceil_ns(f))));
}
Clock::duration to_duration(Fixed f) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(ceil_ns(f)));
}
std::int64_t ceil_ms(Fixed f) { return f <= 0 ? 0 : static_cast<std::int64_t>((f + kOneMs - 1) / kOneMs); }

struct BucketParams {
    Fixed interval = kOneNs;   // how long one token takes to come back
    Fixed tolerance = kOneNs;  // burst * interval: how far past now the TAT may run
    long double burst = 1;
    bool operator==(const BucketParams&) const = default;
};

BucketParams params_of(const ThrottleRule& rule) {
    const long double rate = std::max<long double>(rule.rate, kMinRate);
    // The config loader defaults burst to the rate (at least 1); so does a rule built by hand.
    const long double burst = std::clamp<long double>(
        rule.burst > 0 ? rule.burst : std::max(rule.rate, 1.0), 1, static_cast<long double>(kMaxTokens));
    BucketParams params;
    params.interval = std::max<Fixed>(1, static_cast<Fixed>(1e9L * static_cast<long double>(kOneNs) / rate + 0.5L));
    params.burst = burst;
    // A whole burst (the usual case) multiplies exactly, so that "burst tokens at once" is
    // not lost to rounding.
    params.tolerance = burst == std::floor(burst)
                           ? static_cast<Fixed>(burst) * params.interval
                           : static_cast<Fixed>(burst * static_cast<long double>(params.interval));
    return params;
}

struct Bucket {
    Fixed tat = kLongAgo;            // theoretical arrival time: when it would be full again
    Fixed penalty_until = kLongAgo;  // it refuses everything before this
};

using BucketHint = ThrottleMatchCache::BucketHint;

// A bucket key with its hash, computed once per statement and used both to pick the
// shard and to look up inside it.
struct KeyView {
    std::string_view text;
    std::size_t hash = 0;
};
std::size_t hash_key(std::string_view text) { return std::hash<std::string_view>{}(text); }

struct KeyHash {
    using is_transparent = void;
    std::size_t operator()(const std::string& key) const { return hash_key(key); }
    std::size_t operator()(const KeyView& key) const { return key.hash; }
};
struct KeyEqual {
    using is_transparent = void;
    bool operator()(const std::string& a, const std::string& b) const { return a == b; }
    bool operator()(const KeyView& a, const std::string& b) const { return a.text == b; }
    bool operator()(const std::string& a, const KeyView& b) const { return a == b.text; }
};

// Which bucket of a rule a statement draws from; a rule-wide bucket has the key "".
std::string_view bucket_key(ThrottleBucket scope, const StatementContext& context) {
    switch (scope) {
        case ThrottleBucket::kClient: return context.client;
        case ThrottleBucket::kUser: return context.identity.user();
        case ThrottleBucket::kDatabase: return context.identity.database();
        case ThrottleBucket::kRule: return {};
    }
    return {};
}

// Transaction ends are never throttled (see throttle.hpp for why).
bool never_throttled(StatementKind kind) {
    switch (kind) {
        case StatementKind::kCommit:
        case StatementKind::kRollback:
        case StatementKind::kRollbackTo:
        case StatementKind::kRelease:
        case StatementKind::kPrepareTransaction:
        case StatementKind::kCommitPrepared:
            return true;
        default:
            return false;
    }
}

}  // namespace

// One rule's buckets, by key, in shards that each have one mutex guarding both the map and
// the buckets in it: a statement then takes one uncontended lock per matching rule (no
// per-bucket mutex, no reference counting), and clients in different shards never wait
// for each other. Each shard has its own copy of the rate so that a reload can convert
// one shard at a time.
class ThrottleBuckets {
public:
    ThrottleBuckets(std::string rule_name, ThrottleBucket bucket_scope, const BucketParams& params)
        : name(std::move(rule_name)), scope(bucket_scope) {
        for (auto& shard : shards_) shard.params = params;
    }

    const std::string name;
    const ThrottleBucket scope;
    std::atomic<std::uint64_t> delayed{0};
    std::atomic<std::uint64_t> rejected{0};

    struct Attempt {
        bool admitted = false;
        Fixed start = 0;        // admitted: when the statement may go
        Fixed retry_after = 0;  // refused: how long until it could
    };

    // Takes `tokens` for a statement arriving `now`, if it can start within `max_wait`.
    // A refusal takes nothing and, with a penalty, closes the bucket for that long.
    // `hint`, when given, is where this key's bucket was found before; it is used when no
    // sweep has run in the shard since, and updated.
    Attempt take(KeyView key, BucketHint* hint, Fixed now, std::uint64_t tokens, Fixed max_wait, Fixed penalty) {
        Shard& shard = shard_for(key);
        std::lock_guard lock(shard.mutex);
        Bucket* found = hint && hint->bucket && hint->sweeps == shard.sweeps ? static_cast<Bucket*>(hint->bucket)
                                                                            : nullptr;
        if (!found) found = &find_or_add(shard, key, now);
        if (hint) {  // after find_or_add, which may sweep
            hint->bucket = found;
            hint->sweeps = shard.sweeps;
        }
        Bucket& bucket = *found;
        if (bucket.penalty_until > now) return {false, 0, bucket.penalty_until - now};
        const Fixed cost = Fixed(std::min(tokens, kMaxTokens)) * shard.params.interval;
        // More than a burst can never be on hand: such a statement waits for a full bucket
        // and leaves it in debt.
        const Fixed need = std::min(cost, shard.params.tolerance);
        const Fixed start = std::max(now, bucket.tat + need - shard.params.tolerance);
        const Fixed wait = start - now;
        if (wait > max_wait) {
            if (penalty > 0) bucket.penalty_until = now + penalty;
            return {false, 0, std::max(wait, penalty)};
        }
        bucket.tat = std::max(bucket.tat, now) + cost;
        return {true, start, 0};
    }

    // Gives back what take() took for a statement that will not run. A bucket that is no
    // longer there was full (see sweep), so there is nothing to give back to.
    void give_back(KeyView key, std::uint64_t tokens) {
        Shard& shard = shard_for(key);
        std::lock_guard lock(shard.mutex);
        auto it = shard.buckets.find(key);
        if (it == shard.buckets.end()) return;
        it->second.tat -= Fixed(std::min(tokens, kMaxTokens)) * shard.params.interval;
    }

    // Debits (tokens > 0) or credits (tokens < 0) a bucket after the fact (cost = "row").
    void settle(KeyView key, Fixed now, std::int64_t tokens) {
        Shard& shard = shard_for(key);
        std::lock_guard lock(shard.mutex);
        const Fixed amount = Fixed(std::min(static_cast<std::uint64_t>(std::abs(tokens)), kMaxTokens)) *
                             shard.params.interval;
        if (tokens < 0) {
            auto it = shard.buckets.find(key);
            if (it != shard.buckets.end()) it->second.tat -= amount;
            return;
        }
        Bucket& bucket = find_or_add(shard, key, now);
        const Fixed deepest = now + Fixed(kMaxTokens) * shard.params.interval;
        bucket.tat = std::min(std::max(bucket.tat, now) + amount, deepest);
    }

    // A reload changed the rate or burst: each bucket keeps the tokens it holds now (or
    // owes), capped at the new burst, and refills at the new rate from here on.
    void retune(const BucketParams& params, Fixed now) {
        for (auto& shard : shards_) {
            std::lock_guard lock(shard.mutex);
            if (shard.params == params) continue;  // converting would only add rounding
            for (auto& [key, bucket] : shard.buckets) {
                const long double tokens = level(shard.params, bucket, now);
                const long double owed = params.burst - std::min(tokens, params.burst);
                bucket.tat = now + static_cast<Fixed>(owed * static_cast<long double>(params.interval));
            }
            shard.params = params;
        }
    }

    void describe(Fixed now, std::size_t limit, nlohmann::json& out) const {
        struct Row {
            std::string key;
            long double tokens;
            std::int64_t penalty_ms;
        };
        std::vector<Row> rows;
        for (const auto& shard : shards_) {
            std::lock_guard lock(shard.mutex);
            for (const auto& [key, bucket] : shard.buckets)
                rows.push_back({key, level(shard.params, bucket, now), ceil_ms(bucket.penalty_until - now)});
        }
        out["bucket_count"] = rows.size();
        std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
            return a.tokens != b.tokens ? a.tokens < b.tokens : a.key < b.key;
        });
        if (rows.size() > limit) rows.resize(limit);
        nlohmann::json buckets = nlohmann::json::array();
        for (const auto& row : rows)
            buckets.push_back({{"key", row.key},
                               {"tokens", static_cast<double>(row.tokens)},
                               {"penalty_remaining_ms", row.penalty_ms}});
        out["buckets"] = std::move(buckets);
    }

    long double burst() const {
        std::lock_guard lock(shards_[0].mutex);
        return shards_[0].params.burst;
    }

private:
    static constexpr std::size_t kShards = 16;
    // Sweeping starts once a shard holds this many buckets, then whenever it has doubled.
    static constexpr std::size_t kFirstSweep = 1024;

    struct alignas(64) Shard {
        mutable std::mutex mutex;
        BucketParams params;
        // Node-based: a bucket stays where it is until a sweep erases it.
        std::unordered_map<std::string, Bucket, KeyHash, KeyEqual> buckets;
        std::size_t sweep_at = kFirstSweep;
        // Counts every erasure of buckets (only sweep() erases): a BucketHint from before
        // one is not used. Anything that comes to erase buckets must count here too.
        std::uint64_t sweeps = 0;
    };

    Shard& shard_for(KeyView key) { return shards_[(key.hash >> 32) % kShards]; }

    // Tokens on hand (negative: owed).
    static long double level(const BucketParams& params, const Bucket& bucket, Fixed now) {
        const Fixed owed = std::max(bucket.tat, now) - now;
        return params.burst - static_cast<long double>(owed) / static_cast<long double>(params.interval);
    }

    Bucket& find_or_add(Shard& shard, KeyView key, Fixed now) {
        auto it = shard.buckets.find(key);
        if (it != shard.buckets.end()) return it->second;
        if (shard.buckets.size() >= shard.sweep_at) sweep(shard, now);
        return shard.buckets.try_emplace(std::string(key.text)).first->second;
    }

    // Forgets full buckets out of penalty, so that a stream of new client names cannot grow
    // the map for ever. A full bucket behaves exactly like a new one, so nobody notices.
    static void sweep(Shard& shard, Fixed now) {
        std::erase_if(shard.buckets, [now](const auto& entry) {
            return entry.second.tat <= now && entry.second.penalty_until <= now;
        });
        ++shard.sweeps;
        shard.sweep_at = std::max(kFirstSweep, 2 * shard.buckets.size());
    }

    std::array<Shard, kShards> shards_;
};

namespace {

// What a delayed statement holds in each bucket it passed, until it goes or is released.
class ThrottleReservation final : public Reservation {
public:
    struct Part {
        std::shared_ptr<ThrottleBuckets> buckets;
        std::string key;
        std::size_t hash = 0;
        std::uint64_t tokens = 0;
    };
    std::vector<Part> parts;

    void release() override {
        if (released_.exchange(true)) return;
        // Counted in tokens rather than time, so a reload that changed the rate meanwhile
        // gives back the right amount.
        for (const auto& part : parts) part.buckets->give_back({part.key, part.hash}, part.tokens);
    }

private:
    std::atomic<bool> released_{false};
};

Verdict rejection(const std::string& rule, std::string_view client, Fixed retry_after) {
    Verdict verdict;
    verdict.action = Verdict::Action::kReject;
    verdict.policy = "throttle";
    verdict.rule = rule;
    verdict.error = Message{"53400", "pgwarden: write rate limit exceeded",
                            "rule " + rule + ", client " + std::string(client),
                            "retry after " + std::to_string(std::max<std::int64_t>(1, ceil_ms(retry_after))) + " ms"};
    verdict.throttle_events.push_back({rule, std::string(client), true, {}});
    return verdict;
}

}  // namespace

ThrottleState::ThrottleState(ClockFunction clock) : clock_(std::move(clock)) {}
ThrottleState::~ThrottleState() = default;

std::vector<std::shared_ptr<ThrottleBuckets>> ThrottleState::adopt(const std::vector<ThrottleRule>& rules) {
    const Fixed now = to_fixed(clock_());
    std::lock_guard lock(mutex_);
    std::map<std::string, std::shared_ptr<ThrottleBuckets>, std::less<>> next;
    std::vector<std::shared_ptr<ThrottleBuckets>> adopted;
    for (const auto& rule : rules) {
        std::shared_ptr<ThrottleBuckets> buckets;
        if (auto it = next.find(rule.name); it != next.end()) {
            buckets = it->second;  // a repeated name (the config loader refuses them) shares
        } else if (auto old = rules_.find(rule.name); old != rules_.end() && old->second->scope == rule.bucket) {
            buckets = old->second;
            buckets->retune(params_of(rule), now);
        } else {
            buckets = std::make_shared<ThrottleBuckets>(rule.name, rule.bucket, params_of(rule));
        }
        next.emplace(rule.name, buckets);
        adopted.push_back(std::move(buckets));
    }
    // Policies built before keep their (now orphaned) buckets until they are dropped.
    rules_ = std::move(next);
    return adopted;
}

struct ThrottlePolicy::Compiled {
    ThrottleRule rule;
    Matcher matcher;
    KindSet kinds;  // empty: every write
    std::shared_ptr<ThrottleBuckets> buckets;
    Fixed max_wait = 0;  // 0 for action = "reject": only what is on hand now
    Fixed penalty = 0;
};

// What one rule asks of one bucket for a statement or a batch.
struct ThrottlePolicy::Demand {
    std::size_t rule = 0;
    KeyView key;              // points into the statement's context
    std::string_view client;  // for messages and metrics
    std::uint64_t tokens = 0;
    BucketHint* hint = nullptr;  // the session's, for a Query of one statement
};

ThrottlePolicy::ThrottlePolicy(const std::vector<ThrottleRule>& rules, std::shared_ptr<ThrottleState> state)
    : state_(std::move(state)) {
    serial_ = next_policy_serial();
    auto buckets = state_->adopt(rules);
    rules_.reserve(rules.size());
    for (std::size_t i = 0; i < rules.size(); ++i) {
        const ThrottleRule& rule = rules[i];
        Compiled compiled{rule, Matcher(rule.match), KindSet(rule.statements), buckets[i]};
        compiled.max_wait = rule.action == ThrottleAction::kDelay ? to_fixed(rule.max_delay) : 0;
        compiled.penalty = to_fixed(rule.penalty);
        any_row_cost_ = any_row_cost_ || rule.cost == ThrottleCost::kRow;
        for (std::size_t kind = 0; kind < kStatementKindCount; ++kind)
            if (compiled.kinds.contains(static_cast<StatementKind>(kind))) listed_kinds_ |= 1u << kind;
        rules_.push_back(std::move(compiled));
    }
}

ThrottlePolicy::~ThrottlePolicy() = default;

bool ThrottlePolicy::has_rule(std::string_view rule_name) const {
    return std::any_of(rules_.begin(), rules_.end(), [&](const Compiled& c) { return c.rule.name == rule_name; });
}

static_assert(kStatementKindCount <= 32, "listed_kinds_ has a bit per statement kind");

bool ThrottlePolicy::exempt(const StatementInfo& statement) const {
    if (never_throttled(statement.kind)) return true;
    // Most statements are reads, and most rules take only writes: decide those at once.
    return !statement.is_write && (listed_kinds_ & (1u << static_cast<unsigned>(statement.kind))) == 0;
}

bool ThrottlePolicy::counts(const Compiled& rule, const StatementInfo& statement) const {
    return rule.kinds.empty() ? statement.is_write : rule.kinds.matches(statement);
}

bool ThrottlePolicy::applies(const Compiled& rule, const StatementContext& context) const {
    return counts(rule, context.statement) && rule.matcher.matches_client(context.identity, context.client);
}

ThrottleMatchCache* ThrottlePolicy::matching_rules(const StatementContext& context) const {
    ThrottleMatchCache* cache = context.match_cache;
    if (!cache) return nullptr;
    const bool refilled = cache->refresh(serial_, context.identity, context.client, rules_.size(), [&](std::size_t i) {
        return rules_[i].matcher.matches_client(context.identity, context.client);
    });
    // The keys may have changed with the client, and the buckets with the policy.
    if (refilled) cache->buckets.assign(cache->rules.size(), BucketHint{});
    return cache;
}

void ThrottlePolicy::add_demands(const StatementContext& context, std::vector<Demand>& demands, bool merge) const {
    // Rules of one scope share the key: hash it once.
    std::array<std::optional<KeyView>, 4> keys;
    ThrottleMatchCache* cache = matching_rules(context);
    const std::vector<std::uint32_t>* cached = cache ? &cache->rules : nullptr;
    const std::size_t candidates = cached ? cached->size() : rules_.size();
    for (std::size_t n = 0; n < candidates; ++n) {
        const std::size_t i = cached ? (*cached)[n] : n;
        const Compiled& rule = rules_[i];
        if (cached ? !counts(rule, context.statement) : !applies(rule, context)) continue;
        // The session's hints hold while the cache does; with several statements in a
        // Query, the next statement's client may refill the cache before admit() runs.
        BucketHint* hint = cached && !merge ? &cache->buckets[n] : nullptr;
        auto& key = keys[static_cast<std::size_t>(rule.rule.bucket)];
        if (!key) {
            const std::string_view text = bucket_key(rule.rule.bucket, context);
            key = KeyView{text, hint && hint->hashed ? hint->hash : hash_key(text)};
        }
        if (hint && !hint->hashed) {
            hint->hash = key->hash;
            hint->hashed = true;
        }
        // One token per statement; a row-cost statement reserves one and settles in after().
        if (merge) {
            auto same = std::find_if(demands.begin(), demands.end(),
                                     [&](const Demand& d) { return d.rule == i && d.key.text == key->text; });
            if (same != demands.end()) {
                ++same->tokens;
                continue;
            }
        }
        demands.push_back({i, *key, context.client, 1, hint});
    }
}

Verdict ThrottlePolicy::before(const StatementContext& context) {
    if (rules_.empty() || exempt(context.statement)) return Verdict::allow();
    // Reused per thread: the common path allocates nothing.
    thread_local std::vector<Demand> demands;
    demands.clear();
    add_demands(context, demands, false);
    if (demands.empty()) return Verdict::allow();
    return admit(demands, context.arrived);
}

Verdict ThrottlePolicy::before_batch(const std::vector<const StatementContext*>& statements) {
    if (rules_.empty()) return Verdict::allow();
    // Reused per thread, as in before(); a Query of one statement has nothing to merge.
    thread_local std::vector<Demand> demands;
    demands.clear();
    const bool merge = statements.size() > 1;
    for (const StatementContext* context : statements)
        if (!exempt(context->statement)) add_demands(*context, demands, merge);
    if (demands.empty()) return Verdict::allow();
    return admit(demands, statements.front()->arrived);
}

Verdict ThrottlePolicy::admit(const std::vector<Demand>& demands, Clock::time_point arrived) {
    // The clock costs more than the rest of an admission on some hosts (50-90 ns here):
    // the proxy's own reading, taken when the statement arrived, serves.
    const Fixed now = to_fixed(arrived != Clock::time_point{} ? arrived : state_->now());
    thread_local std::vector<Fixed> starts;
    starts.assign(demands.size(), now);
    std::size_t latest = demands.size();  // the demand that waits longest, if any waits
    for (std::size_t i = 0; i < demands.size(); ++i) {
        const Demand& demand = demands[i];
        const Compiled& rule = rules_[demand.rule];
        const auto attempt =
            rule.buckets->take(demand.key, demand.hint, now, demand.tokens, rule.max_wait, rule.penalty);
        if (!attempt.admitted) {
            // Every rule must admit: what the rules before this one reserved goes back.
            for (std::size_t j = 0; j < i; ++j)
                rules_[demands[j].rule].buckets->give_back(demands[j].key, demands[j].tokens);
            rule.buckets->rejected.fetch_add(1, std::memory_order_relaxed);
            return rejection(rule.rule.name, demand.client, attempt.retry_after);
        }
        starts[i] = attempt.start;
        if (attempt.start > now && (latest == demands.size() || attempt.start > starts[latest])) latest = i;
    }
    if (latest == demands.size()) return Verdict::allow();

    Verdict verdict;
    verdict.policy = "throttle";
    verdict.rule = rules_[demands[latest].rule].rule.name;
    verdict.delay_until = to_time_point(starts[latest]);
    auto reservation = std::make_shared<ThrottleReservation>();
    for (std::size_t i = 0; i < demands.size(); ++i) {
        const Demand& demand = demands[i];
        const Compiled& rule = rules_[demand.rule];
        reservation->parts.push_back({rule.buckets, std::string(demand.key.text), demand.key.hash, demand.tokens});
        if (starts[i] > now) {
            rule.buckets->delayed.fetch_add(1, std::memory_order_relaxed);
            verdict.throttle_events.push_back({rule.rule.name, std::string(demand.client), false, to_duration(starts[i] - now)});
        }
    }
    verdict.reservations.push_back(std::move(reservation));
    return verdict;
}

void ThrottlePolicy::after(const StatementContext& context, const Outcome& outcome) {
    if (!any_row_cost_ || exempt(context.statement)) return;
    // The statement reserved one token; its real cost is the rows it affected. Without a
    // row count (it failed, or its tag has none) the one token stands.
    if (!outcome.rows) return;
    const auto rows = static_cast<std::int64_t>(std::min<std::uint64_t>(*outcome.rows, kMaxTokens));
    if (rows == 1) return;
    const Fixed now = to_fixed(state_->now());
    for (const Compiled& rule : rules_) {
        if (rule.rule.cost != ThrottleCost::kRow || !applies(rule, context)) continue;
        const std::string_view key = bucket_key(rule.rule.bucket, context);
        rule.buckets->settle({key, hash_key(key)}, now, rows - 1);
    }
}

nlohmann::json ThrottlePolicy::describe() const {
    const Fixed now = to_fixed(state_->now());
    nlohmann::json out = nlohmann::json::array();
    for (const Compiled& compiled : rules_) {
        const ThrottleRule& rule = compiled.rule;
        nlohmann::json entry = {
            {"name", rule.name},
            {"rate", rule.rate},
            {"burst", static_cast<double>(compiled.buckets->burst())},
            {"statements", rule.statements.empty() ? std::vector<std::string>{"write"} : rule.statements},
            {"cost", to_string(rule.cost)},
            {"bucket", to_string(rule.bucket)},
            {"action", to_string(rule.action)},
            {"max_delay_ms", rule.max_delay.count()},
            {"penalty_ms", rule.penalty.count()},
            {"delayed_total", compiled.buckets->delayed.load(std::memory_order_relaxed)},
            {"rejected_total", compiled.buckets->rejected.load(std::memory_order_relaxed)},
        };
        compiled.buckets->describe(now, kDescribedBuckets, entry);
        out.push_back(std::move(entry));
    }
    return out;
}

}  // namespace pgwarden::policy
