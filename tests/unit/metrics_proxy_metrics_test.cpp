// pgwarden's families keep the names and labels SPEC.md promises, and the client cap.
#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <thread>
#include <vector>

#include "metrics/proxy_metrics.hpp"
#include "pgwarden_version.hpp"

using namespace pgwarden::metrics;

TEST_CASE("the first max_clients client names pass, the rest become other") {
    ClientLabels labels(3);
    CHECK(labels.label("a") == "a");
    CHECK(labels.label("b") == "b");
    CHECK(labels.label("a") == "a");
    CHECK(labels.label("c") == "c");
    CHECK(labels.label("d") == "other");
    CHECK(labels.label("e") == "other");
    CHECK(labels.label("b") == "b");  // admitted names stay admitted
    CHECK(labels.admitted() == 3);
}

TEST_CASE("raising the cap admits new names; lowering it keeps the admitted ones") {
    ClientLabels labels(1);
    CHECK(labels.label("a") == "a");
    CHECK(labels.label("b") == "other");
    labels.set_max_clients(2);
    CHECK(labels.label("b") == "b");
    CHECK(labels.label("c") == "other");
    labels.set_max_clients(1);
    CHECK(labels.label("a") == "a");
    CHECK(labels.label("b") == "b");
    CHECK(labels.label("c") == "other");
    CHECK(labels.max_clients() == 1);
}

TEST_CASE("a cap of zero sends every client to other") {
    ClientLabels labels(0);
    CHECK(labels.label("a") == "other");
    CHECK(labels.admitted() == 0);
}

TEST_CASE("the client cap holds exactly under concurrent first sightings") {
    ClientLabels labels(100);
    // Catch2 assertions are not thread-safe: threads record, the main thread checks.
    std::vector<std::set<std::string>> passed(8);
    std::vector<int> unexpected(8, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            for (int i = 0; i < 200; ++i) {
                const std::string name = "client" + std::to_string((i * 7 + t * 13) % 300);
                const std::string_view label = labels.label(name);
                if (label == name) {
                    passed[t].insert(name);
                } else if (label != ClientLabels::kOther) {
                    ++unexpected[t];
                }
            }
        });
    }
    for (auto& thread : threads)
        thread.join();
    for (const int count : unexpected)
        CHECK(count == 0);
    std::set<std::string> all;
    for (const auto& names : passed)
        all.insert(names.begin(), names.end());
    CHECK(labels.admitted() == 100);
    CHECK(all.size() == 100);
}

TEST_CASE("every family SPEC.md names is exported with its labels") {
    Registry registry(ProcessMetrics::kExclude);
    ProxyMetrics metrics(registry, 10);
    metrics.statements.labels({"select", std::string(metrics.clients.label("app"))}).inc();
    metrics.statement_duration.labels({"select"}).observe(0.002);
    metrics.throttle_delayed.labels({"slow_writes", "app"}).inc();
    metrics.throttle_rejected.labels({"slow_writes", "app"}).inc();
    metrics.throttle_delay.labels({"slow_writes"}).observe(0.3);
    metrics.nested_begins.labels({"app", "warn"}).inc();
    metrics.doomed_transactions.labels({"rule"}).inc();
    metrics.rule_hits.labels({"no_drop", "reject"}).inc();
    metrics.cancel_requests.labels({"forwarded"}).inc();
    metrics.lint_findings.labels({"update_without_where", "app"}).inc();
    metrics.transaction(TransactionOutcome::kDoomedRollback).inc();
    metrics.bytes_in(ByteDirection::kServerToClient).inc(4096);
    metrics.config_reload(ReloadResult::kFailure).inc();
    metrics.client_connections.inc();
    metrics.client_connections_accepted.inc();

    const std::string page = registry.render();
    auto has = [&](const std::string& line) {
        INFO(line);
        CHECK(page.find("\n" + line + "\n") != std::string::npos);
    };
    has("# TYPE pgwarden_client_connections gauge");
    has("pgwarden_client_connections 1");
    has("# TYPE pgwarden_server_connections gauge");
    has("pgwarden_server_connections 0");
    has("# TYPE pgwarden_client_connections_total counter");
    has("pgwarden_client_connections_total 1");
    has(R"(pgwarden_statements_total{kind="select",client="app"} 1)");
    has("# TYPE pgwarden_statement_duration_seconds histogram");
    has(R"(pgwarden_statement_duration_seconds_bucket{kind="select",le="0.0025"} 1)");
    has(R"(pgwarden_statement_duration_seconds_bucket{kind="select",le="0.0005"} 0)");
    has(R"(pgwarden_statement_duration_seconds_bucket{kind="select",le="10"} 1)");
    has(R"(pgwarden_throttle_delayed_total{rule="slow_writes",client="app"} 1)");
    has(R"(pgwarden_throttle_rejected_total{rule="slow_writes",client="app"} 1)");
    has(R"(pgwarden_throttle_delay_seconds_count{rule="slow_writes"} 1)");
    for (const char* outcome : {"commit", "rollback", "idle_rollback", "failed"}) {
        has(std::string(R"(pgwarden_transactions_total{outcome=")") + outcome + "\"} 0");
    }
    has(R"(pgwarden_transactions_total{outcome="doomed_rollback"} 1)");
    has(R"(pgwarden_nested_begin_total{client="app",mode="warn"} 1)");
    has(R"(pgwarden_doomed_transactions_total{reason="rule"} 1)");
    has("pgwarden_doomed_writes_rejected_total 0");
    has(R"(pgwarden_rule_hits_total{rule="no_drop",action="reject"} 1)");
    has(R"(pgwarden_bytes_total{direction="client_to_server"} 0)");
    has(R"(pgwarden_bytes_total{direction="server_to_client"} 4096)");
    has(R"(pgwarden_config_reloads_total{result="success"} 0)");
    has(R"(pgwarden_config_reloads_total{result="failure"} 1)");
    has(R"(pgwarden_cancel_requests_total{result="forwarded"} 1)");
    has("pgwarden_auth_failures_total 0");
    has("pgwarden_protocol_errors_total 0");
    has(R"(pgwarden_lint_findings_total{finding="update_without_where",client="app"} 1)");
    has("pgwarden_idle_transaction_rollbacks_total 0");
    has("pgwarden_upstream_connect_errors_total 0");
    has(std::string(R"(pgwarden_build_info{version=")") + PGWARDEN_VERSION + "\"} 1");
}

TEST_CASE("the global proxy metrics are one object with process metrics") {
    ProxyMetrics& metrics = proxy_metrics();
    CHECK(&metrics == &proxy_metrics());
    metrics.protocol_errors.inc();
    const std::string page = metrics.registry.render();
    CHECK(page.find("\npgwarden_protocol_errors_total 1\n") != std::string::npos);
    CHECK(page.find("\nprocess_open_fds ") != std::string::npos);
}
