// Statement interception for one session: classifies what the client sends, asks the
// transaction tracker and the policy pipeline, and turns their decisions into protocol
// actions (forward, reject, rewrite, answer locally, delay). It keeps a queue of the
// responses the server still owes, so that errors and synthesized results reach the
// client exactly where PostgreSQL would have put them.
//
// How a rejection is made exact: the rejected statement never reaches the server; in its
// place pgwarden sends a probe that fails without side effects (a FETCH or Execute of a
// cursor/portal that cannot exist). The server then does what it does for any error at
// that point (aborts the transaction block, rolls back the implicit transaction, skips
// the rest of the batch until Sync), and pgwarden replaces the probe's error with its own.
// Errors that must NOT abort the server's transaction (a write in a doomed transaction,
// which may go on reading) are answered by pgwarden alone, and the rest of the batch is
// skipped on this side.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/identity.hpp"
#include "policy/pipeline.hpp"
#include "policy/transaction.hpp"
#include "proxy/ring_queue.hpp"
#include "proxy/runtime.hpp"
#include "wire/message_types.hpp"

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

    // Whether this message must wait, before on_client_message sees it, until the server
    // has answered what is in flight: it defines or removes a prepared statement whose
    // earlier definition (or removal) is still unanswered in a batch already ended, so
    // that what the name will mean on the server depends on how that one turned out.
    // Only then (a client redefining a name it expects to have failed) does pgwarden
    // give up pipelining, and only up to that batch's end.
    bool must_wait_for_server(char type, std::string_view message) const {
        // Nothing unanswered, or the server skips this message anyway: the usual case.
        if (queue_.empty() || skip_until_sync_ || server_skipping_) return false;
        // A Bind or Execute waits only on a batch that ended unanswered.
        if ((type == wire::fe::kBind || type == wire::fe::kExecute) && queue_.front().seq >= last_sync_) return false;
        return must_wait_given_queue(type, message);
    }

    // Output for the client that no in-flight response precedes: the caller writes it to
    // the client before forwarding anything more to the server.
    bool has_immediate_output() const { return !immediate_.empty(); }
    std::string take_immediate_output() { return std::exchange(immediate_, {}); }

    struct ResponseStep {
        enum class Action : std::uint8_t { kRelay, kReplace, kDrop };
        Action action = Action::kRelay;
        std::string replacement;  // kReplace: bytes sent to the client instead
        std::string emit_after;   // synthesized messages that follow it
    };
    // Server message types the relay loop must show to on_server_message; everything
    // else (DataRow, CopyData, notices...) is relayed without a call, unless
    // swallowing() says the server's output is currently pgwarden's own.
    static bool observes(char server_type);
    bool swallowing() const { return !queue_.empty() && queue_.front().swallow; }
    ResponseStep on_server_message(char type, std::string_view message);

    // Nothing in flight, the client idle inside a transaction block.
    bool idle_in_transaction() const;
    // Rolls the transaction back on the server for idling: returns the Query to send to
    // the server (its answers are swallowed); the client learns of it at its next statement.
    std::string roll_back_for_idle(const std::string& after);
    // Dooms the current transaction (admin API); "" on success, else why not.
    std::string doom(const std::string& reason);

    // A parameter the server reported (ParameterStatus), also those of the startup.
    void on_parameter(std::string_view name, std::string_view value);
    // A CopyData message from the client (also one relayed in pieces as it arrives): it
    // belongs to a copy when one is running or may yet start.
    void on_copy_data() {
        if (copy_in_ || !queue_.empty()) copy_data_sent_ = true;
    }

    policy::TxState tx_state() const { return tracker_.state(); }
    const policy::TransactionTracker& transaction() const { return tracker_; }
    const policy::ClientIdentity& identity() const { return identity_; }
    std::size_t in_flight() const { return queue_.size(); }

    // A delayed statement was forwarded (or dropped with its session): its throttle
    // reservations are settled. The destructor releases any still held.
    void delay_done() { reservations_.clear(); }
    // The client left while its statement waited: its place in the buckets goes back now,
    // for whoever writes next, not when the session is torn down.
    void abandon_delay() {
        for (auto& r : reservations_) r->release();
        reservations_.clear();
    }
    // The throttle rule that holds the current delay ("" when none).
    const std::string& delaying_rule() const { return delaying_rule_; }

