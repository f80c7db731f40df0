// Statement interception: from client messages to verdicts to protocol actions, and
// from server responses back to the statements they answer.
#include "proxy/interceptor.hpp"

#include "metrics/proxy_metrics.hpp"
#include "proxy/event_log.hpp"
#include "wire/builder.hpp"
#include "wire/limits.hpp"
#include "wire/message_types.hpp"
#include "wire/messages.hpp"

namespace pgwarden::proxy {

using policy::StatementKind;
using policy::TxState;

namespace {

// The probes: names no application uses, so the server answers "does not exist"
// (SQLSTATE 34000) and changes nothing else.
constexpr std::string_view kProbeName = "pgwarden.rejected";
constexpr std::string_view kProbeSql = "FETCH ALL FROM \"pgwarden.rejected\"";
constexpr std::string_view kProbeSqlstate = "34000";

std::string error_bytes(const policy::Message& m, const char* severity = "ERROR") {
    std::string out;
    wire::append_error_response(out, wire::Diagnostic{severity, m.sqlstate, m.message, m.detail, m.hint});
    return out;
}

std::string notice_bytes(const policy::Message& m) {
    std::string out;
    wire::append_notice_response(out, wire::Diagnostic{"NOTICE", m.sqlstate, m.message, m.detail, m.hint});
    return out;
}

std::string_view body_of(std::string_view message) { return message.substr(wire::kHeaderSize); }

policy::StatementInfo unknown_statement() {
    policy::StatementInfo s;  // kind other, is_write true: fail closed
    return s;
}

}  // namespace

Interceptor::Interceptor(Runtime& runtime, std::uint64_t session_id, policy::ClientIdentity identity)
    : runtime_(runtime),
      config_(runtime.config()),
      policies_(runtime.policies()),
      session_id_(session_id),
      identity_(std::move(identity)) {}

Interceptor::~Interceptor() = default;

bool Interceptor::observes(char type) {
    switch (type) {
        case wire::be::kCommandComplete:
        case wire::be::kErrorResponse:
        case wire::be::kReadyForQuery:
        case wire::be::kParseComplete:
        case wire::be::kBindComplete:
        case wire::be::kCloseComplete:
        case wire::be::kNoData:
        case wire::be::kRowDescription:
        case wire::be::kPortalSuspended:
        case wire::be::kEmptyQueryResponse:
        case wire::be::kParameterStatus:
            return true;
        default:
            return false;
    }
}

// ---- client side ------------------------------------------------------------------------

Interceptor::ClientStep Interceptor::on_client_message(char type, std::string_view message) {
    switch (type) {
        case wire::fe::kQuery: {
            auto q = wire::parse_query(body_of(message));
            if (!q) return {};  // the server reports the malformed message itself
            // Every statement batch sees the configuration current when it arrives.
            config_ = runtime_.config();
            policies_ = runtime_.policies();
            return on_query(q->sql);
        }
        case wire::fe::kParse:
            return on_parse(message);
        case wire::fe::kBind:
            return on_bind(message);
        case wire::fe::kExecute:
            return on_execute(message);
        case wire::fe::kClose:
            return on_close(message);
        case wire::fe::kDescribe: {
            Pending p;
            p.kind = Pending::Kind::kDescribe;
            push(std::move(p));
            return {};
        }
        case wire::fe::kSync: {
            Pending p;
            p.kind = Pending::Kind::kSync;
            push(std::move(p));
            return {};
        }
        case wire::fe::kFunctionCall:
            return on_function_call();
        default:
            return {};
    }
}

Interceptor::ClientStep Interceptor::on_query(std::string_view sql) {
    Pending entry;
    entry.kind = Pending::Kind::kQuery;
    entry.sent = policy::Clock::now();
    ClientStep step;

    if (sql.size() > config_->proxy.max_statement_bytes) {
        Plan plan;
        plan.mode = Plan::Mode::kProbe;
        plan.probe_error = error_bytes({"54000", "pgwarden: statement too large",
                                        std::to_string(sql.size()) + " bytes exceed max_statement_bytes (" +
                                            std::to_string(config_->proxy.max_statement_bytes) + ")",
                                        ""});
        entry.plans.push_back(std::move(plan));
        log::warn("statement_rejected", {{"session", std::to_string(session_id_)}, {"reason", "statement_too_large"},
                                         {"bytes", std::to_string(sql.size())}});
        if (tx_ == TxState::kInBlock) tx_ = TxState::kFailed;
        step.action = ClientStep::Action::kReplace;
        wire::append_query(step.replacement, kProbeSql);
        push(std::move(entry));
        return step;
    }

    auto classification = runtime_.classifier().classify(sql);
    const auto& statements = classification->statements;
    const TxState tx_at_start = tx_;
    bool has_set = false;
    for (const auto& s : statements) has_set = has_set || s.kind == StatementKind::kSet;
    if (has_set && tx_at_start == TxState::kIdle) identity_at_query_start_ = identity_;

    std::optional<std::size_t> rejected;
    for (std::size_t i = 0; i < statements.size(); ++i) {
        const auto& statement = statements[i];
        std::string_view text = sql.substr(std::min<std::size_t>(statement.location, sql.size()), statement.length);
        Plan plan;
        plan.kind = statement.kind;
        policy::Verdict verdict = decide(statement, text, false);
        for (const auto& n : verdict.notices) plan.before += notice_bytes(n);
        if (verdict.delay_until && (!step.delay_until || *verdict.delay_until > *step.delay_until))
            step.delay_until = verdict.delay_until;
        if (verdict.rejects()) {
            plan.mode = Plan::Mode::kProbe;
            plan.probe_error = error_bytes(verdict.error);
            entry.plans.push_back(std::move(plan));
            rejected = i;
            break;
        }
        entry.plans.push_back(std::move(plan));
    }

    if (rejected) {
        // Everything before the rejected statement runs as sent; the probe stands in for
        // it, and what came after it is never executed (as after any error).
        std::size_t cut = std::min<std::size_t>(statements[*rejected].location, sql.size());
        std::string text(sql.substr(0, cut));
        if (*rejected > 0) text += "\n";
        text += kProbeSql;
        step.action = ClientStep::Action::kReplace;
        wire::append_query(step.replacement, text);
        // The error ends the statement batch: a block is aborted, an implicit
        // transaction is rolled back with every SET it made.
        if (tx_at_start == TxState::kIdle && tx_ == TxState::kInBlock && statements[0].kind != StatementKind::kBegin) {
            tx_ = TxState::kFailed;
        } else if (tx_ == TxState::kInBlock) {
            tx_ = TxState::kFailed;
        } else if (tx_ == TxState::kIdle && identity_at_query_start_) {
            identity_ = *identity_at_query_start_;
        }
    }
    push(std::move(entry));
    return step;
}

Interceptor::ClientStep Interceptor::on_parse(std::string_view message) {
    auto parse = wire::parse_parse(body_of(message));
    Pending entry;
    entry.kind = Pending::Kind::kParse;
    if (!parse) {
        push(std::move(entry));
        return {};
    }
    config_ = runtime_.config();
    policies_ = runtime_.policies();
    entry.name = std::string(parse->statement);
    ClientStep step;
    std::shared_ptr<const policy::Classification> classification;
    if (parse->sql.size() > config_->proxy.max_statement_bytes) {
        // Too large to classify: remember it as a failed Parse, and make the server fail
        // here so that the rest of the batch is skipped until Sync, as PostgreSQL would.
        Plan plan;
        plan.mode = Plan::Mode::kProbe;
        plan.probe_error = error_bytes({"54000", "pgwarden: statement too large",
                                        std::to_string(parse->sql.size()) + " bytes exceed max_statement_bytes (" +
                                            std::to_string(config_->proxy.max_statement_bytes) + ")",
                                        ""});
        entry.kind = Pending::Kind::kExecute;
        entry.plans.push_back(std::move(plan));
        step.action = ClientStep::Action::kReplace;
        wire::append_execute(step.replacement, kProbeName);
        if (tx_ == TxState::kInBlock) tx_ = TxState::kFailed;
        push(std::move(entry));
        return step;
    }
    classification = runtime_.classifier().classify(parse->sql);
    if (entry.name.empty()) {
        statements_[entry.name] = classification;
        entry.created = true;
    } else if (statements_.find(entry.name) == statements_.end()) {
        // A named statement cannot be redefined (the server answers 42P05), so the old
        // classification stays for an existing name.
        statements_.emplace(entry.name, classification);
        entry.created = true;
    }
    push(std::move(entry));
    return step;
}

Interceptor::ClientStep Interceptor::on_bind(std::string_view message) {
    auto bind = wire::parse_bind(body_of(message));
    Pending entry;
    entry.kind = Pending::Kind::kBind;
    if (bind) {
        auto it = statements_.find(std::string(bind->statement));
        std::string portal(bind->portal);
        if (it != statements_.end())
            portals_[portal] = it->second;
        else
            portals_.erase(portal);
    }
    push(std::move(entry));
    return {};
}

Interceptor::ClientStep Interceptor::on_execute(std::string_view message) {
    auto execute = wire::parse_execute(body_of(message));
    Pending entry;
    entry.kind = Pending::Kind::kExecute;
    entry.sent = policy::Clock::now();
    ClientStep step;
    if (!execute) {
        entry.plans.emplace_back();
        push(std::move(entry));
        return step;
    }
    std::shared_ptr<const policy::Classification> classification;
    if (auto it = portals_.find(std::string(execute->portal)); it != portals_.end()) classification = it->second;
    static const policy::StatementInfo unknown = unknown_statement();
    const policy::StatementInfo* statement = &unknown;
    if (classification && !classification->statements.empty()) statement = &classification->statements.front();
    Plan plan;
    plan.kind = statement->kind;
    if (classification && classification->statements.empty()) {
        // An empty query: EmptyQueryResponse, nothing to decide.
        entry.plans.push_back(std::move(plan));
        push(std::move(entry));
        return step;
    }
    policy::Verdict verdict = decide(*statement, {}, true);
    for (const auto& n : verdict.notices) plan.before += notice_bytes(n);
    step.delay_until = verdict.delay_until;
    if (verdict.rejects()) {
        plan.mode = Plan::Mode::kProbe;
        plan.probe_error = error_bytes(verdict.error);
        step.action = ClientStep::Action::kReplace;
        wire::append_execute(step.replacement, kProbeName);
        if (tx_ == TxState::kInBlock) tx_ = TxState::kFailed;
    }
    entry.plans.push_back(std::move(plan));
    push(std::move(entry));
    return step;
}

Interceptor::ClientStep Interceptor::on_close(std::string_view message) {
    auto close = wire::parse_close(body_of(message));
    if (close) {
        std::string name(close->name);
        if (close->target == 'S')
            statements_.erase(name);
        else
            portals_.erase(name);
    }
    Pending entry;
    entry.kind = Pending::Kind::kClose;
    push(std::move(entry));
    return {};
}

Interceptor::ClientStep Interceptor::on_function_call() {
    // A fast-path function call can do anything (large objects write): a write of kind call.
    policy::StatementInfo call;
    call.kind = StatementKind::kCall;
    call.is_write = true;
    Pending entry;
    entry.kind = Pending::Kind::kFunctionCall;
    entry.sent = policy::Clock::now();
    ClientStep step;
    policy::Verdict verdict = decide(call, {}, false);
    step.delay_until = verdict.delay_until;
    Plan plan;
    plan.kind = StatementKind::kCall;
    if (verdict.rejects()) {
        // FunctionCall has no probe of its own: answer it here, as the server would after
        // an error (ErrorResponse, then ReadyForQuery), without sending it.
        entry.kind = Pending::Kind::kSynthetic;
        if (tx_ == TxState::kInBlock) tx_ = TxState::kFailed;
        entry.synthetic = error_bytes(verdict.error);
        wire::append_ready_for_query(entry.synthetic, tx_ == TxState::kFailed ? 'E' : tx_ == TxState::kInBlock ? 'T' : 'I');
        step.action = ClientStep::Action::kDrop;
    }
    entry.plans.push_back(std::move(plan));
    push(std::move(entry));
    return step;
}

policy::Verdict Interceptor::decide(const policy::StatementInfo& input, std::string_view sql, bool extended) {
    const policy::StatementInfo* statement = &input;
    // SQL-level EXECUTE runs a statement prepared earlier: judge what it runs.
    if (!input.execute_name.empty()) {
        auto it = statements_.find(input.execute_name);
        static const policy::StatementInfo unknown = unknown_statement();
        statement = (it != statements_.end() && !it->second->statements.empty()) ? &it->second->statements.front()
                                                                                  : &unknown;
    }
    std::string client = identity_.resolve(config_->identity, statement);
    count_statement(*statement, client);

    policy::Verdict verdict;
    const bool prepare_only = !input.prepare_name.empty();
    // Inside a failed block the server refuses everything but the end of it (25P02), so
    // there is nothing for a policy to add.
    if (!prepare_only && tx_ != TxState::kFailed && !policies_->pipeline.empty()) {
        policy::StatementContext context{*statement, sql, identity_, client, tx_, 0, extended, session_id_};
        verdict = policies_->pipeline.before(context);
        if (!verdict.hits.empty() || verdict.rejects()) log_decision(verdict, *statement, sql, client);
    }
    if (!verdict.rejects()) predict_effects(input);
    return verdict;
}

void Interceptor::predict_effects(const policy::StatementInfo& s) {
    switch (s.kind) {
        case StatementKind::kBegin:
            if (tx_ == TxState::kIdle) {
                tx_ = TxState::kInBlock;
                identity_.begin_transaction();
            }
            break;
        case StatementKind::kCommit:
        case StatementKind::kPrepareTransaction:
            if (tx_ == TxState::kFailed) identity_.rollback_transaction();
            else identity_.commit_transaction();
            tx_ = s.chain ? TxState::kInBlock : TxState::kIdle;
            if (s.chain) identity_.begin_transaction();
            break;
        case StatementKind::kRollback:
            identity_.rollback_transaction();
            tx_ = s.chain ? TxState::kInBlock : TxState::kIdle;
            if (s.chain) identity_.begin_transaction();
            break;
        case StatementKind::kSavepoint:
            identity_.savepoint(s.savepoint);
            break;
        case StatementKind::kRelease:
            identity_.release_savepoint(s.savepoint);
            break;
        case StatementKind::kRollbackTo:
            identity_.rollback_to_savepoint(s.savepoint);
            if (tx_ == TxState::kFailed) tx_ = TxState::kInBlock;
            break;
        case StatementKind::kSet:
            identity_.apply_set(s, tx_ != TxState::kIdle);
            if (s.set_name == "application_name" && s.set_value) identity_.set_application_name(*s.set_value);
            break;
        default:
            break;
    }
    if (!s.prepare_name.empty()) {
        // PREPARE shares the namespace of protocol-level statements.
        if (statements_.find(s.prepare_name) == statements_.end()) {
            auto inner = std::make_shared<policy::Classification>();
            inner->statements.push_back(s);
            inner->statements.back().prepare_name.clear();
            statements_.emplace(s.prepare_name, std::move(inner));
        }
    }
    if (!s.deallocate_name.empty()) statements_.erase(s.deallocate_name);
    if (s.deallocate_all) statements_.clear();
}

void Interceptor::count_statement(const policy::StatementInfo& statement, std::string_view client) {
    auto& m = metrics::proxy_metrics();
    if (client != counted_client_ || statement_counters_.empty()) {
        counted_client_ = std::string(client);
        statement_counters_.assign(policy::kStatementKindCount, nullptr);
    }
    auto& slot = statement_counters_[static_cast<std::size_t>(statement.kind)];
    if (!slot) slot = &m.statements.labels({policy::to_string(statement.kind), m.clients.label(client)});
    static_cast<metrics::Counter*>(slot)->inc();
}

void Interceptor::log_decision(const policy::Verdict& verdict, const policy::StatementInfo& statement,
                               std::string_view sql, std::string_view client) {
    auto& m = metrics::proxy_metrics();
    for (const auto& hit : verdict.hits) {
        m.rule_hits.labels({hit.rule, policy::to_string(hit.action)}).inc();
        log::info("rule_matched", {{"session", std::to_string(session_id_)},
                                   {"client", client},
                                   {"rule", hit.rule},
                                   {"action", policy::to_string(hit.action)},
                                   {"kind", policy::to_string(statement.kind)},
                                   {"statement", log::truncate_statement(sql)}});
    }
    if (verdict.rejects())
        log::warn("statement_rejected", {{"session", std::to_string(session_id_)},
                                         {"client", client},
                                         {"policy", verdict.policy},
                                         {"rule", verdict.rule},
                                         {"kind", policy::to_string(statement.kind)},
                                         {"sqlstate", verdict.error.sqlstate},
                                         {"statement", log::truncate_statement(sql)}});
}

void Interceptor::push(Pending pending) {
    const bool was_empty = queue_.empty();
    queue_.push_back(std::move(pending));
    if (was_empty) activate_front(immediate_);
}

// ---- server side ------------------------------------------------------------------------

void Interceptor::reach(Pending& entry, std::string& sink) {
    while (!entry.failed && entry.next < entry.plans.size()) {
        Plan& plan = entry.plans[entry.next];
        if (!plan.before.empty()) sink += std::exchange(plan.before, {});
        if (plan.mode != Plan::Mode::kSynthetic) return;
        wire::append_command_complete(sink, plan.tag);
        ++entry.next;
    }
}

void Interceptor::activate_front(std::string& sink) {
    while (!queue_.empty()) {
        Pending& front = queue_.front();
        if (front.kind == Pending::Kind::kSynthetic) {
            sink += front.synthetic;
            queue_.pop_front();
            continue;
        }
        if (!front.started) {
            front.started = true;
            reach(front, sink);
        }
        return;
    }
}

void Interceptor::pop_front(std::string& sink) {
    queue_.pop_front();
    activate_front(sink);
}

void Interceptor::complete_plan(Pending& entry, std::string_view tag, std::string_view sqlstate) {
    if (entry.next >= entry.plans.size()) return;
    Plan& plan = entry.plans[entry.next];
    if (sqlstate.empty() && entry.sent != policy::Clock::time_point{}) {
        auto seconds = std::chrono::duration<double>(policy::Clock::now() - entry.sent).count();
        metrics::proxy_metrics().statement_duration.labels({policy::to_string(plan.kind)}).observe(seconds);
    }
    (void)tag;
    ++entry.next;
}

Interceptor::ServerStep Interceptor::on_server_message(char type, std::string_view message) {
    ServerStep step;
    if (type == wire::be::kParameterStatus) {
        auto status = wire::parse_parameter_status(body_of(message));
        if (status && status->name == "application_name") identity_.set_application_name(std::string(status->value));
        return step;
    }
    if (type == wire::be::kErrorResponse) {
        on_error_response(message, step);
        return step;
    }
    if (type == wire::be::kReadyForQuery) {
        on_ready_for_query(message, step);
        return step;
    }
    if (queue_.empty()) return step;
    Pending& front = queue_.front();
    switch (type) {
        case wire::be::kCommandComplete:
        case wire::be::kEmptyQueryResponse:
        case wire::be::kPortalSuspended: {
            std::string_view tag;
            if (type == wire::be::kCommandComplete) {
                if (auto cc = wire::parse_command_complete(body_of(message))) tag = cc->tag;
            }
            if (front.kind == Pending::Kind::kQuery) {
                if (front.next < front.plans.size() && type == wire::be::kCommandComplete &&
                    !front.plans[front.next].tag.empty()) {
                    step.action = ServerStep::Action::kReplace;
                    wire::append_command_complete(step.replacement, front.plans[front.next].tag);
                }
                complete_plan(front, tag, {});
                reach(front, step.emit_after);
            } else if (front.kind == Pending::Kind::kExecute) {
                if (type != wire::be::kPortalSuspended) complete_plan(front, tag, {});
                pop_front(step.emit_after);
            }
            break;
        }
        case wire::be::kParseComplete:
            if (front.kind == Pending::Kind::kParse) pop_front(step.emit_after);
            break;
        case wire::be::kBindComplete:
            if (front.kind == Pending::Kind::kBind) pop_front(step.emit_after);
            break;
        case wire::be::kCloseComplete:
            if (front.kind == Pending::Kind::kClose) pop_front(step.emit_after);
            break;
        case wire::be::kNoData:
        case wire::be::kRowDescription:
            if (front.kind == Pending::Kind::kDescribe) pop_front(step.emit_after);
            break;
        default:
            break;
    }
    return step;
}

void Interceptor::on_error_response(std::string_view message, ServerStep& step) {
    auto fields = wire::parse_error_fields(body_of(message));
    std::string_view sqlstate = fields ? fields->sqlstate() : std::string_view{};
    if (queue_.empty()) return;
    errors_in_flight_ = true;
    Pending& front = queue_.front();
    auto replace_probe = [&](Pending& entry) {
        if (entry.next < entry.plans.size() && entry.plans[entry.next].mode == Plan::Mode::kProbe &&
            sqlstate == kProbeSqlstate) {
            step.action = ServerStep::Action::kReplace;
            step.replacement = entry.plans[entry.next].probe_error;
        }
    };
    switch (front.kind) {
        case Pending::Kind::kQuery:
            replace_probe(front);
            front.failed = true;
            if (tx_ == TxState::kIdle && identity_at_query_start_) {
                identity_ = *identity_at_query_start_;
                identity_at_query_start_.reset();
            }
            return;
        case Pending::Kind::kFunctionCall:
        case Pending::Kind::kSync:
            front.failed = true;
            return;
        case Pending::Kind::kExecute:
            replace_probe(front);
            [[fallthrough]];
        default:
            // The server now skips everything up to Sync, and so do the answers we expect.
            queue_.pop_front();
            while (!queue_.empty() && queue_.front().kind != Pending::Kind::kSync) {
                if (queue_.front().kind == Pending::Kind::kParse && queue_.front().created)
                    statements_.erase(queue_.front().name);
                queue_.pop_front();
            }
            if (front.kind == Pending::Kind::kParse && front.created) statements_.erase(front.name);
            return;
    }
}

void Interceptor::on_ready_for_query(std::string_view message, ServerStep& step) {
    auto ready = wire::parse_ready_for_query(body_of(message));
    // Answers end at the first Sync, Query or FunctionCall entry.
    while (!queue_.empty()) {
        auto kind = queue_.front().kind;
        queue_.pop_front();
        if (kind == Pending::Kind::kSync || kind == Pending::Kind::kQuery || kind == Pending::Kind::kFunctionCall)
            break;
    }
    if (ready) {
        TxState actual = ready->status == 'T' ? TxState::kInBlock
                         : ready->status == 'E' ? TxState::kFailed
                                                : TxState::kIdle;
        if (queue_.empty()) {
#ifndef NDEBUG
            if (!errors_in_flight_ && actual != tx_)
                log::error("tx_state_mismatch", {{"session", std::to_string(session_id_)},
                                                 {"predicted", policy::to_string(tx_)},
                                                 {"server", policy::to_string(actual)}});
#endif
            if (actual == TxState::kIdle && tx_ != TxState::kIdle) identity_.rollback_transaction();
            tx_ = actual;
            errors_in_flight_ = false;
            if (actual == TxState::kIdle) {
                portals_.clear();
                identity_at_query_start_.reset();
            }
        }
    }
    activate_front(step.emit_after);
}

}  // namespace pgwarden::proxy
