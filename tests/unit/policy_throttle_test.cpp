// Tests for write throttling: bucket arithmetic over long runs, arrival order, delay and
// reject actions, penalties, row cost, several rules and batches, reloads and threads.
// Time is a hand-moved clock, so every expected delay is exact.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "policy/throttle.hpp"

using namespace pgwarden::policy;
using namespace std::chrono_literals;

namespace {

// A steady clock that only moves when told to; thread-safe.
class ManualClock {
public:
    Clock::time_point now() const { return Clock::time_point(Clock::duration(ns_.load())); }
    void advance(Clock::duration d) { ns_ += d.count(); }

private:
    // Far from zero, like a real steady_clock, so nothing relies on starting at the epoch.
    std::atomic<Clock::rep> ns_{std::chrono::duration_cast<Clock::duration>(1234567s).count() + 89};
};

struct Client {
    ClientIdentity identity;
    std::string name;
};

Client client(const std::string& name, const std::string& user = "app", const std::string& database = "shop") {
    return {ClientIdentity({{"user", user}, {"database", database}, {"application_name", "web"}}, "10.1.2.3"),
            name};
}

StatementInfo statement(StatementKind kind, bool is_write) {
    StatementInfo info;
    info.kind = kind;
    info.is_write = is_write;
    return info;
}
const StatementInfo kInsert = statement(StatementKind::kInsert, true);
const StatementInfo kUpdate = statement(StatementKind::kUpdate, true);
const StatementInfo kSelect = statement(StatementKind::kSelect, false);
const StatementInfo kSelectNextval = statement(StatementKind::kSelect, true);

ThrottleRule rule(const std::string& name, double rate, double burst, ThrottleAction action = ThrottleAction::kReject) {
    ThrottleRule r;
    r.name = name;
    r.rate = rate;
    r.burst = burst;
    r.action = action;
    return r;
}

ThrottleRule delay_rule(const std::string& name, double rate, double burst, Duration max_delay) {
    ThrottleRule r = rule(name, rate, burst, ThrottleAction::kDelay);
    r.max_delay = max_delay;
    return r;
}

struct Harness {
    ManualClock clock;
    std::shared_ptr<ThrottleState> state = std::make_shared<ThrottleState>([this] { return clock.now(); });

    std::unique_ptr<ThrottlePolicy> policy(const std::vector<ThrottleRule>& rules) {
        return std::make_unique<ThrottlePolicy>(rules, state);
    }
};

Verdict run(ThrottlePolicy& policy, const Client& who, const StatementInfo& info = kInsert) {
    StatementContext context{info, "", who.identity, who.name};
    return policy.before(context);
}

void finish(ThrottlePolicy& policy, const Client& who, std::optional<std::uint64_t> rows,
            const StatementInfo& info = kInsert) {
    StatementContext context{info, "", who.identity, who.name};
    Outcome outcome;
    outcome.rows = rows;
    policy.after(context, outcome);
}

// How long the verdict holds the statement back (0 when it may go at once).
Clock::duration delay_of(const Verdict& verdict, const ManualClock& clock) {
    REQUIRE_FALSE(verdict.rejects());
    return verdict.delay_until ? *verdict.delay_until - clock.now() : Clock::duration::zero();
}

const nlohmann::json& rule_entry(const nlohmann::json& described, const std::string& name) {
    for (const auto& entry : described)
        if (entry["name"] == name) return entry;
    FAIL("no rule " << name << " in " << described.dump());
    static const nlohmann::json none;
    return none;
}

// Tokens on hand in one bucket, as the admin API shows them.
double tokens(const ThrottlePolicy& policy, const std::string& rule, const std::string& key) {
    const nlohmann::json described = policy.describe();
    for (const auto& bucket : rule_entry(described, rule)["buckets"])
        if (bucket["key"] == key) return bucket["tokens"].get<double>();
    FAIL("no bucket " << key << " in rule " << rule << ": " << described.dump());
    return 0;
}

}  // namespace

TEST_CASE("over a long run a bucket admits exactly rate * duration + burst", "[throttle]") {
    struct Case {
        double rate, burst;
        Clock::duration step, duration;
    };
    // Rates with whole-nanosecond intervals and without (rounding those would drift).
    // Attempts come faster than the rate; a burst of at least 2 carries over the part of a
    // step between a token's return and the next attempt (with 1, polling loses it).
    auto c = GENERATE(values<Case>({{50, 100, 5ms, 600s}, {7.3, 3, 10ms, 2000s}, {3, 2, 4ms, 1000s}}));
    Harness h;
    auto policy = h.policy({rule("r", c.rate, c.burst)});
    const Client who = client("tenant:1");
    std::int64_t admitted = 0;
    for (Clock::duration t{}; t < c.duration; t += c.step) {
        if (!run(*policy, who).rejects()) ++admitted;
        h.clock.advance(c.step);
    }
    const double expected = c.rate * std::chrono::duration<double>(c.duration).count() + c.burst;
    INFO("rate " << c.rate << " burst " << c.burst << ": admitted " << admitted << ", expected " << expected);
    CHECK(std::abs(admitted - expected) <= 1.0);
    CHECK(std::abs(admitted - expected) <= expected * 0.001);
}

