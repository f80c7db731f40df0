// Registers pgwarden's metric families; names follow Prometheus conventions (_total,
// _seconds, _bytes) as SPEC.md "Metrics and admin" lists them.
#include "metrics/proxy_metrics.hpp"

#include <vector>

#include "pgwarden_version.hpp"

namespace pgwarden::metrics {

std::string_view ClientLabels::label(std::string_view client) {
    {
        std::shared_lock lock(mutex_);
        if (auto it = admitted_.find(client); it != admitted_.end()) return *it;
        if (admitted_.size() >= max_clients()) return kOther;
    }
    std::unique_lock lock(mutex_);
    if (auto it = admitted_.find(client); it != admitted_.end()) return *it;
    // Checked again: another thread may have filled the last place meanwhile.
    if (admitted_.size() >= max_clients()) return kOther;
    return *admitted_.emplace(client).first;
}

void ClientLabels::set_max_clients(std::size_t max_clients) {
    max_clients_.store(max_clients, std::memory_order_relaxed);
}

std::size_t ClientLabels::admitted() const {
    std::shared_lock lock(mutex_);
    return admitted_.size();
}

const char* to_string(TransactionOutcome outcome) {
    switch (outcome) {
        case TransactionOutcome::kCommit: return "commit";
        case TransactionOutcome::kRollback: return "rollback";
        case TransactionOutcome::kDoomedRollback: return "doomed_rollback";
        case TransactionOutcome::kIdleRollback: return "idle_rollback";
        case TransactionOutcome::kFailed: return "failed";
    }
    return "unknown";
}

const char* to_string(ByteDirection direction) {
    switch (direction) {
        case ByteDirection::kClientToServer: return "client_to_server";
        case ByteDirection::kServerToClient: return "server_to_client";
    }
    return "unknown";
}

const char* to_string(ReloadResult result) {
    switch (result) {
        case ReloadResult::kSuccess: return "success";
        case ReloadResult::kFailure: return "failure";
    }
    return "unknown";
}

namespace {

template <std::size_t N>
std::vector<double> bounds(const std::array<double, N>& buckets) {
    return {buckets.begin(), buckets.end()};
}

}  // namespace

ProxyMetrics::ProxyMetrics(Registry& reg, std::size_t max_clients)
    : registry(reg),
      clients(max_clients),
      client_connections(
          reg.gauge("pgwarden_client_connections", "Client connections open now.", {}).labels({})),
      server_connections(reg.gauge("pgwarden_server_connections",
                                   "Connections to the upstream PostgreSQL server open now.", {})
                             .labels({})),
      client_connections_accepted(
          reg.counter("pgwarden_client_connections_total", "Client connections accepted.", {})
              .labels({})),
      statements(reg.counter("pgwarden_statements_total",
                             "Statements received from clients, by statement kind.",
                             {"kind", "client"})),
      statement_duration(reg.histogram(
          "pgwarden_statement_duration_seconds",
          "Time from receiving a statement to the server's CommandComplete, in seconds.", {"kind"},
          bounds(kStatementDurationBuckets))),
      throttle_delayed(reg.counter("pgwarden_throttle_delayed_total",
                                   "Writes held back by a throttle rule before being relayed.",
                                   {"rule", "client"})),
      throttle_rejected(reg.counter("pgwarden_throttle_rejected_total",
                                    "Writes refused by a throttle rule.", {"rule", "client"})),
      throttle_delay(reg.histogram("pgwarden_throttle_delay_seconds",
                                   "How long throttled writes were held back, in seconds.",
                                   {"rule"}, bounds(kThrottleDelayBuckets))),
      transactions(reg.counter("pgwarden_transactions_total",
                               "Transactions ended, by how they ended.", {"outcome"})),
      nested_begins(reg.counter("pgwarden_nested_begin_total",
                                "BEGINs received inside an open transaction, by nesting mode.",
                                {"client", "mode"})),
      doomed_transactions(reg.counter("pgwarden_doomed_transactions_total",
                                      "Transactions marked doomed, by reason.", {"reason"})),
      doomed_writes_rejected(reg.counter("pgwarden_doomed_writes_rejected_total",
                                         "Writes and commits refused in doomed transactions.", {})
                                 .labels({})),
      rule_hits(reg.counter("pgwarden_rule_hits_total", "Statements that matched a rule.",
                            {"rule", "action"})),
      bytes(reg.counter("pgwarden_bytes_total", "Bytes relayed, by direction.", {"direction"})),
      config_reloads(reg.counter("pgwarden_config_reloads_total",
                                 "Configuration reloads, by result.", {"result"})),
      cancel_requests(reg.counter("pgwarden_cancel_requests_total",
                                  "CancelRequest packets received, by result.", {"result"})),
      auth_failures(reg.counter("pgwarden_auth_failures_total",
                                "Client connections that failed authentication.", {})
                        .labels({})),
      protocol_errors(reg.counter("pgwarden_protocol_errors_total",
                                  "Connections closed for breaking the wire protocol or its "
                                  "limits.",
                                  {})
                          .labels({})),
      lint_findings(reg.counter("pgwarden_lint_findings_total",
                                "Statement lint findings, by finding.", {"finding", "client"})),
      idle_transaction_rollbacks(reg.counter("pgwarden_idle_transaction_rollbacks_total",
                                             "Transactions rolled back for staying idle too "
                                             "long.",
                                             {})
                                     .labels({})),
      upstream_connect_errors(reg.counter("pgwarden_upstream_connect_errors_total",
                                          "Failed attempts to connect to the upstream server.", {})
                                  .labels({})),
      build_info(reg.gauge("pgwarden_build_info",
                           "Always 1; the version label names the running build.", {"version"})) {
    for (auto outcome : {TransactionOutcome::kCommit, TransactionOutcome::kRollback,
                         TransactionOutcome::kDoomedRollback, TransactionOutcome::kIdleRollback,
                         TransactionOutcome::kFailed}) {
        transactions_by_outcome_[static_cast<std::size_t>(outcome)] =
            &transactions.labels({to_string(outcome)});
    }
    for (auto direction : {ByteDirection::kClientToServer, ByteDirection::kServerToClient}) {
        bytes_by_direction_[static_cast<std::size_t>(direction)] =
            &bytes.labels({to_string(direction)});
    }
    for (auto result : {ReloadResult::kSuccess, ReloadResult::kFailure}) {
        reloads_by_result_[static_cast<std::size_t>(result)] =
            &config_reloads.labels({to_string(result)});
    }
    build_info.labels({PGWARDEN_VERSION}).set(1);
}

ProxyMetrics& proxy_metrics() {
    // Never destroyed: sessions may still count while static destructors run at exit.
    static auto* const registry = new Registry(ProcessMetrics::kInclude);
    static auto* const metrics = new ProxyMetrics(*registry);
    return *metrics;
}

}  // namespace pgwarden::metrics
