// Statement interception for one session: classifies what the client sends, asks the
// policy pipeline, and turns verdicts into protocol actions (forward, reject, rewrite,
// delay). It keeps a queue of the responses the server still owes, so that errors and
// synthesized results reach the client exactly where PostgreSQL would have put them,
// and predicts the transaction state between ReadyForQuery messages.
//
// How a rejection is made exact: the rejected statement never reaches the server; in its
// place pgwarden sends a probe that fails without side effects (a FETCH or Execute of a
// cursor/portal that cannot exist). The server then does what it does for any error at
// that point (aborts the transaction block, rolls back the implicit transaction, skips
// the rest of the batch until Sync), and pgwarden replaces the probe's error with its own.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/identity.hpp"
#include "policy/pipeline.hpp"
#include "proxy/runtime.hpp"

namespace pgwarden::proxy {

class Interceptor {
public:
    Interceptor(Runtime& runtime, std::uint64_t session_id, policy::ClientIdentity identity);
    ~Interceptor();

    struct ClientStep {
        enum class Action : std::uint8_t { kForward, kReplace, kDrop };
        Action action = Action::kForward;
        std::string replacement;  // kReplace: bytes sent to the server instead
        std::optional<policy::Clock::time_point> delay_until;
    };
    // One complete client message (header included).
    ClientStep on_client_message(char type, std::string_view message);

    // Output for the client that no in-flight response precedes: the caller writes it to
    // the client before forwarding anything more to the server.
    bool has_immediate_output() const { return !immediate_.empty(); }
    std::string take_immediate_output() { return std::exchange(immediate_, {}); }

    struct ServerStep {
        enum class Action : std::uint8_t { kRelay, kReplace, kDrop };
        Action action = Action::kRelay;
        std::string replacement;  // kReplace: bytes sent to the client instead
        std::string emit_after;   // synthesized messages that follow it
    };
    // Server message types the relay loop must show to on_server_message; everything
    // else (DataRow, CopyData, notices...) is relayed without a call.
    static bool observes(char server_type);
    ServerStep on_server_message(char type, std::string_view message);

    policy::TxState tx_state() const { return tx_; }
    const policy::ClientIdentity& identity() const { return identity_; }
    std::size_t in_flight() const { return queue_.size(); }

private:
    // What pgwarden expects from the server for one statement of a Query (or one Execute).
    struct Plan {
        enum class Mode : std::uint8_t { kServer, kSynthetic, kProbe };
        Mode mode = Mode::kServer;
        policy::StatementKind kind = policy::StatementKind::kOther;
        std::string before;        // notices to send when the statement is reached
        std::string tag;           // kSynthetic: its CommandComplete; kServer: tag override
        std::string probe_error;   // kProbe: the ErrorResponse that replaces the server's
    };

    // One client message the server has yet to answer (or a synthesized answer in line).
    struct Pending {
        enum class Kind : std::uint8_t {
            kQuery, kParse, kBind, kDescribe, kExecute, kClose, kSync, kFunctionCall, kSynthetic
        };
        Kind kind = Kind::kSync;
        bool started = false;
        bool failed = false;
        std::size_t next = 0;          // plan being answered
        std::vector<Plan> plans;       // kQuery, kExecute
        std::string name;              // kParse: statement name
        bool created = false;          // kParse: the name was new (undo on failure)
        std::string synthetic;         // kSynthetic: everything the client gets for it
        policy::Clock::time_point sent{};
    };

    ClientStep on_query(std::string_view sql);
    ClientStep on_parse(std::string_view message);
    ClientStep on_bind(std::string_view message);
    ClientStep on_execute(std::string_view message);
    ClientStep on_close(std::string_view message);
    ClientStep on_function_call();

    // Runs the pipeline for one statement and updates the predicted session state as if
    // it succeeds. Returns the verdict.
    policy::Verdict decide(const policy::StatementInfo& statement, std::string_view sql, bool extended);
    void predict_effects(const policy::StatementInfo& statement);
    void count_statement(const policy::StatementInfo& statement, std::string_view client);
    void log_decision(const policy::Verdict& verdict, const policy::StatementInfo& statement, std::string_view sql,
                      std::string_view client);

    void push(Pending pending);
    // Emits what the front entry says before its first server response (notices and
    // results of statements pgwarden answered itself), popping entries that are
    // entirely synthetic.
    void activate_front(std::string& sink);
    void reach(Pending& entry, std::string& sink);
    void complete_plan(Pending& entry, std::string_view tag, std::string_view sqlstate);
    void pop_front(std::string& sink);
    void on_error_response(std::string_view message, ServerStep& step);
    void on_ready_for_query(std::string_view message, ServerStep& step);

    Runtime& runtime_;
    std::shared_ptr<const policy::Config> config_;
    std::shared_ptr<const Policies> policies_;
    std::uint64_t session_id_;
    policy::ClientIdentity identity_;
    policy::TxState tx_ = policy::TxState::kIdle;
    bool errors_in_flight_ = false;  // predictions may be off until the next quiescent 'Z'
    std::deque<Pending> queue_;
    std::string immediate_;
    std::unordered_map<std::string, std::shared_ptr<const policy::Classification>> statements_;
    std::unordered_map<std::string, std::shared_ptr<const policy::Classification>> portals_;
    std::optional<policy::ClientIdentity> identity_at_query_start_;

    // Cached counters for pgwarden_statements_total: one per kind for the current client.
    std::string counted_client_;
    std::vector<void*> statement_counters_;
};

}  // namespace pgwarden::proxy