TEST_CASE("reservations do not drift: the 100,000th slot is where arithmetic puts it", "[throttle]") {
    Harness h;
    // 7 per second: one token every 142857142.857... ns.
    auto policy = h.policy({delay_rule("r", 7, 1, std::chrono::hours(100))});
    const Client who = client("c");
    const auto start = h.clock.now();
    constexpr std::int64_t kCount = 100'000;
    Verdict last;
    for (std::int64_t i = 0; i < kCount; ++i) last = run(*policy, who);
    // Statement i (from 0) may start i/7 s after the first.
    const std::int64_t i = kCount - 1;
    const std::int64_t expected_ns = (i * 1'000'000'000 + 6) / 7;  // rounded up, as the policy does
    REQUIRE(last.delay_until);
    const auto got_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(*last.delay_until - start).count();
    CHECK(std::abs(got_ns - expected_ns) <= 1);
}

TEST_CASE("waiters on one bucket are admitted in arrival order", "[throttle]") {
    Harness h;
    ThrottleRule r = delay_rule("shared", 10, 1, 10s);
    r.bucket = ThrottleBucket::kRule;
    auto policy = h.policy({r});
    std::vector<Clock::duration> delays;
    for (const char* name : {"a", "b", "c", "d", "e"}) delays.push_back(delay_of(run(*policy, client(name)), h.clock));
    CHECK(delays == std::vector<Clock::duration>{0ms, 100ms, 200ms, 300ms, 400ms});
    // A later arrival queues behind every reservation made before it.
    h.clock.advance(10ms);
    CHECK(delay_of(run(*policy, client("f")), h.clock) == 490ms);
    h.clock.advance(1s);
    CHECK(delay_of(run(*policy, client("g")), h.clock) == 0ms);
}

TEST_CASE("a delay longer than max_delay is a rejection that reserves nothing", "[throttle]") {
    Harness h;
    auto policy = h.policy({delay_rule("web", 10, 1, 250ms)});
    const Client who = client("tenant:7");
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    CHECK(delay_of(run(*policy, who), h.clock) == 100ms);
    Verdict delayed = run(*policy, who);
    CHECK(delay_of(delayed, h.clock) == 200ms);
    CHECK(delayed.policy == "throttle");
    CHECK(delayed.rule == "web");
    REQUIRE(delayed.throttle_events.size() == 1);
    CHECK(delayed.throttle_events[0].rule == "web");
    CHECK(delayed.throttle_events[0].client == "tenant:7");
    CHECK_FALSE(delayed.throttle_events[0].rejected);
    CHECK(delayed.throttle_events[0].delay == 200ms);
    CHECK(delayed.reservations.size() == 1);

    for (int attempt = 0; attempt < 3; ++attempt) {
        Verdict refused = run(*policy, who);
        REQUIRE(refused.rejects());
        CHECK(refused.error.sqlstate == "53400");
        CHECK(refused.error.message == "pgwarden: write rate limit exceeded");
        CHECK(refused.error.detail == "rule web, client tenant:7");
        CHECK(refused.error.hint == "retry after 300 ms");
        REQUIRE(refused.throttle_events.size() == 1);
        CHECK(refused.throttle_events[0].rejected);
    }
    h.clock.advance(100ms);
    CHECK(delay_of(run(*policy, who), h.clock) == 200ms);
}

TEST_CASE("action reject refuses when no token is on hand now", "[throttle]") {
    Harness h;
    auto policy = h.policy({rule("strict", 10, 2)});
    const Client who = client("batch-job");
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    Verdict refused = run(*policy, who);
    REQUIRE(refused.rejects());
    CHECK(refused.error.detail == "rule strict, client batch-job");
    CHECK(refused.error.hint == "retry after 100 ms");
    CHECK(refused.rule == "strict");
    h.clock.advance(50ms);
    CHECK(run(*policy, who).error.hint == "retry after 50 ms");
    h.clock.advance(50ms);
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    CHECK(run(*policy, who).rejects());
    CHECK(rule_entry(policy->describe(), "strict")["rejected_total"] == 3);
}

TEST_CASE("a rejection locks the bucket out for the penalty, and only that bucket", "[throttle]") {
    Harness h;
    auto action = GENERATE(ThrottleAction::kReject, ThrottleAction::kDelay);
    ThrottleRule r = rule("flood", 10, 1, action);
    r.max_delay = 0ms;
    r.penalty = 5s;
    auto policy = h.policy({r});
    const Client flooder = client("flooder"), other = client("other");
    CHECK_FALSE(run(*policy, flooder).rejects());
    Verdict refused = run(*policy, flooder);
    REQUIRE(refused.rejects());
    CHECK(refused.error.hint == "retry after 5000 ms");
    // Tokens come back long before the penalty ends; the bucket still refuses, and the
    // refusals during the penalty do not extend it.
    h.clock.advance(4999ms);
    Verdict locked = run(*policy, flooder);
    REQUIRE(locked.rejects());
    CHECK(locked.error.hint == "retry after 1 ms");
    CHECK(rule_entry(policy->describe(), "flood")["buckets"][0]["penalty_remaining_ms"] == 1);
    CHECK_FALSE(run(*policy, other).rejects());
    h.clock.advance(1ms);
    CHECK_FALSE(run(*policy, flooder).rejects());
}

TEST_CASE("cost row: the statement holds one token, after() debits its rows", "[throttle]") {
    Harness h;
    ThrottleRule r = delay_rule("rows", 100, 100, 1s);
    r.cost = ThrottleCost::kRow;
    auto policy = h.policy({r});
    const Client who = client("etl");

    SECTION("a big write puts the bucket in debt and later writes wait or fail") {
        CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
        CHECK(tokens(*policy, "rows", "etl") == Approx(99));
        finish(*policy, who, 1000);
        CHECK(tokens(*policy, "rows", "etl") == Approx(-900));
        // One token is needed to start: 901 tokens at 100/s is 9.01 s, beyond max_delay.
        Verdict refused = run(*policy, who);
        REQUIRE(refused.rejects());
        CHECK(refused.error.hint == "retry after 9010 ms");
        h.clock.advance(8500ms);
        CHECK(delay_of(run(*policy, who), h.clock) == 510ms);
    }
    SECTION("zero rows gives the token back; a failure (no row count) keeps it") {
        CHECK_FALSE(run(*policy, who).rejects());
        finish(*policy, who, 0);
        CHECK(tokens(*policy, "rows", "etl") == Approx(100));
        CHECK_FALSE(run(*policy, who).rejects());
        finish(*policy, who, std::nullopt);
        CHECK(tokens(*policy, "rows", "etl") == Approx(99));
    }
    SECTION("statement cost ignores rows") {
        ThrottleRule per_statement = delay_rule("statements", 100, 100, 1s);
        auto statements = h.policy({per_statement});
        CHECK_FALSE(run(*statements, who).rejects());
        finish(*statements, who, 5000);
        CHECK(tokens(*statements, "statements", "etl") == Approx(99));
    }
}

TEST_CASE("every matching rule must admit; a refusal gives back the others' tokens", "[throttle]") {
    Harness h;
    auto policy = h.policy({rule("a", 10, 5), rule("b", 1, 1), delay_rule("c", 100, 100, 1s)});
    const Client who = client("x");
    CHECK_FALSE(run(*policy, who).rejects());
    CHECK(tokens(*policy, "a", "x") == Approx(4));
    CHECK(tokens(*policy, "b", "x") == Approx(0));
    CHECK(tokens(*policy, "c", "x") == Approx(99));

    Verdict refused = run(*policy, who);
    REQUIRE(refused.rejects());
    CHECK(refused.rule == "b");
    CHECK(refused.error.detail == "rule b, client x");
    // "a" had reserved before "b" refused: it got its token back. "c" was never asked.
    CHECK(tokens(*policy, "a", "x") == Approx(4));
    CHECK(tokens(*policy, "c", "x") == Approx(99));
}

TEST_CASE("with several delaying rules the statement waits for the slowest", "[throttle]") {
    Harness h;
    auto policy = h.policy({delay_rule("fast", 10, 1, 1s), delay_rule("slow", 2, 1, 1s)});
    const Client who = client("x");
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    Verdict delayed = run(*policy, who);
    CHECK(delay_of(delayed, h.clock) == 500ms);
    CHECK(delayed.rule == "slow");
    REQUIRE(delayed.throttle_events.size() == 2);
    CHECK(delayed.throttle_events[0].rule == "fast");
    CHECK(delayed.throttle_events[0].delay == 100ms);
    CHECK(delayed.throttle_events[1].rule == "slow");
    CHECK(delayed.throttle_events[1].delay == 500ms);
    CHECK(rule_entry(policy->describe(), "slow")["delayed_total"] == 1);
}

TEST_CASE("releasing a reservation gives its slot back at once, once", "[throttle]") {
    Harness h;
    auto policy = h.policy({delay_rule("r", 10, 1, 10s), delay_rule("roomy", 100, 10, 10s)});
    const Client who = client("x");
    CHECK(delay_of(run(*policy, who), h.clock) == 0ms);
    Verdict second = run(*policy, who);
    CHECK(delay_of(second, h.clock) == 100ms);
    CHECK(delay_of(run(*policy, who), h.clock) == 200ms);
    CHECK(tokens(*policy, "roomy", "x") == Approx(7));
    REQUIRE(second.reservations.size() == 1);
    // The client of the second statement went away while it waited.
    second.reservations[0]->release();
    // Every bucket it passed gets its token back, even the one that did not delay it.
    CHECK(tokens(*policy, "roomy", "x") == Approx(8));
    CHECK(delay_of(run(*policy, who), h.clock) == 200ms);
    second.reservations[0]->release();
    CHECK(delay_of(run(*policy, who), h.clock) == 300ms);
}

TEST_CASE("a batch is admitted or refused whole", "[throttle]") {
    Harness h;
    auto policy = h.policy({rule("other", 1000, 1000), rule("r", 10, 5)});
    const Client who = client("x");
    const auto context = [&](const StatementInfo& info) { return StatementContext{info, "", who.identity, who.name}; };
    auto insert = context(kInsert), update = context(kUpdate), select = context(kSelect);
    const StatementInfo commit_info = statement(StatementKind::kCommit, false);
    auto commit = context(commit_info);

    REQUIRE_FALSE(policy->before_batch({&insert, &update, &insert}).rejects());
    CHECK(tokens(*policy, "r", "x") == Approx(2));
    // Three writes (the SELECT and COMMIT cost nothing) against two tokens: refused, and
    // "other", which had admitted the batch, gets its tokens back.
    Verdict refused = policy->before_batch({&insert, &select, &update, &insert, &commit});
    REQUIRE(refused.rejects());
    CHECK(refused.rule == "r");
    CHECK(tokens(*policy, "r", "x") == Approx(2));
    CHECK(tokens(*policy, "other", "x") == Approx(997));
    CHECK_FALSE(policy->before_batch({&insert, &select, &update, &commit}).rejects());
    CHECK(tokens(*policy, "r", "x") == Approx(0));
}

TEST_CASE("a batch reserves its combined cost and is delayed as one", "[throttle]") {
    Harness h;
    auto policy = h.policy({delay_rule("r", 10, 2, 1s)});
    const Client a = client("a"), b = client("b");
    StatementContext first{kInsert, "", a.identity, a.name}, second{kInsert, "", a.identity, a.name},
        third{kInsert, "", a.identity, a.name}, elsewhere{kInsert, "", b.identity, b.name};
    Verdict delayed = policy->before_batch({&first, &second, &third, &elsewhere});
    // Client a: 3 tokens against a burst of 2 -> a full bucket suffices, leaving a debt of one.
    CHECK(delay_of(delayed, h.clock) == 0ms);
    CHECK(tokens(*policy, "r", "a") == Approx(-1));
    CHECK(tokens(*policy, "r", "b") == Approx(1));
    Verdict queued = policy->before_batch({&first, &elsewhere});
    CHECK(delay_of(queued, h.clock) == 200ms);
    REQUIRE(queued.reservations.size() == 1);
    REQUIRE(queued.throttle_events.size() == 1);
    CHECK(queued.throttle_events[0].client == "a");
    queued.reservations[0]->release();
    CHECK(tokens(*policy, "r", "a") == Approx(-1));
    CHECK(tokens(*policy, "r", "b") == Approx(1));
}

TEST_CASE("a reload keeps buckets by rule name, caps them at the new burst, drops removed rules", "[throttle]") {
    Harness h;
    auto first = h.policy({rule("kept", 10, 10), rule("removed", 10, 10), rule("rescoped", 10, 10)});
    const Client who = client("x");
    for (int i = 0; i < 3; ++i) CHECK_FALSE(run(*first, who).rejects());
    CHECK(tokens(*first, "kept", "x") == Approx(7));

    SECTION("same settings: nothing changes") {
        auto second = h.policy({rule("kept", 10, 10)});
        CHECK(tokens(*second, "kept", "x") == Approx(7));
    }
    SECTION("a smaller burst caps the level, a larger one keeps it") {
        auto smaller = h.policy({rule("kept", 10, 5)});
        CHECK(tokens(*smaller, "kept", "x") == Approx(5));
        auto larger = h.policy({rule("kept", 20, 40)});
        CHECK(tokens(*larger, "kept", "x") == Approx(5));
        // ...and refills at the new rate: 20/s.
        h.clock.advance(500ms);
        CHECK(tokens(*larger, "kept", "x") == Approx(15));
    }
    SECTION("removed rules lose their buckets; a new rule of the same name starts full") {
        auto second = h.policy({rule("kept", 10, 10), rule("added", 1, 1)});
        const auto described = second->describe();
        CHECK(described.size() == 2);
        CHECK(second->has_rule("added"));
        CHECK_FALSE(second->has_rule("removed"));
        CHECK(rule_entry(described, "added")["bucket_count"] == 0);
        auto third = h.policy({rule("kept", 10, 10), rule("removed", 10, 10)});
        CHECK(rule_entry(third->describe(), "removed")["bucket_count"] == 0);
        CHECK(tokens(*third, "kept", "x") == Approx(7));
    }
    SECTION("a changed bucket scope starts afresh") {
        ThrottleRule rescoped = rule("rescoped", 10, 10);
        rescoped.bucket = ThrottleBucket::kUser;
        auto second = h.policy({rescoped});
        CHECK(rule_entry(second->describe(), "rescoped")["bucket_count"] == 0);
    }
    SECTION("a penalty survives a reload") {
        ThrottleRule strict = rule("kept", 10, 10);
        strict.penalty = 10s;
        auto second = h.policy({strict});
        for (int i = 0; i < 7; ++i) CHECK_FALSE(run(*second, who).rejects());
        CHECK(run(*second, who).rejects());
        auto third = h.policy({strict});
        CHECK(run(*third, who).error.hint == "retry after 10000 ms");
    }
    // A policy built before a reload (a session still holding it) keeps working.
    CHECK_NOTHROW(run(*first, who));
}

TEST_CASE("bucket scopes: client, user, database, rule", "[throttle]") {
    Harness h;
    const Client alice1 = client("alice-1", "alice", "shop"), alice2 = client("alice-2", "alice", "crm"),
                 bob = client("bob-1", "bob", "shop");
    auto admitted = [&](ThrottleBucket scope) {
        ThrottleRule r = rule("one", 1, 1);
        r.bucket = scope;
        auto policy = h.policy({r});
        std::vector<bool> result;
        for (const Client* who : {&alice1, &alice2, &bob}) result.push_back(!run(*policy, *who).rejects());
        h.clock.advance(1h);
        return result;
    };
    CHECK(admitted(ThrottleBucket::kClient) == std::vector<bool>{true, true, true});
    CHECK(admitted(ThrottleBucket::kUser) == std::vector<bool>{true, false, true});
    CHECK(admitted(ThrottleBucket::kDatabase) == std::vector<bool>{true, true, false});
    CHECK(admitted(ThrottleBucket::kRule) == std::vector<bool>{true, false, false});
}

TEST_CASE("only clients the match takes are throttled", "[throttle]") {
    Harness h;
    ThrottleRule r = rule("tenants", 1, 1);
    r.match.client = {"tenant:*"};
    r.match.user = {"app"};
    auto policy = h.policy({r});
    const Client tenant = client("tenant:1"), admin = client("admin"), other_user = client("tenant:2", "ops");
    CHECK_FALSE(run(*policy, tenant).rejects());
    CHECK(run(*policy, tenant).rejects());
    for (int i = 0; i < 3; ++i) {
        CHECK_FALSE(run(*policy, admin).rejects());
        CHECK_FALSE(run(*policy, other_user).rejects());
    }
}

TEST_CASE("transaction ends are never throttled", "[throttle]") {
    Harness h;
    ThrottleRule r = rule("everything", 1, 1);
    // The config loader refuses "commit" and "rollback" here; a rule built otherwise must
    // still not throttle them.
    r.statements = {"write",   "commit",   "rollback",           "rollback_to",    "release",
                    "savepoint", "begin", "prepare_transaction", "commit_prepared"};
    r.penalty = 1h;
    auto policy = h.policy({r});
    const Client who = client("x");
    CHECK_FALSE(run(*policy, who).rejects());
    REQUIRE(run(*policy, who).rejects());  // locked out for an hour
    for (auto kind : {StatementKind::kCommit, StatementKind::kRollback, StatementKind::kRollbackTo,
                      StatementKind::kRelease, StatementKind::kPrepareTransaction, StatementKind::kCommitPrepared}) {
        INFO(to_string(kind));
        CHECK_FALSE(run(*policy, who, statement(kind, false)).rejects());
    }
    // Listed kinds that start something are throttled like writes.
    CHECK(run(*policy, who, statement(StatementKind::kBegin, false)).rejects());
    CHECK(run(*policy, who, statement(StatementKind::kSavepoint, false)).rejects());
}

TEST_CASE("reads are throttled only when their kind is listed", "[throttle]") {
    Harness h;
    const Client who = client("x");
    SECTION("default: every write, and nothing else") {
        auto policy = h.policy({rule("writes", 1, 1)});
        CHECK_FALSE(run(*policy, who, kUpdate).rejects());
        for (int i = 0; i < 3; ++i) CHECK_FALSE(run(*policy, who, kSelect).rejects());
        // A SELECT that calls nextval() is a write.
        CHECK(run(*policy, who, kSelectNextval).rejects());
    }
    SECTION("\"write\" in the list means the same") {
        ThrottleRule r = rule("writes", 1, 1);
        r.statements = {"write"};
        auto policy = h.policy({r});
        CHECK_FALSE(run(*policy, who, kSelectNextval).rejects());
        CHECK_FALSE(run(*policy, who, kSelect).rejects());
        CHECK(run(*policy, who, kInsert).rejects());
    }
    SECTION("listed kinds only") {
        ThrottleRule r = rule("selects", 1, 1);
        r.statements = {"select", "insert"};
        auto policy = h.policy({r});
        CHECK_FALSE(run(*policy, who, kSelect).rejects());
        CHECK_FALSE(run(*policy, who, kUpdate).rejects());
        CHECK(run(*policy, who, kSelect).rejects());
        CHECK(run(*policy, who, kInsert).rejects());
    }
}

TEST_CASE("threads hammering one bucket are admitted exactly", "[throttle]") {
    constexpr int kThreads = 8;
    Harness h;
    const Client who = client("shared");

    SECTION("reject: exactly the burst gets through") {
        constexpr int kPerThread = 2000, kBurst = 5000;
        auto policy = h.policy({rule("r", 1, kBurst)});
        std::atomic<int> admitted{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < kThreads; ++t)
            threads.emplace_back([&] {
                for (int i = 0; i < kPerThread; ++i)
                    if (!run(*policy, who).rejects()) ++admitted;
            });
        for (auto& thread : threads) thread.join();
        CHECK(admitted == kBurst);
        CHECK(rule_entry(policy->describe(), "r")["rejected_total"] == kThreads * kPerThread - kBurst);
    }
    SECTION("delay: every slot handed out once, none skipped") {
        constexpr int kPerThread = 500;
        auto policy = h.policy({delay_rule("r", 1000, 1, 1h)});
        std::vector<std::vector<Clock::duration>> delays(kThreads);
        std::vector<std::thread> threads;
        for (int t = 0; t < kThreads; ++t)
            threads.emplace_back([&, t] {
                for (int i = 0; i < kPerThread; ++i) {
                    Verdict v = run(*policy, who);
                    delays[t].push_back(v.delay_until ? *v.delay_until - h.clock.now() : Clock::duration{});
                }
            });
        for (auto& thread : threads) thread.join();
        std::vector<Clock::duration> all;
        for (const auto& d : delays) {
            // Each thread's own statements come in the order it sent them.
            CHECK(std::is_sorted(d.begin(), d.end()));
            all.insert(all.end(), d.begin(), d.end());
        }
        std::sort(all.begin(), all.end());
        std::vector<Clock::duration> expected;
        for (int i = 0; i < kThreads * kPerThread; ++i) expected.push_back(i * 1ms);
        CHECK(all == expected);
    }
}

TEST_CASE("describe lists rules, settings and bucket levels", "[throttle]") {
    Harness h;
    ThrottleRule r = delay_rule("web-writes", 50, 100, 1s);
    r.statements = {"insert", "update"};
    r.penalty = 30s;
    ThrottleRule unused = rule("default-burst", 0.5, 0);
    unused.match.client = {"nobody"};
    auto policy = h.policy({r, unused});
    for (int i = 0; i < 10; ++i) CHECK_FALSE(run(*policy, client("tenant:1")).rejects());
    CHECK_FALSE(run(*policy, client("tenant:2")).rejects());
    const auto described = policy->describe();
    INFO(described.dump(2));
    const auto& web = rule_entry(described, "web-writes");
    CHECK(web["rate"] == 50);
    CHECK(web["burst"] == 100);
    CHECK(web["statements"] == nlohmann::json({"insert", "update"}));
    CHECK(web["cost"] == "statement");
    CHECK(web["bucket"] == "client");
    CHECK(web["action"] == "delay");
    CHECK(web["max_delay_ms"] == 1000);
    CHECK(web["penalty_ms"] == 30000);
    CHECK(web["bucket_count"] == 2);
    // The emptiest bucket first.
    CHECK(web["buckets"][0]["key"] == "tenant:1");
    CHECK(web["buckets"][0]["tokens"].get<double>() == Approx(90));
    CHECK(web["buckets"][0]["penalty_remaining_ms"] == 0);
    CHECK(web["buckets"][1]["key"] == "tenant:2");
    const auto& slow = rule_entry(described, "default-burst");
    CHECK(slow["burst"] == 1);
    CHECK(slow["statements"] == nlohmann::json({"write"}));
}

TEST_CASE("full buckets of clients gone quiet are forgotten", "[throttle]") {
    Harness h;
    auto policy = h.policy({rule("r", 1, 1)});
    constexpr int kClients = 20000;
    int admitted = 0;
    for (int i = 0; i < kClients; ++i) admitted += !run(*policy, client("old:" + std::to_string(i))).rejects();
    CHECK(rule_entry(policy->describe(), "r")["bucket_count"] == kClients);
    h.clock.advance(2s);  // every old bucket is full again
    for (int i = 0; i < kClients; ++i) admitted += !run(*policy, client("new:" + std::to_string(i))).rejects();
    CHECK(admitted == 2 * kClients);
    const auto count = rule_entry(policy->describe(), "r")["bucket_count"].get<int>();
    CHECK(count >= kClients);
    CHECK(count < kClients * 3 / 2);
    // A forgotten bucket was full: its client starts with a full one again.
    CHECK_FALSE(run(*policy, client("old:1")).rejects());
    CHECK(run(*policy, client("new:1")).rejects());
}

TEST_CASE("a session's rule-match cache follows identity, client and configuration changes", "[throttle]") {
    auto state = std::make_shared<ThrottleState>();
    ThrottleRule web;
    web.name = "web";
    web.match.application_name = {"web*"};
    web.rate = 0.001;
    web.burst = 1;
    web.action = ThrottleAction::kReject;
    ThrottleRule tenant = web;
    tenant.name = "tenant";
    tenant.match.application_name.clear();
    tenant.match.client = {"tenant:1"};
    ThrottlePolicy policy({web, tenant}, state);

    StatementInfo insert;
    insert.kind = StatementKind::kInsert;
    insert.is_write = true;
    ClientIdentity identity({{"user", "app"}, {"application_name", "batch"}}, "127.0.0.1");
    ThrottleMatchCache cache;
    auto write = [&](ThrottlePolicy& p, std::string_view client) {
        StatementContext context{insert, "", identity, client};
        context.match_cache = &cache;
        return p.before(context);
    };
    // Neither rule takes "batch" / tenant:2.
    CHECK_FALSE(write(policy, "tenant:2").rejects());
    CHECK_FALSE(write(policy, "tenant:2").rejects());
    // A new client name: the tenant rule now applies (one token, then rejections).
    CHECK_FALSE(write(policy, "tenant:1").rejects());
    CHECK(write(policy, "tenant:1").rule == "tenant");
    // SET application_name: the web rule applies too.
    identity.set_application_name("web-1");
    CHECK_FALSE(write(policy, "tenant:2").rejects());
    CHECK(write(policy, "tenant:2").rule == "web");
    // A copy restored (as after a rolled-back SET) has the earlier version: re-checked.
    ClientIdentity restored({{"user", "app"}, {"application_name", "batch"}}, "127.0.0.1");
    identity = restored;
    CHECK_FALSE(write(policy, "tenant:2").rejects());
    // A reloaded policy with other rules does not use what the old one cached.
    ThrottleRule none = web;
    none.match.application_name = {"nobody"};
    ThrottlePolicy reloaded({none}, state);
    identity.set_application_name("web-1");
    CHECK_FALSE(write(policy, "tenant:3").rejects());  // web takes tenant:3 (its one token)
    CHECK_FALSE(write(reloaded, "tenant:3").rejects());
}

TEST_CASE("a session's remembered bucket is looked up again once a sweep may have removed it", "[throttle]") {
    // A session keeps where its bucket of each rule is, to skip the lookup; a sweep forgets
    // full buckets, so what it kept must not be used after one (ASan sees a stale one too).
    Harness h;
    auto policy = h.policy({rule("r", 1, 1)});
    const Client kept = client("kept");
    ThrottleMatchCache cache;
    auto write = [&] {
        StatementContext context{kInsert, "", kept.identity, kept.name};
        context.match_cache = &cache;
        return policy->before(context);
    };
    CHECK_FALSE(write().rejects());
    CHECK(write().rejects());  // the same bucket, found through the session's hint
    CHECK(tokens(*policy, "r", "kept") == Approx(0).margin(1e-6));
    h.clock.advance(2s);  // full again: the next sweep of its shard forgets it
    constexpr int kClients = 40000;
    for (int i = 0; i < kClients; ++i) CHECK_FALSE(run(*policy, client("other:" + std::to_string(i))).rejects());
    // Only "kept" was full when its shard was swept: it alone is gone.
    REQUIRE(rule_entry(policy->describe(), "r")["bucket_count"] == kClients);
    // A new bucket, in the map, takes the token.
    CHECK_FALSE(write().rejects());
    CHECK(tokens(*policy, "r", "kept") == Approx(0).margin(1e-6));
    CHECK(write().rejects());
}


TEST_CASE("a session's remembered buckets change no verdict (random sessions, batches, reloads, sweeps)", "[throttle]") {
    std::mt19937 rng(777);
    auto pick = [&](auto const& v) { return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)]; };
    auto chance = [&](int percent) { return std::uniform_int_distribution<int>(0, 99)(rng) < percent; };
    ManualClock clock;
    auto state_a = std::make_shared<ThrottleState>([&] { return clock.now(); });
    auto state_b = std::make_shared<ThrottleState>([&] { return clock.now(); });
    auto random_rules = [&] {
        std::vector<ThrottleRule> rules;
        const int n = std::uniform_int_distribution<int>(1, 6)(rng);
        for (int i = 0; i < n; ++i) {
            ThrottleRule r = chance(50) ? rule("r" + std::to_string(i), pick(std::vector<double>{1, 5, 50}),
                                               pick(std::vector<double>{1, 2, 10}))
                                        : delay_rule("r" + std::to_string(i), pick(std::vector<double>{1, 5, 50}),
                                                     pick(std::vector<double>{1, 3}), 300ms);
            r.bucket = pick(std::vector<ThrottleBucket>{ThrottleBucket::kClient, ThrottleBucket::kClient, ThrottleBucket::kClient, ThrottleBucket::kUser,
                                                        ThrottleBucket::kDatabase, ThrottleBucket::kRule});
            if (chance(30)) r.cost = ThrottleCost::kRow;
            if (chance(20)) r.penalty = 200ms;
            if (chance(30)) r.match.application_name = {"web*"};
            if (chance(30)) r.match.client = {"tenant:*"};
            if (chance(20)) r.statements = {"update"};
            rules.push_back(std::move(r));
        }
        return rules;
    };
    std::unique_ptr<ThrottlePolicy> a, b;
    auto reload = [&] {
        auto rules = random_rules();
        a = std::make_unique<ThrottlePolicy>(rules, state_a);
        b = std::make_unique<ThrottlePolicy>(rules, state_b);
    };
    reload();
    const std::vector<std::string> apps = {"web", "web-2", "batch"};
    const std::vector<std::string> names = {"tenant:1", "tenant:2", "other"};
    const std::vector<std::string> users = {"app", "admin"};
    ThrottleMatchCache cache;
    Client session = client("tenant:1");
    int noise = 0;
    auto same = [&](const Verdict& x, const Verdict& y) {
        REQUIRE(x.rejects() == y.rejects());
        REQUIRE(x.rule == y.rule);
        REQUIRE(x.delay_until == y.delay_until);
    };
    for (int step = 0; step < 5000; ++step) {
        INFO("step " << step);
        const int what = std::uniform_int_distribution<int>(0, 999)(rng);
        if (what < 3) reload();
        else if (what < 10) session.identity.set_application_name(pick(apps));
        else if (what < 20) session.name = pick(names);
        else if (what < 22) session = client(pick(names), pick(users));
        else if (what < 50) {
            // Many new clients, full again later: their shards are swept.
            if (chance(50)) clock.advance(3s);
            for (int i = 0; i < 1500; ++i) {
                const Client other = client("tenant:n" + std::to_string(noise++), pick(users));
                same(run(*a, other), run(*b, other));
            }
        }
        if (chance(40)) clock.advance(std::chrono::milliseconds(std::uniform_int_distribution<int>(1, 800)(rng)));
        const StatementInfo& info = *pick(std::vector<const StatementInfo*>{&kInsert, &kUpdate, &kSelect, &kInsert});
        if (chance(20)) {
            // A Query of one or several statements, maybe with other client names.
            const int count = std::uniform_int_distribution<int>(1, 3)(rng);
            std::vector<std::string> clients;
            for (int i = 0; i < count; ++i) clients.push_back(i == 0 || chance(50) ? session.name : pick(names));
            std::vector<StatementContext> ca, cb;
            for (const auto& c : clients) {
                ca.push_back({info, "", session.identity, c});
                ca.back().match_cache = &cache;
                cb.push_back({info, "", session.identity, c});
            }
            std::vector<const StatementContext*> pa, pb;
            for (auto& c : ca) pa.push_back(&c);
            for (auto& c : cb) pb.push_back(&c);
            const Verdict va = a->before_batch(pa);
            const Verdict vb = b->before_batch(pb);
            same(va, vb);
            if (!va.reservations.empty() && chance(30)) {
                for (auto& r : va.reservations) r->release();
                for (auto& r : vb.reservations) r->release();
            }
        } else {
            StatementContext ca{info, "", session.identity, session.name};
            ca.match_cache = &cache;
            StatementContext cb{info, "", session.identity, session.name};
            const Verdict va = a->before(ca);
            const Verdict vb = b->before(cb);
            same(va, vb);
            if (!va.rejects() && chance(30)) {
                Outcome outcome;
                outcome.rows = std::uniform_int_distribution<int>(0, 5)(rng);
                a->after(ca, outcome);
                b->after(cb, outcome);
            }
            if (!va.reservations.empty() && chance(30)) {
                for (auto& r : va.reservations) r->release();
                for (auto& r : vb.reservations) r->release();
            }
        }
    }
}

