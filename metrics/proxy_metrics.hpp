// pgwarden's own metric families, with the names and labels SPEC.md promises, and the cap
// on distinct `client` label values.
#pragma once
#include <array>
#include <atomic>
#include <cstddef>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <string>
#include <string_view>

#include "metrics/registry.hpp"

namespace pgwarden::metrics {

// Keeps the `client` label from growing without bound: the first `max_clients` distinct
// names pass through, later ones become "other". Lowering the cap on reload keeps the
// names already admitted (their series exist anyway) and admits no new ones until the
// count is under the cap again.
class ClientLabels {
public:
    static constexpr std::string_view kOther = "other";

    explicit ClientLabels(std::size_t max_clients = 100) : max_clients_(max_clients) {}

    // The label value to use for `client`; valid as long as this object.
    std::string_view label(std::string_view client);
    void set_max_clients(std::size_t max_clients);
    std::size_t max_clients() const { return max_clients_.load(std::memory_order_relaxed); }
    std::size_t admitted() const;

private:
    std::atomic<std::size_t> max_clients_;
    mutable std::shared_mutex mutex_;
    std::set<std::string, std::less<>> admitted_;  // nodes never move: views stay valid
};

enum class TransactionOutcome { kCommit, kRollback, kDoomedRollback, kIdleRollback, kFailed };
enum class ByteDirection { kClientToServer, kServerToClient };
enum class ReloadResult { kSuccess, kFailure };
const char* to_string(TransactionOutcome outcome);
const char* to_string(ByteDirection direction);
const char* to_string(ReloadResult result);

// Bucket bounds in seconds: statements from sub-millisecond lookups to 10 s reports;
// throttle delays up to the longest sensible max_delay.
inline constexpr std::array<double, 14> kStatementDurationBuckets{
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
inline constexpr std::array<double, 13> kThrottleDelayBuckets{
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};

// Every family pgwarden exports, registered on construction. Families with a fixed set
// of label values (outcome, direction, result) have those series created up front, so
// dashboards see zeros instead of gaps, and can be reached without a lookup.
struct ProxyMetrics {
    explicit ProxyMetrics(Registry& registry, std::size_t max_clients = 100);

    Registry& registry;
    ClientLabels clients;  // pass every `client` label value through clients.label()

    Gauge& client_connections;              // pgwarden_client_connections
    Gauge& server_connections;              // pgwarden_server_connections
    Counter& client_connections_accepted;   // pgwarden_client_connections_total
    Family<Counter>& statements;            // pgwarden_statements_total{kind,client}
    Family<Histogram>& statement_duration;  // pgwarden_statement_duration_seconds{kind}
    Family<Counter>& throttle_delayed;      // pgwarden_throttle_delayed_total{rule,client}
    Family<Counter>& throttle_rejected;     // pgwarden_throttle_rejected_total{rule,client}
    Family<Histogram>& throttle_delay;      // pgwarden_throttle_delay_seconds{rule}
    Family<Counter>& transactions;          // pgwarden_transactions_total{outcome}
    Family<Counter>& nested_begins;         // pgwarden_nested_begin_total{client,mode}
    Family<Counter>& doomed_transactions;   // pgwarden_doomed_transactions_total{reason}
    Counter& doomed_writes_rejected;        // pgwarden_doomed_writes_rejected_total
    Family<Counter>& rule_hits;             // pgwarden_rule_hits_total{rule,action}
    Family<Counter>& bytes;                 // pgwarden_bytes_total{direction}
    Family<Counter>& config_reloads;        // pgwarden_config_reloads_total{result}
    Family<Counter>& cancel_requests;       // pgwarden_cancel_requests_total{result}
    Counter& auth_failures;                 // pgwarden_auth_failures_total
    Counter& protocol_errors;               // pgwarden_protocol_errors_total
    Family<Counter>& lint_findings;         // pgwarden_lint_findings_total{finding,client}
    Counter& idle_transaction_rollbacks;    // pgwarden_idle_transaction_rollbacks_total
    Counter& upstream_connect_errors;       // pgwarden_upstream_connect_errors_total
    Family<Gauge>& build_info;              // pgwarden_build_info{version}, always 1

    Counter& transaction(TransactionOutcome outcome) const {
        return *transactions_by_outcome_[static_cast<std::size_t>(outcome)];
    }
    Counter& bytes_in(ByteDirection direction) const {
        return *bytes_by_direction_[static_cast<std::size_t>(direction)];
    }
    Counter& config_reload(ReloadResult result) const {
        return *reloads_by_result_[static_cast<std::size_t>(result)];
    }

private:
    std::array<Counter*, 5> transactions_by_outcome_{};
    std::array<Counter*, 2> bytes_by_direction_{};
    std::array<Counter*, 2> reloads_by_result_{};
};

// The process-wide metrics, over a registry that also exports process_* metrics. Created
// on first use; render the page with proxy_metrics().registry.render().
ProxyMetrics& proxy_metrics();

}  // namespace pgwarden::metrics
