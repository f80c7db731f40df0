// Tests for [[rule]]: matching clients and statements, the four actions, rule order,
// hits for metrics, and the per-client nesting override.
#include <catch2/catch.hpp>

#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/identity.hpp"
#include "policy/pipeline.hpp"
#include "policy/rules.hpp"

namespace {

using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;
using pgwarden::policy::ClientIdentity;
using pgwarden::policy::Match;
using pgwarden::policy::NestingMode;
using pgwarden::policy::Rule;
using pgwarden::policy::RuleAction;
using pgwarden::policy::RulePolicy;
using pgwarden::policy::StatementContext;
using pgwarden::policy::StatementInfo;
using pgwarden::policy::TxState;
using pgwarden::policy::Verdict;

StatementInfo classify_one(std::string_view sql) {
    static Classifier classifier{ClassifyConfig{}};
    auto result = classifier.classify(sql);
    REQUIRE(result->statements.size() == 1);
    return result->statements.front();
}

Rule rule(std::string name, RuleAction action, Match match, std::string message = "") {
    Rule r;
    r.name = std::move(name);
    r.action = action;
    r.match = std::move(match);
    r.message = std::move(message);
    return r;
}

// One client, asking the policy about statements in a given transaction state.
struct Client {
    ClientIdentity identity{{{"user", "app"}, {"database", "shop"}, {"application_name", "web-1"}}, "10.1.2.3"};
    std::string name = "tenant:42";
    pgwarden::policy::RuleMatchCache* cache = nullptr;  // a session's, when set

    Verdict ask(RulePolicy& policy, std::string_view sql, TxState tx = TxState::kIdle) const {
        StatementInfo statement = classify_one(sql);
        StatementContext context{statement, sql, identity, name, tx};
        context.rule_matches = cache;
        return policy.before(context);
    }
};

std::vector<std::string> hit_names(const Verdict& v) {
    std::vector<std::string> names;
    for (const auto& h : v.hits) names.push_back(h.rule);
    return names;
}

}  // namespace

TEST_CASE("rules: reject answers with the rule's SQLSTATE and message", "[rules]") {
    Rule no_ddl = rule("no-ddl-from-web", RuleAction::kReject,
                       {.application_name = {"web*"}, .statements = {"ddl", "truncate"}},
                       "DDL is not allowed from web clients");
    no_ddl.sqlstate = "42501";
    RulePolicy policy({no_ddl});
    Client web;

    Verdict v = web.ask(policy, "DROP TABLE orders");
    CHECK(v.rejects());
    CHECK(v.error.sqlstate == "42501");
    CHECK(v.error.message == "DDL is not allowed from web clients");
    CHECK(v.policy == "rule");
    CHECK(v.rule == "no-ddl-from-web");
    REQUIRE(v.hits.size() == 1);
    CHECK(v.hits[0].rule == "no-ddl-from-web");
    CHECK(v.hits[0].action == RuleAction::kReject);
    CHECK(web.ask(policy, "TRUNCATE orders").rejects());

    // Other statements and other clients pass untouched.
    Verdict select = web.ask(policy, "SELECT * FROM orders");
    CHECK_FALSE(select.rejects());
    CHECK(select.hits.empty());
    CHECK(select.notices.empty());
    Client worker;
    worker.identity = ClientIdentity({{"user", "app"}, {"application_name", "worker"}}, "10.1.2.3");
    Verdict other = worker.ask(policy, "DROP TABLE orders");
    CHECK_FALSE(other.rejects());
    CHECK(other.hits.empty());
}

TEST_CASE("rules: a rule without a message names itself", "[rules]") {
    Rule r = rule("quiet", RuleAction::kReject, {.statements = {"delete"}});
    r.sqlstate = "P0001";
    RulePolicy policy({r});
    Verdict v = Client().ask(policy, "DELETE FROM t");
    REQUIRE(v.rejects());
    CHECK(v.error.sqlstate == "P0001");
    CHECK(v.error.message == "pgwarden: rule quiet");
}

