// Tests for the policy pipeline: how the verdicts of several policies combine (first
// rejection or rewrite wins; notices, hits, throttle records and the latest delay are kept)
// and that every policy hears about the outcome.
#include <catch2/catch.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/identity.hpp"
#include "policy/pipeline.hpp"
#include "policy/rules.hpp"

namespace {

using namespace std::chrono_literals;
using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;
using pgwarden::policy::ClientIdentity;
using pgwarden::policy::Clock;
using pgwarden::policy::Message;
using pgwarden::policy::Outcome;
using pgwarden::policy::Pipeline;
using pgwarden::policy::Policy;
using pgwarden::policy::Reservation;
using pgwarden::policy::Rule;
using pgwarden::policy::RuleAction;
using pgwarden::policy::RuleHit;
using pgwarden::policy::RulePolicy;
using pgwarden::policy::StatementContext;
using pgwarden::policy::StatementInfo;
using pgwarden::policy::ThrottleEvent;
using pgwarden::policy::TxState;
using pgwarden::policy::Verdict;

// Answers a fixed verdict and writes down every call, in one journal shared by all.
class Scripted : public Policy {
public:
    Scripted(std::string name, Verdict verdict, std::vector<std::string>& journal)
        : name_(std::move(name)), verdict_(std::move(verdict)), journal_(journal) {}
    const char* name() const override { return name_.c_str(); }
    Verdict before(const StatementContext& context) override {
        journal_.push_back(name_ + " before " + std::string(context.sql));
        return verdict_;
    }
    void after(const StatementContext& context, const Outcome& outcome) override {
        journal_.push_back(name_ + " after " + std::string(context.sql) + " " + std::string(outcome.command_tag));
    }

private:
    std::string name_;
    Verdict verdict_;
    std::vector<std::string>& journal_;
};

class CountedReservation : public Reservation {
public:
    void release() override { ++releases; }
    int releases = 0;
};

Verdict notice(std::string text) {
    Verdict v;
    v.notices.push_back(Message{"00000", std::move(text), "", ""});
    return v;
}

Verdict hit(std::string rule, RuleAction action = RuleAction::kLog) {
    Verdict v;
    v.hits.push_back(RuleHit{std::move(rule), action});
    return v;
}

Verdict reject(std::string policy, std::string sqlstate, std::string message) {
    Verdict v;
    v.action = Verdict::Action::kReject;
    v.error = Message{std::move(sqlstate), std::move(message), "", ""};
    v.policy = std::move(policy);
    return v;
}

Verdict delay(Clock::time_point until) {
    Verdict v;
    v.delay_until = until;
    return v;
}

std::vector<std::string> messages(const std::vector<Message>& notices) {
    std::vector<std::string> out;
    for (const auto& n : notices) out.push_back(n.message);
    return out;
}

std::vector<std::string> rules(const std::vector<RuleHit>& hits) {
    std::vector<std::string> out;
    for (const auto& h : hits) out.push_back(h.rule);
    return out;
}

// A statement and a client to ask about.
struct Fixture {
    StatementInfo statement;
    ClientIdentity identity{{{"user", "app"}, {"application_name", "web"}}, "127.0.0.1"};
    std::vector<std::string> journal;
    Pipeline pipeline;

    Fixture() {
        statement.kind = pgwarden::policy::StatementKind::kInsert;
        statement.is_write = true;
    }
    StatementContext context(std::string_view sql = "q", TxState tx = TxState::kIdle) const {
        return StatementContext{statement, sql, identity, "tenant:1", tx};
    }
    void add(std::string name, Verdict verdict) {
        pipeline.add(std::make_shared<Scripted>(std::move(name), std::move(verdict), journal));
    }
};

}  // namespace

TEST_CASE("pipeline: with no policies every statement is allowed as is", "[pipeline]") {
    Fixture f;
    CHECK(f.pipeline.empty());
    Verdict v = f.pipeline.before(f.context());
    CHECK(v.action == Verdict::Action::kAllow);
    CHECK_FALSE(v.rejects());
    CHECK(v.notices.empty());
    CHECK(v.hits.empty());
    CHECK_FALSE(v.delay_until);
    CHECK_FALSE(v.doom_reason);
    f.pipeline.after(f.context(), Outcome{"INSERT 0 1", 1, "", 1ms});
}