private:
    // Maps keyed by statement or portal name, looked up by the string_view a message holds.
    struct NameHash {
        using is_transparent = void;
        std::size_t operator()(std::string_view name) const { return std::hash<std::string_view>{}(name); }
    };
    template <class T>
    using NameMap = std::unordered_map<std::string, T, NameHash, std::equal_to<>>;
    using StatementMap = NameMap<std::shared_ptr<const policy::Classification>>;

    // What pgwarden expects from the server for one statement of a Query (or one Execute).
    struct Plan {
        enum class Mode : std::uint8_t { kServer, kSynthetic, kProbe, kError };
        Mode mode = Mode::kServer;
        policy::StatementKind kind = policy::StatementKind::kOther;
        bool hidden = false;       // kServer: its completion is pgwarden's business only
        std::string before;        // notices to send when the statement is reached
        std::string tag;           // kSynthetic: its CommandComplete; kServer: tag override
        std::string error;         // kProbe: replaces the server's error; kError: sent as is
        // Prepared-statement bookkeeping done when the statement was sent, undone if the
        // server never runs it (it failed, or an earlier statement did).
        std::string prepared;
        std::string deallocated;
        std::shared_ptr<const policy::Classification> deallocated_value;
        std::shared_ptr<const StatementMap> cleared;  // DEALLOCATE ALL, DISCARD ALL: what was there
        // Set when a row-cost throttle must see the outcome (after()).
        std::shared_ptr<const Policies> throttled_by;
        std::shared_ptr<const policy::Classification> holder;
        const policy::StatementInfo* statement = nullptr;
        std::string client;
    };

    // One message the server has yet to answer (or a synthesized answer in line).
    struct Pending {
        enum class Kind : std::uint8_t {
            kQuery, kParse, kBind, kDescribe, kExecute, kClose, kSync, kFunctionCall, kSynthetic
        };
        Kind kind = Kind::kSync;
        bool started = false;
        bool failed = false;
        bool swallow = false;      // injected by pgwarden: the client sees none of its answers
        std::size_t next = 0;      // plan being answered
        std::vector<Plan> plans;   // kQuery, kExecute
        std::string name;          // kParse: statement name
        bool created = false;      // kParse: the name was new (undo on failure)
        char closed_target = 0;    // kClose: 'S' or 'P' (name in `name`)
        std::string synthetic;     // kSynthetic: everything the client gets for it
        policy::Clock::time_point sent{};
        std::uint64_t seq = 0;     // order of arrival in the queue
        bool ignored = false;      // kSync: sent during COPY FROM STDIN, which the server ignores
        // kParse that redefined a name (the unnamed statement, or one a Close in the same
        // batch freed): what the name meant before, back in place if the server skips it.
        std::shared_ptr<const policy::Classification> previous;

        // Back to a new entry's state, keeping the memory of `plans` and the strings for
        // the next entry in the same slot of the queue.
        void reset() {
            kind = Kind::kSync;
            started = failed = swallow = created = false;
            next = 0;
            plans.clear();
            name.clear();
            closed_target = 0;
            synthetic.clear();
            sent = {};
            ignored = false;
            previous.reset();
        }
    };

    // How one client statement is carried out.
    struct Decision {
        std::vector<policy::ServerStep> steps;  // empty: forward as sent
        std::string notices;                    // NoticeResponse bytes
        std::optional<policy::Clock::time_point> delay_until;
        // For the throttle, which judges what will really be sent.
        const policy::StatementInfo* effective = nullptr;
        std::string client;
        bool throttle_candidate = false;
        std::string prepared;
        std::string deallocated;
        std::shared_ptr<const policy::Classification> deallocated_value;
        std::shared_ptr<const StatementMap> cleared;
    };

    ClientStep on_query(std::string_view sql);
    ClientStep on_parse(std::string_view message);
    ClientStep on_bind(std::string_view message);
    ClientStep on_execute(std::string_view message);
    ClientStep on_close(std::string_view message);
    ClientStep on_function_call();

    Decision decide(const policy::StatementInfo& statement, std::string_view sql, bool extended);
    // The client name for a statement (identity sources, then the statement's tags).
    std::string client_name(const policy::StatementInfo* statement);
    void track_prepared(const policy::StatementInfo& statement, Decision& decision);
    // A Query failed at plan `from`: what it and later statements did to prepared
    // statements did not happen.
    void undo_prepared(Pending& entry, std::size_t from);
    // Moves what a decision did to prepared statements into the plan that carries it.
    void keep_prepared(Plan& plan, Decision& decision);
    void count_statement(const policy::StatementInfo& statement, std::string_view client);
    // Counts and logs what a throttle decided; keeps its reservations.
    void note_throttle(const policy::Verdict& verdict, std::string_view sql, policy::StatementKind kind);
    void attach_throttle(Plan& plan, const std::shared_ptr<const policy::Classification>& holder,
                         const policy::StatementInfo* statement, const std::string& client);
    void log_decision(const policy::Verdict& verdict, const policy::StatementInfo& statement, std::string_view sql,
                      std::string_view client);
    char client_status() const;
    void count_transaction_end(policy::StatementKind kind, std::string_view message);

    // Extended protocol: runs `sql` through reserved statement and portal names.
    void inject_extended(std::string& out, const std::string& sql, Plan plan);
    void push(Pending&& pending);
    // The queue holds a definition or removal of prepared statement `name` (of any name
    // when null) whose answer is still to come, followed by the end of its batch.
    bool definition_unsettled(const std::string_view* name) const;
    bool must_wait_given_queue(char type, std::string_view message) const;
    // push() without moving an entry: the caller fills in the entry returned (in its
    // reset state), then calls pushed(); nothing else may touch the queue in between.
    Pending& emplace(Pending::Kind kind) {
        Pending& entry = queue_.emplace_back();
        entry.kind = kind;
        entry.seq = ++next_seq_;
        return entry;
    }
    void pushed() {
        note_sent(queue_.back());
        if (queue_.size() == 1) activate_front(immediate_);
    }
    // Emits what the front entry says before its first server response (notices and
    // results of statements pgwarden answered itself), popping entries that are
    // entirely synthetic.
    void activate_front(std::string& sink);
    void reach(Pending& entry, std::string& sink);
    void pop_front(std::string& sink);
    void on_error_response(std::string_view message, ResponseStep& step);
    void on_ready_for_query(std::string_view message, ResponseStep& step);

    Runtime& runtime_;
    std::shared_ptr<const policy::Config> config_;
    std::shared_ptr<const Policies> policies_;
    std::uint64_t session_id_;
    std::string session_text_;  // session_id_ as the log lines spell it
    policy::ClientIdentity identity_;
    policy::TransactionTracker tracker_;
    bool errors_in_flight_ = false;  // predictions may be off until the next quiescent 'Z'
    bool skip_until_sync_ = false;   // pgwarden answered an extended-protocol error itself
    bool server_skipping_ = false;   // the server failed this batch; the rest until Sync goes unanswered
    policy::ThrottleMatchCache throttle_matches_;  // which throttle rules take this client
    policy::RuleMatchCache rule_matches_;          // which rules take this client
    // When the Query, Execute or FunctionCall being decided arrived: one clock read serves
    // its latency metric and the throttles.
    policy::Clock::time_point received_{};
    bool probe_until_sync_ = false;  // a probe was sent in this batch: the server skips to Sync
    RingQueue<Pending> queue_;
    std::string immediate_;
    StatementMap statements_;
    // A portal whose statement is unknown maps to null (as does one that ended with its
    // transaction, until the name is bound again): Execute treats both as unknown.
    struct Portal {
        std::shared_ptr<const policy::Classification> classification;
        std::uint64_t bound = 0;  // seq of its Bind
    };
    NameMap<Portal> portals_;
    // What a name means to the server for a Bind, Execute, EXECUTE or FETCH: null when it
    // is not known here or a Close of it is in flight (judged as unknown).
    const std::shared_ptr<const policy::Classification>* statement_named(std::string_view name) const;
    const Portal* portal_named(std::string_view name) const;
    // Entries get increasing numbers as they join the queue, so "still unanswered" is a
    // comparison with the front's. last_sync_ is the client's latest Sync.
    std::uint64_t next_seq_ = 0;
    // COPY FROM STDIN: the server is reading copy data (client Syncs go unanswered).
    bool copy_in_ = false;
    // The client sent copy data, and no CopyDone or CopyFail since (see the Sync case).
    bool copy_data_sent_ = false;
    // The client's CopyDone and CopyFail messages sent while no copy was known to have
    // started, in order: for each, the seq of the last entry before it, and how many came
    // there. The server ends each COPY FROM STDIN at the first of them after the message
    // that started it; the ones it meets outside a copy it ignores.
    struct CopyEnd {
        std::uint64_t after = 0;
        std::uint32_t count = 0;
    };
    std::vector<CopyEnd> copy_ends_;
    void on_copy_in_response();
    void drop_copy_ends_before(std::uint64_t seq);
    std::uint64_t last_sync_ = 0;
    // The latest Query, Bind, Execute or FunctionCall sent to the server, and the entry
    // the latest ReadyForQuery answered (see Reading).
    std::uint64_t last_exec_seq_ = 0;
    std::uint64_t last_ready_seq_ = 0;
    void note_sent(const Pending& entry) {
        if (entry.kind == Pending::Kind::kQuery || entry.kind == Pending::Kind::kBind ||
            entry.kind == Pending::Kind::kExecute || entry.kind == Pending::Kind::kFunctionCall)
            last_exec_seq_ = entry.seq;
    }
    // Names whose latest Parse replaced a definition and may yet be skipped (something
    // before it in its batch may fail, which leaves the one before): seq of that Parse.
    NameMap<std::uint64_t> redefining_;
    // How the server reads text that libpg_query reads otherwise (see classify()).
    bool backslashes_differ_ = false;
    bool high_bytes_differ_ = false;
    bool names_converted_ = false;
    std::string client_encoding_ = "UTF8";
    std::string server_encoding_ = "UTF8";
    std::shared_ptr<const policy::Classification> classify(std::string_view sql) const;
    bool name_converted(std::string_view name, std::uint64_t before) const {
        return name.size() >= 16 && long_name_converted(name, before);
    }
    bool long_name_converted(std::string_view name, std::uint64_t before) const;
    // Whether something the client sent may have changed those settings without pgwarden
    // knowing yet: any Query, Bind (planning the unnamed statement may run a function),
    // Execute or FunctionCall (SET, set_config, a function or trigger) sent after the
    // latest ReadyForQuery pgwarden has seen. The server reports a changed setting only
    // just before its next ReadyForQuery, and reads what follows under the new value at
    // once; an answer without ReadyForQuery (Flush, or the batch still open) says nothing.
    enum class Reading : std::uint8_t {
        kSettled,    // nothing sent since the latest ReadyForQuery may have changed them
        kAwaitable,  // something may have, and a ReadyForQuery after it will come without
                     // more from the client (a Query of its own, a Sync in an ended batch)
        kUnsettled,  // something may have, and no such ReadyForQuery is on its way
    };
    Reading reading_before(std::uint64_t before) const;
    bool reading_awaited(std::string_view sql) const;
    bool unanswered(std::uint64_t seq) const { return !queue_.empty() && queue_.front().seq <= seq; }
    // A Bind (or Parse) in a batch that ended, still unanswered.
    bool bind_unanswered(std::uint64_t seq) const { return seq < last_sync_ && unanswered(seq); }
    bool redefinition_unanswered(std::string_view name) const;
    // EXECUTE or FETCH of a name whose meaning awaits such an answer.
    bool use_unsettled(const policy::StatementInfo& statement) const;
    // Names with a Close in flight (count of Closes): uses of them count as unknown.
    NameMap<int> closing_statements_;
    NameMap<int> closing_portals_;
    static constexpr std::size_t kKeptPortalNames = 8;
    std::optional<policy::ClientIdentity> identity_at_query_start_;
    std::vector<std::shared_ptr<policy::Reservation>> reservations_;
    // Lint: consecutive autocommitted writes (a finding at kAutocommitRunLength, once per run).
    static constexpr int kAutocommitRunLength = 20;
    static constexpr auto kAutocommitRunGap = std::chrono::seconds(1);
    int autocommit_run_ = 0;
    policy::Clock::time_point last_autocommit_write_{};
    std::string delaying_rule_;
    // client_name(): the name of untagged statements, for this identity version and configuration.
    std::string resolved_client_;
    std::shared_ptr<const policy::Config> resolved_config_;
    std::uint64_t resolved_version_ = 0;

    // Cached counters for pgwarden_statements_total: one per kind for the current client.
    std::string counted_client_;
    std::vector<void*> statement_counters_;
};

}  // namespace pgwarden::proxy