TEST_CASE("rules: rules match the resolved client name and tables", "[rules]") {
    RulePolicy policy({rule("tenant-audit", RuleAction::kReject, {.client = {"tenant:*"}, .tables = {"audit.*"}})});
    Client tenant;
    CHECK(tenant.ask(policy, "SELECT * FROM audit.log").rejects());
    CHECK(tenant.ask(policy, "UPDATE audit.log SET x = 1").rejects());
    CHECK_FALSE(tenant.ask(policy, "SELECT * FROM public.log").rejects());
    Client admin;
    admin.name = "admin";
    CHECK_FALSE(admin.ask(policy, "SELECT * FROM audit.log").rejects());
}

TEST_CASE("rules: notice and log allow the statement and count a hit", "[rules]") {
    RulePolicy policy({rule("warn-writes", RuleAction::kNotice, {.statements = {"write"}}, "writes are audited"),
                       rule("log-deletes", RuleAction::kLog, {.statements = {"delete"}})});
    Client c;

    Verdict insert = c.ask(policy, "INSERT INTO t VALUES (1)");
    CHECK_FALSE(insert.rejects());
    CHECK(insert.action == Verdict::Action::kAllow);
    REQUIRE(insert.notices.size() == 1);
    CHECK(insert.notices[0].message == "writes are audited");
    // A NOTICE carries 00000, as the server's own notices (RAISE NOTICE) do.
    CHECK(insert.notices[0].sqlstate == "00000");
    CHECK(hit_names(insert) == std::vector<std::string>{"warn-writes"});
    CHECK(insert.hits[0].action == RuleAction::kNotice);
    CHECK_FALSE(insert.doom_reason);

    Verdict del = c.ask(policy, "DELETE FROM t");
    CHECK_FALSE(del.rejects());
    CHECK(del.notices.size() == 1);
    CHECK(hit_names(del) == std::vector<std::string>{"warn-writes", "log-deletes"});
    CHECK(del.hits[1].action == RuleAction::kLog);

    Verdict select = c.ask(policy, "SELECT 1");
    CHECK(select.hits.empty());
    CHECK(select.notices.empty());
}

TEST_CASE("rules: doom marks an open transaction block only", "[rules]") {
    RulePolicy policy({rule("doom-secrets", RuleAction::kDoom, {.tables = {"secrets"}})});
    Client c;

    Verdict in_block = c.ask(policy, "SELECT * FROM secrets", TxState::kInBlock);
    CHECK_FALSE(in_block.rejects());
    REQUIRE(in_block.doom_reason);
    CHECK(*in_block.doom_reason == "rule");
    CHECK(in_block.rule == "doom-secrets");
    CHECK(hit_names(in_block) == std::vector<std::string>{"doom-secrets"});
    CHECK(in_block.hits[0].action == RuleAction::kDoom);

    // Outside a block there is nothing to doom (and an aborted one cannot commit anyway);
    // the match still counts.
    for (TxState tx : {TxState::kIdle, TxState::kFailed}) {
        INFO(pgwarden::policy::to_string(tx));
        Verdict v = c.ask(policy, "SELECT * FROM secrets", tx);
        CHECK_FALSE(v.rejects());
        CHECK_FALSE(v.doom_reason);
        CHECK(hit_names(v) == std::vector<std::string>{"doom-secrets"});
    }

    CHECK_FALSE(c.ask(policy, "SELECT * FROM public_data", TxState::kInBlock).doom_reason);
}

TEST_CASE("rules: the first doom names the reason", "[rules]") {
    RulePolicy policy({rule("first", RuleAction::kDoom, {.statements = {"update"}}),
                       rule("second", RuleAction::kDoom, {.statements = {"write"}})});
    Verdict v = Client().ask(policy, "UPDATE t SET a = 1", TxState::kInBlock);
    REQUIRE(v.doom_reason);
    CHECK(v.rule == "first");
    CHECK(hit_names(v) == std::vector<std::string>{"first", "second"});
}