TEST_CASE("two threads use remembered buckets while their shards are swept", "[throttle]") {
    auto state = std::make_shared<ThrottleState>();
    ThrottleRule all = rule("all", 1e6, 1e6);
    ThrottleRule user = rule("user", 1e6, 1e6);
    user.bucket = ThrottleBucket::kUser;
    ThrottleRule shared = rule("shared", 1e6, 1e6);
    shared.bucket = ThrottleBucket::kRule;
    ThrottlePolicy policy({all, user, shared}, state);
    auto worker = [&](int id) {
        ThrottleMatchCache cache;
        const Client kept = client("kept:" + std::to_string(id), "u" + std::to_string(id));
        std::uint64_t n = 0;
        for (int i = 0; i < 40000; ++i) {
            StatementContext context{kInsert, "", kept.identity, kept.name};
            context.match_cache = &cache;
            (void)policy.before(context);
            // Churn: fresh clients fill every shard, then sweeps forget the full ones.
            ++n;
            const Client other = client("t" + std::to_string(id) + ":" + std::to_string(n), "u" + std::to_string(n % 50));
            (void)run(policy, other);
            if (i % 10000 == 0) (void)policy.describe();
        }
    };
    std::thread t1(worker, 1), t2(worker, 2);
    t1.join();
    t2.join();
    CHECK(policy.describe().size() == 3);
}