TEST_CASE("pipeline: policies run in order and what they allow with accumulates", "[pipeline]") {
    Fixture f;
    Verdict first = notice("first");
    first.hits.push_back(RuleHit{"r1", RuleAction::kNotice});
    Verdict second = hit("r2");
    second.notices.push_back(Message{"00000", "second", "", ""});
    f.add("a", first);
    f.add("b", Verdict::allow());
    f.add("c", second);
    CHECK_FALSE(f.pipeline.empty());

    Verdict v = f.pipeline.before(f.context("INSERT"));
    CHECK(v.action == Verdict::Action::kAllow);
    CHECK(messages(v.notices) == std::vector<std::string>{"first", "second"});
    CHECK(rules(v.hits) == std::vector<std::string>{"r1", "r2"});
    CHECK(f.journal == std::vector<std::string>{"a before INSERT", "b before INSERT", "c before INSERT"});
}

TEST_CASE("pipeline: the latest delay applies", "[pipeline]") {
    Fixture f;
    const Clock::time_point now = Clock::now();
    f.add("soon", delay(now + 1s));
    f.add("latest", delay(now + 3s));
    f.add("none", Verdict::allow());
    f.add("middle", delay(now + 2s));
    Verdict v = f.pipeline.before(f.context());
    CHECK_FALSE(v.rejects());
    REQUIRE(v.delay_until);
    CHECK(*v.delay_until == now + 3s);
}

TEST_CASE("pipeline: the first rejection wins and stops the rest", "[pipeline]") {
    Fixture f;
    Verdict first = notice("before the rejection");
    first.hits.push_back(RuleHit{"noted", RuleAction::kNotice});
    Verdict rejection = reject("throttle", "53400", "pgwarden: write rate limit exceeded");
    rejection.rule = "web-writes";
    rejection.notices.push_back(Message{"00000", "from the rejecting policy", "", ""});
    rejection.hits.push_back(RuleHit{"rejecting", RuleAction::kReject});
    f.add("a", first);
    f.add("b", rejection);
    f.add("c", reject("rule", "42501", "later"));
    f.add("d", notice("never asked"));

    Verdict v = f.pipeline.before(f.context("DELETE"));
    REQUIRE(v.rejects());
    CHECK(v.error.sqlstate == "53400");
    CHECK(v.error.message == "pgwarden: write rate limit exceeded");
    CHECK(v.policy == "throttle");
    CHECK(v.rule == "web-writes");
    // The client still gets the notices sent so far, in order, and every hit is counted.
    CHECK(messages(v.notices) == std::vector<std::string>{"before the rejection", "from the rejecting policy"});
    CHECK(rules(v.hits) == std::vector<std::string>{"noted", "rejecting"});
    CHECK(f.journal == std::vector<std::string>{"a before DELETE", "b before DELETE"});
}

TEST_CASE("pipeline: a rewrite decides like a rejection", "[pipeline]") {
    Fixture f;
    Verdict rewrite;
    rewrite.action = Verdict::Action::kRewrite;
    rewrite.rewrite_sql = "SAVEPOINT pgwarden_1";
    rewrite.client_tag = "BEGIN";
    rewrite.policy = "nesting";
    f.add("a", notice("n"));
    f.add("nesting", rewrite);
    f.add("rules", reject("rule", "42501", "too late"));

    Verdict v = f.pipeline.before(f.context("BEGIN", TxState::kInBlock));
    CHECK(v.action == Verdict::Action::kRewrite);
    CHECK_FALSE(v.rejects());
    CHECK(v.rewrite_sql == "SAVEPOINT pgwarden_1");
    CHECK(v.client_tag == "BEGIN");
    CHECK(v.policy == "nesting");
    CHECK(messages(v.notices) == std::vector<std::string>{"n"});
    CHECK(f.journal.size() == 2);
}

TEST_CASE("pipeline: the first doom names the reason and survives a rejection", "[pipeline]") {
    Fixture f;
    Verdict doom_a;
    doom_a.doom_reason = "rule";
    doom_a.rule = "doom-secrets";
    Verdict doom_b;
    doom_b.doom_reason = "operator";
    doom_b.rule = "other";
    f.add("a", doom_a);
    f.add("b", doom_b);
    Verdict allowed = f.pipeline.before(f.context("SELECT", TxState::kInBlock));
    CHECK_FALSE(allowed.rejects());
    REQUIRE(allowed.doom_reason);
    CHECK(*allowed.doom_reason == "rule");
    CHECK(allowed.rule == "doom-secrets");

    f.add("c", reject("rule", "42501", "no"));
    Verdict rejected = f.pipeline.before(f.context("SELECT", TxState::kInBlock));
    REQUIRE(rejected.rejects());
    REQUIRE(rejected.doom_reason);
    CHECK(*rejected.doom_reason == "rule");
}