TEST_CASE("rules: the first reject wins, in file order", "[rules]") {
    Rule specific = rule("no-drop-orders", RuleAction::kReject, {.tables = {"orders"}}, "orders stay");
    specific.sqlstate = "42501";
    Rule general = rule("no-ddl", RuleAction::kReject, {.statements = {"ddl"}}, "no DDL");
    general.sqlstate = "0A000";
    RulePolicy policy({rule("note", RuleAction::kNotice, {.statements = {"ddl"}}, "DDL seen"), specific, general});
    Client c;

    Verdict orders = c.ask(policy, "DROP TABLE orders");
    REQUIRE(orders.rejects());
    CHECK(orders.rule == "no-drop-orders");
    CHECK(orders.error.sqlstate == "42501");
    CHECK(orders.error.message == "orders stay");
    // What matched before the deciding rule is kept: the client still gets the notice.
    REQUIRE(orders.notices.size() == 1);
    CHECK(orders.notices[0].message == "DDL seen");
    REQUIRE(orders.hits.size() >= 2);
    CHECK(orders.hits[0].rule == "note");
    CHECK(orders.hits[1].rule == "no-drop-orders");

    Verdict other = c.ask(policy, "DROP TABLE customers");
    REQUIRE(other.rejects());
    CHECK(other.rule == "no-ddl");
    CHECK(other.error.sqlstate == "0A000");
    CHECK(hit_names(other) == std::vector<std::string>{"note", "no-ddl"});
}

TEST_CASE("rules: a reject after a doom still rejects", "[rules]") {
    RulePolicy policy({rule("doom-writes", RuleAction::kDoom, {.statements = {"write"}}),
                       rule("no-delete", RuleAction::kReject, {.statements = {"delete"}}, "no deletes")});
    Verdict v = Client().ask(policy, "DELETE FROM t", TxState::kInBlock);
    REQUIRE(v.rejects());
    CHECK(v.error.message == "no deletes");
    CHECK(v.rule == "no-delete");
    CHECK(hit_names(v) == std::vector<std::string>{"doom-writes", "no-delete"});
}

TEST_CASE("rules: no rules, no opinion", "[rules]") {
    RulePolicy policy(std::vector<Rule>{});
    Verdict v = Client().ask(policy, "DROP TABLE t", TxState::kInBlock);
    CHECK(v.action == Verdict::Action::kAllow);
    CHECK(v.hits.empty());
    CHECK(v.notices.empty());
    CHECK_FALSE(v.doom_reason);
    CHECK_FALSE(v.delay_until);
    CHECK(std::string(policy.name()) == "rule");
}

TEST_CASE("rules: a rule that only sets the nesting mode judges no statement", "[rules]") {
    // Its action is the default (reject), which must not apply to everything the client sends.
    Rule batch = rule("batch-flatten", RuleAction::kReject, {.user = {"batch"}});
    batch.nesting = NestingMode::kFlatten;
    RulePolicy policy({batch});
    Client batch_client;
    batch_client.identity = ClientIdentity({{"user", "batch"}}, "10.0.0.9");
    Verdict v = batch_client.ask(policy, "DROP TABLE t", TxState::kInBlock);
    CHECK_FALSE(v.rejects());
    CHECK(v.hits.empty());
}

TEST_CASE("rules: nesting_override takes the first rule for the client", "[rules]") {
    Rule flatten = rule("batch-flatten", RuleAction::kReject, {.user = {"batch"}});
    flatten.nesting = NestingMode::kFlatten;
    Rule savepoint = rule("tenants-savepoint", RuleAction::kReject, {.client = {"tenant:*"}});
    savepoint.nesting = NestingMode::kSavepoint;
    Rule plain = rule("no-ddl", RuleAction::kReject, {.statements = {"ddl"}});
    RulePolicy policy({plain, flatten, savepoint});

    ClientIdentity batch({{"user", "batch"}}, "");
    ClientIdentity app({{"user", "app"}}, "");
    CHECK(policy.nesting_override(batch, "tenant:1") == NestingMode::kFlatten);
    CHECK(policy.nesting_override(app, "tenant:1") == NestingMode::kSavepoint);
    CHECK(policy.nesting_override(app, "admin") == std::nullopt);
    // Rules without `nesting` never override, even when they match the client.
    CHECK(RulePolicy(std::vector<Rule>{plain}).nesting_override(app, "x") == std::nullopt);
}

