// Transaction tracking, nesting modes and doom.
#include "policy/transaction.hpp"

namespace pgwarden::policy {
namespace {

ServerStep sql(std::string text, std::string tag = {}, bool hidden = false) {
    ServerStep s;
    s.type = ServerStep::Type::kSql;
    s.sql = std::move(text);
    s.tag = std::move(tag);
    s.hidden = hidden;
    return s;
}
ServerStep synthetic(std::string tag) {
    ServerStep s;
    s.type = ServerStep::Type::kSynthetic;
    s.tag = std::move(tag);
    return s;
}
ServerStep failure(ServerStep::Type type, Message m) {
    ServerStep s;
    s.type = type;
    s.error = std::move(m);
    return s;
}

// The command tag PostgreSQL gives each spelling.
std::string begin_tag(const StatementInfo& s) { return s.is_start_transaction ? "START TRANSACTION" : "BEGIN"; }

bool ends_transaction(StatementKind kind) {
    return kind == StatementKind::kCommit || kind == StatementKind::kRollback ||
           kind == StatementKind::kPrepareTransaction;
}

}  // namespace

std::string nesting_savepoint_name(int depth) { return "pgwarden_nested_" + std::to_string(depth); }

void TransactionTracker::end_transaction() {
    state_ = TxState::kIdle;
    depth_ = 0;
    doom_reason_.reset();
    server_read_only_ = false;
    outer_begin_.clear();
}

bool TransactionTracker::doom(const std::string& reason) {
    if (state_ == TxState::kIdle || idle_rolled_back_) return false;
    if (!doom_reason_) doom_reason_ = reason;
    return true;
}

void TransactionTracker::rolled_back_for_idle(const std::string& after) {
    end_transaction();
    idle_rolled_back_ = true;
    idle_error_reported_ = false;
    idle_after_ = after;
}

void TransactionTracker::on_error() {
    if (state_ == TxState::kInBlock) state_ = TxState::kFailed;
}

void TransactionTracker::on_ready_for_query(TxState actual) {
    if (idle_rolled_back_) return;  // the client is shown a failed block the server no longer has
    if (actual == TxState::kIdle && state_ != TxState::kIdle) end_transaction();
    state_ = actual;
}

TransactionDecision TransactionTracker::on_statement(const StatementInfo& s, std::string_view text,
                                                     NestingMode mode) {
    TransactionDecision d;
    const StatementKind kind = s.kind;

    if (idle_rolled_back_) {
        // The server rolled back already; the client still has to end its transaction.
        d.final = true;
        if (ends_transaction(kind)) {
            idle_rolled_back_ = false;
            // PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK.
            if (s.chain) {
                d.steps.push_back(sql("BEGIN", "ROLLBACK"));
                state_ = TxState::kInBlock;
            } else {
                d.steps.push_back(synthetic("ROLLBACK"));
            }
            return d;
        }
        Message m;
        if (!idle_error_reported_) {
            idle_error_reported_ = true;
            m = {"25P03", "pgwarden: transaction rolled back after " + idle_after_ + " idle in transaction",
                 "The transaction was idle longer than idle_timeout; its locks were released.",
                 "End the transaction with ROLLBACK."};
        } else {
            m = {"25P02", "current transaction is aborted, commands ignored until end of transaction block", "", ""};
        }
        d.steps.push_back(failure(ServerStep::Type::kError, std::move(m)));
        return d;
    }

    switch (kind) {
        case StatementKind::kBegin: {
            if (state_ == TxState::kIdle) {
                state_ = TxState::kInBlock;
                depth_ = 0;
                outer_begin_ = std::string(text.substr(0, 200));
                began_at_ = std::chrono::steady_clock::now();
                return d;
            }
            if (state_ == TxState::kFailed) return d;  // the server refuses it (25P02)
            d.nested_begin = true;
            switch (mode) {
                case NestingMode::kWarn:
                    ++depth_;
                    return d;
                case NestingMode::kReject:
                    d.final = true;
                    state_ = TxState::kFailed;
                    d.steps.push_back(failure(
                        ServerStep::Type::kProbe,
                        {"25001", "pgwarden: nested BEGIN rejected",
                         "A transaction is already in progress; it began with: " + outer_begin_,
                         "Commit or roll back the outer transaction first, or use SAVEPOINT."}));
                    return d;
                case NestingMode::kFlatten:
                    d.final = true;
                    ++depth_;
                    d.steps.push_back(synthetic(begin_tag(s)));
                    return d;
                case NestingMode::kSavepoint:
                    d.final = true;
                    ++depth_;
                    d.steps.push_back(sql("SAVEPOINT " + nesting_savepoint_name(depth_), begin_tag(s)));
                    return d;
            }
            return d;
        }
        case StatementKind::kCommit:
        case StatementKind::kPrepareTransaction: {
            if (state_ == TxState::kIdle) return d;  // the server warns: no transaction in progress
            const bool prepare = kind == StatementKind::kPrepareTransaction;
            if (depth_ > 0 && !prepare) {
                switch (mode) {
                    case NestingMode::kWarn:
                    case NestingMode::kReject:
                        d.early_commit = true;
                        break;  // the server commits everything, as it always would
                    case NestingMode::kFlatten:
                        d.final = true;
                        --depth_;
                        d.steps.push_back(synthetic("COMMIT"));
                        return d;
                    case NestingMode::kSavepoint:
                        d.final = true;
                        d.steps.push_back(sql("RELEASE SAVEPOINT " + nesting_savepoint_name(depth_), "COMMIT"));
                        --depth_;
                        return d;
                }
            } else if (depth_ > 0 && prepare) {
                d.early_commit = true;
            }
            if (doom_reason_) {
                d.final = true;
                d.doomed_commit = true;
                d.steps.push_back(sql("ROLLBACK", "", true));
                d.steps.push_back(failure(ServerStep::Type::kProbe,
                                          {"40000", "pgwarden: transaction was doomed and has been rolled back",
                                           "The transaction was doomed (" + *doom_reason_ + ").", ""}));
                end_transaction();
                return d;
            }
            bool chain = s.chain;
            end_transaction();
            if (chain && !prepare) {
                state_ = TxState::kInBlock;
                began_at_ = std::chrono::steady_clock::now();
            }
            return d;
        }
        case StatementKind::kRollback: {
            if (state_ == TxState::kIdle) return d;
            if (depth_ > 0 && (mode == NestingMode::kFlatten || mode == NestingMode::kSavepoint)) {
                d.final = true;
                if (mode == NestingMode::kSavepoint) {
                    std::string name = nesting_savepoint_name(depth_);
                    d.steps.push_back(sql("ROLLBACK TO SAVEPOINT " + name, "ROLLBACK"));
                    d.steps.push_back(sql("RELEASE SAVEPOINT " + name, "", true));
                    --depth_;
                    if (state_ == TxState::kFailed) state_ = TxState::kInBlock;
                    server_read_only_ = false;  // undone with the savepoint, if set inside it
                    return d;
                }
                --depth_;
                if (!doom_reason_) d.doomed_now = "inner_rollback";
                doom("inner_rollback");
                if (state_ == TxState::kFailed) {
                    // The block failed inside the inner scope: nothing of it can commit
                    // any more, but a doomed transaction must still read, so it goes on as
                    // a fresh read-only transaction.
                    d.steps.push_back(sql("ROLLBACK", "", true));
                    d.steps.push_back(sql("BEGIN READ ONLY", "", true));
                    state_ = TxState::kInBlock;
                    server_read_only_ = true;
                }
                d.steps.push_back(synthetic("ROLLBACK"));
                return d;
            }
            bool chain = s.chain;
            end_transaction();
            if (chain) {
                state_ = TxState::kInBlock;
                began_at_ = std::chrono::steady_clock::now();
            }
            return d;
        }
        case StatementKind::kRollbackTo:
            if (state_ == TxState::kFailed) state_ = TxState::kInBlock;
            // SET TRANSACTION READ ONLY made after the savepoint is undone with it.
            server_read_only_ = false;
            return d;
        default:
            break;
    }

    if (doom_reason_ && state_ == TxState::kInBlock && s.is_write) {
        d.final = true;
        d.doomed_write_rejected = true;
        d.steps.push_back(failure(ServerStep::Type::kError,
                                  {"25006", "pgwarden: transaction is doomed",
                                   "Writes are refused in a doomed transaction (" + *doom_reason_ + ").",
                                   "Reads still work; end the transaction with ROLLBACK."}));
        return d;
    }
    return d;
}

}  // namespace pgwarden::policy