TEST_CASE("pipeline: throttle reservations and events are never dropped", "[pipeline]") {
    Fixture f;
    auto reserved = std::make_shared<CountedReservation>();
    Verdict delayed = delay(Clock::now() + 200ms);
    delayed.reservations.push_back(reserved);
    delayed.throttle_events.push_back(ThrottleEvent{"web-writes", "tenant:1", false, 200ms});
    f.add("throttle", delayed);
    f.add("quiet", Verdict::allow());

    SECTION("when the statement is allowed") {
        Verdict v = f.pipeline.before(f.context());
        CHECK_FALSE(v.rejects());
        REQUIRE(v.reservations.size() == 1);
        CHECK(v.reservations[0] == reserved);
        REQUIRE(v.throttle_events.size() == 1);
        CHECK(v.throttle_events[0].rule == "web-writes");
        CHECK(v.throttle_events[0].delay == 200ms);
    }
    SECTION("when a later policy rejects it, so that the proxy can give the capacity back") {
        Verdict refused = reject("throttle", "53400", "pgwarden: write rate limit exceeded");
        refused.throttle_events.push_back(ThrottleEvent{"strict", "tenant:1", true, {}});
        f.add("strict", refused);
        Verdict v = f.pipeline.before(f.context());
        REQUIRE(v.rejects());
        REQUIRE(v.reservations.size() == 1);
        v.reservations[0]->release();
        CHECK(reserved->releases == 1);
        REQUIRE(v.throttle_events.size() == 2);
        CHECK(v.throttle_events[0].rule == "web-writes");
        CHECK(v.throttle_events[1].rule == "strict");
        CHECK(v.throttle_events[1].rejected);
    }
}

TEST_CASE("pipeline: every policy hears the outcome, in order", "[pipeline]") {
    Fixture f;
    f.add("a", Verdict::allow());
    f.add("b", reject("rule", "42501", "no"));
    f.add("c", Verdict::allow());
    f.pipeline.after(f.context("UPDATE"), Outcome{"UPDATE 3", 3, "", 2ms});
    CHECK(f.journal ==
          std::vector<std::string>{"a after UPDATE UPDATE 3", "b after UPDATE UPDATE 3", "c after UPDATE UPDATE 3"});
}

TEST_CASE("pipeline: rule policies combine with others over classified SQL", "[pipeline]") {
    Classifier classifier{ClassifyConfig{}};
    auto notice_rule = Rule{};
    notice_rule.name = "audit-writes";
    notice_rule.action = RuleAction::kNotice;
    notice_rule.match.statements = {"write"};
    notice_rule.message = "writes are audited";
    auto reject_rule = Rule{};
    reject_rule.name = "no-truncate";
    reject_rule.action = RuleAction::kReject;
    reject_rule.match.statements = {"truncate"};
    reject_rule.message = "TRUNCATE is not allowed";

    Pipeline pipeline;
    pipeline.add(std::make_shared<RulePolicy>(std::vector<Rule>{notice_rule}));
    pipeline.add(std::make_shared<RulePolicy>(std::vector<Rule>{reject_rule}));
    ClientIdentity identity({{"user", "app"}}, "127.0.0.1");

    auto ask = [&](std::string_view sql) {
        auto classified = classifier.classify(sql);
        REQUIRE(classified->statements.size() == 1);
        return pipeline.before(StatementContext{classified->statements[0], sql, identity, "app", TxState::kIdle});
    };
    Verdict truncate = ask("TRUNCATE orders");
    REQUIRE(truncate.rejects());
    CHECK(truncate.error.message == "TRUNCATE is not allowed");
    CHECK(truncate.error.sqlstate == "42501");
    CHECK(messages(truncate.notices) == std::vector<std::string>{"writes are audited"});
    CHECK(rules(truncate.hits) == std::vector<std::string>{"audit-writes", "no-truncate"});

    Verdict insert = ask("INSERT INTO orders VALUES (1)");
    CHECK_FALSE(insert.rejects());
    CHECK(messages(insert.notices) == std::vector<std::string>{"writes are audited"});

    Verdict select = ask("SELECT * FROM orders");
    CHECK_FALSE(select.rejects());
    CHECK(select.notices.empty());
    CHECK(select.hits.empty());
}

TEST_CASE("pipeline: transaction states have the names logs use", "[pipeline]") {
    CHECK(std::string(to_string(TxState::kIdle)) == "idle");
    CHECK(std::string(to_string(TxState::kInBlock)) == "in_transaction");
    CHECK(std::string(to_string(TxState::kFailed)) == "failed_transaction");
}