TEST_CASE("rules: a session's rule-match cache follows identity, client and configuration changes", "[rules]") {
    Rule web = rule("web-no-delete", RuleAction::kReject, {.application_name = {"web*"}, .statements = {"delete"}});
    Rule tenant = rule("tenant-no-update", RuleAction::kReject, {.client = {"tenant:1"}, .statements = {"update"}});
    Rule batch = rule("batch-flatten", RuleAction::kReject, {.user = {"app"}});
    batch.nesting = NestingMode::kFlatten;  // judges no statement, cached or not
    RulePolicy policy({web, tenant, batch});
    pgwarden::policy::RuleMatchCache cache;
    Client session;
    session.cache = &cache;
    session.name = "tenant:2";
    session.identity.set_application_name("batch-1");
    // Twice each: the first fills the cache, the second uses it.
    for (int i = 0; i < 2; ++i) {
        CHECK_FALSE(session.ask(policy, "DELETE FROM t").rejects());
        CHECK_FALSE(session.ask(policy, "UPDATE t SET x = 1").rejects());
        CHECK_FALSE(session.ask(policy, "DROP TABLE t", TxState::kInBlock).rejects());
    }
    // Another client name: the tenant rule takes it.
    session.name = "tenant:1";
    for (int i = 0; i < 2; ++i) CHECK(session.ask(policy, "UPDATE t SET x = 1").rule == "tenant-no-update");
    // SET application_name: the web rule takes it too.
    session.identity.set_application_name("web-1");
    for (int i = 0; i < 2; ++i) CHECK(session.ask(policy, "DELETE FROM t").rule == "web-no-delete");
    // A copy restored (as after a rolled-back SET) is checked again.
    session.identity = Client().identity;
    session.identity.set_application_name("batch-2");
    CHECK_FALSE(session.ask(policy, "DELETE FROM t").rejects());
    // A reloaded policy does not use what the old one cached.
    RulePolicy reloaded({rule("all-deletes", RuleAction::kReject, {.statements = {"delete"}})});
    CHECK(session.ask(reloaded, "DELETE FROM t").rule == "all-deletes");
    CHECK_FALSE(session.ask(policy, "DELETE FROM t").rejects());
}

TEST_CASE("rules: the table answers a session remembers follow its statements' tables", "[rules]") {
    Rule audit = rule("no-audit", RuleAction::kReject, {.tables = {"audit.*"}});
    Rule orders = rule("orders-notice", RuleAction::kNotice, {.tables = {"public.orders"}}, "orders");
    Rule writes = rule("orders-writes", RuleAction::kLog, {.statements = {"write"}, .tables = {"*.orders"}});
    const std::vector<std::string> statements = {
        "SELECT * FROM audit.log",
        "SELECT * FROM orders",
        "SELECT * FROM orders",
        "UPDATE orders SET x = 1",
        "SELECT * FROM t",
        "SELECT * FROM audit.log JOIN shop.orders USING (id)",
        "SELECT * FROM orders",
        "SELECT * FROM audit.log",
    };
    pgwarden::policy::RuleMatchCache cache;
    Client remembering;
    remembering.cache = &cache;
    const Client plain;
    for (const std::vector<Rule>& set : {std::vector<Rule>{audit, orders, writes}, std::vector<Rule>{writes, orders},
                                         std::vector<Rule>{orders, audit, writes}}) {
        // A reload: the same cache, other rules at the same places.
        RulePolicy policy(set);
        for (int round = 0; round < 2; ++round) {
            for (const auto& sql : statements) {
                INFO(sql);
                const Verdict expected = plain.ask(policy, sql);
                const Verdict got = remembering.ask(policy, sql);
                CHECK(hit_names(got) == hit_names(expected));
                CHECK(got.rejects() == expected.rejects());
                CHECK(got.notices.size() == expected.notices.size());
            }
        }
    }
    // The answers are the rules' own.
    RulePolicy policy({audit, orders, writes});
    CHECK(remembering.ask(policy, "SELECT * FROM audit.log").rejects());
    CHECK(hit_names(remembering.ask(policy, "UPDATE orders SET x = 1")) ==
          std::vector<std::string>{"orders-notice", "orders-writes"});
    CHECK(remembering.ask(policy, "SELECT * FROM t").hits.empty());
}


