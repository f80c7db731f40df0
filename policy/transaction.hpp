// The transaction as pgwarden sees it: idle, in a block, failed; how deeply the client
// has nested BEGINs inside it; whether it is doomed (may read, can neither write nor
// commit); whether pgwarden rolled it back for idling. For each transaction-control
// statement it decides what the server should really run and what the client should
// see, per nesting mode. Pure logic: the proxy turns decisions into messages.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/pipeline.hpp"

namespace pgwarden::policy {

// One statement the server runs in place of (part of) what the client sent.
struct ServerStep {
    enum class Type : std::uint8_t {
        kOriginal,   // the client's statement, unchanged
        kSql,        // pgwarden's own SQL
        kSynthetic,  // nothing reaches the server; the client gets `tag`
        kProbe,      // fail here with `error`; the server aborts as for any error
        kError,      // fail here with `error` without the server: its transaction goes on
    };
    Type type = Type::kOriginal;
    std::string sql;     // kSql
    std::string tag;     // kSynthetic: the tag; kOriginal/kSql: the tag the client sees ("" = server's)
    bool hidden = false; // kSql: its completion is not shown to the client
    Message error;       // kProbe, kError
};

struct TransactionDecision {
    std::vector<ServerStep> steps;   // empty = forward unchanged (and run the policy pipeline)
    std::vector<Message> notices;    // sent before the statement's results
    bool final = false;              // steps decided; skip the policy pipeline
    // Events for metrics and logs.
    bool nested_begin = false;
    bool early_commit = false;       // COMMIT at nested depth > 0 (warn mode)
    std::optional<std::string> doomed_now;  // reason, when this statement dooms the transaction
    bool doomed_write_rejected = false;
    bool doomed_commit = false;      // COMMIT of a doomed transaction rolled back
};

class TransactionTracker {
public:
    TxState state() const { return state_; }
    int depth() const { return depth_; }
    const std::optional<std::string>& doom_reason() const { return doom_reason_; }
    bool rolled_back_for_idle() const { return idle_rolled_back_; }
    const std::string& outer_begin_statement() const { return outer_begin_; }
    std::chrono::steady_clock::time_point began_at() const { return began_at_; }

    // Decides how a statement runs, given the nesting mode for this client, and
    // advances the predicted state as if it succeeds.
    TransactionDecision on_statement(const StatementInfo& statement, std::string_view sql, NestingMode mode);

    // Dooms the current transaction block (no-op outside one). Returns false when there
    // is no transaction to doom.
    bool doom(const std::string& reason);
    // Whether the server has been told to make the transaction read-only since it was
    // doomed (SET TRANSACTION READ ONLY); ROLLBACK TO SAVEPOINT undoes that.
    bool server_read_only() const { return server_read_only_; }
    void set_server_read_only() { server_read_only_ = true; }

    // The transaction was rolled back on the server after idling too long; `after`
    // says how long ("30s") for the client's error message.
    void rolled_back_for_idle(const std::string& after);

    // A statement failed: inside a block the transaction is now failed.
    void on_error();
    // The server's ReadyForQuery when nothing is in flight: the truth.
    void on_ready_for_query(TxState actual);

private:
    void end_transaction();
    TxState state_ = TxState::kIdle;
    int depth_ = 0;
    std::optional<std::string> doom_reason_;
    bool server_read_only_ = false;
    bool idle_rolled_back_ = false;
    bool idle_error_reported_ = false;
    std::string idle_after_;
    std::string outer_begin_;
    std::chrono::steady_clock::time_point began_at_{};
};

// Names of pgwarden's own savepoints for nesting depth `depth` (1-based).
std::string nesting_savepoint_name(int depth);

}  // namespace pgwarden::policy