TEST_CASE("rules: a session's caches change no verdict (random rules, statements, identities and reloads)", "[rules]") {
    std::mt19937 rng(12345);
    auto pick = [&](auto const& v) { return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)]; };
    auto chance = [&](int percent) { return std::uniform_int_distribution<int>(0, 99)(rng) < percent; };
    const std::vector<std::string> apps = {"web-1", "web-2", "batch", "psql"};
    const std::vector<std::string> clients = {"tenant:1", "tenant:2", "x"};
    const std::vector<std::string> sqls = {
        "SELECT * FROM orders", "SELECT * FROM public.orders", "SELECT * FROM audit.log",
        "SELECT * FROM audit.log JOIN orders USING (id)", "UPDATE orders SET x = 1", "DELETE FROM audit.log",
        "INSERT INTO t VALUES (1)", "SELECT 1", "DROP TABLE orders", "SELECT nextval('s')", "FOO BAR",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", "SELECT * FROM \"Orders\"",
        "UPDATE audit.log SET x = 1", "SELECT * FROM t",
    };
    const std::vector<std::vector<std::string>> kinds = {{}, {}, {"write"}, {"delete"}, {"select"}, {"ddl"}, {"update", "delete"}};
    const std::vector<std::vector<std::string>> tables = {{}, {}, {"orders"}, {"audit.*"}, {"public.orders"}, {"*.orders", "t"}, {"nothing"}};
    const std::vector<std::vector<std::string>> appm = {{}, {}, {"web*"}, {"batch"}};
    const std::vector<std::vector<std::string>> clim = {{}, {}, {"tenant:*"}, {"tenant:1"}};
    auto random_rules = [&] {
        std::vector<Rule> rules;
        const int n = std::uniform_int_distribution<int>(0, 8)(rng);
        for (int i = 0; i < n; ++i) {
            Rule r = rule("r" + std::to_string(i),
                          pick(std::vector<RuleAction>{RuleAction::kReject, RuleAction::kDoom, RuleAction::kNotice,
                                                       RuleAction::kLog}),
                          {.application_name = pick(appm), .client = pick(clim), .statements = pick(kinds),
                           .tables = pick(tables)},
                          chance(50) ? "m" + std::to_string(i) : "");
            if (chance(20)) r.nesting = NestingMode::kFlatten;
            rules.push_back(std::move(r));
        }
        return rules;
    };
    for (int session = 0; session < 200; ++session) {
        auto policy = std::make_unique<RulePolicy>(random_rules());
        pgwarden::policy::RuleMatchCache cache;
        Client cached;
        cached.cache = &cache;
        for (int step = 0; step < 200; ++step) {
            const int what = std::uniform_int_distribution<int>(0, 99)(rng);
            if (what < 5) policy = std::make_unique<RulePolicy>(random_rules());
            else if (what < 10) cached.identity.set_application_name(pick(apps));
            else if (what < 15) cached.name = pick(clients);
            else if (what < 18) cached.identity = Client().identity;
            Client plain = cached;
            plain.cache = nullptr;
            const std::string sql = pick(sqls);
            const TxState tx = pick(std::vector<TxState>{TxState::kIdle, TxState::kInBlock, TxState::kFailed});
            INFO(session << " " << step << " " << sql);
            const Verdict expected = plain.ask(*policy, sql, tx);
            const Verdict got = cached.ask(*policy, sql, tx);
            REQUIRE(hit_names(got) == hit_names(expected));
            REQUIRE(got.action == expected.action);
            REQUIRE(got.rule == expected.rule);
            REQUIRE(got.error.message == expected.error.message);
            REQUIRE(got.doom_reason == expected.doom_reason);
            REQUIRE(got.notices.size() == expected.notices.size());
        }
    }
}
