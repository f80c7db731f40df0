// Statement interception: from client messages to decisions to protocol actions, and
// from server responses back to the statements they answer.
#include "proxy/interceptor.hpp"

#include <array>
#include <atomic>
#include <cstring>
#include <random>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <openssl/rand.h>

#include "metrics/proxy_metrics.hpp"
#include "proxy/event_log.hpp"
#include "wire/builder.hpp"
#include "wire/limits.hpp"
#include "wire/message_types.hpp"
#include "wire/messages.hpp"

namespace pgwarden::proxy {

using policy::ServerStep;
using policy::StatementKind;
using policy::TxState;

namespace {

// pgwarden_statement_duration_seconds{kind}, looked up once per kind for the process (the
// family keeps its series for good), created at first use so that kinds never seen stay
// out of /metrics.
metrics::Histogram& statement_duration(StatementKind kind) {
    static std::array<std::atomic<metrics::Histogram*>, policy::kStatementKindCount> series{};
    auto& slot = series[static_cast<std::size_t>(kind)];
    metrics::Histogram* found = slot.load(std::memory_order_acquire);
    if (found == nullptr) {
        found = &metrics::proxy_metrics().statement_duration.labels({policy::to_string(kind)});
        slot.store(found, std::memory_order_release);
    }
    return *found;
}


// The probes: names no application uses, so the server answers "does not exist"
// (SQLSTATE 34000) and changes nothing else.
constexpr std::string_view kProbePortal = "pgwarden.rejected.";
constexpr std::string_view kProbeSqlstate = "34000";
// pgwarden's own statements in the extended protocol run under this statement and
// portal name, closed right after.
constexpr std::string_view kInjectName = "pgwarden.injected.";

// A name no client can have taken: the prefix and 64 random bits, new for every use. A
// client that made a portal or cursor of a fixed probe name would make the probe succeed
// (and run its own statement); a fixed name also shows in pg_stat_activity.
std::string fresh_name(std::string_view prefix) {
    unsigned char bytes[8];
    if (RAND_bytes(bytes, sizeof bytes) != 1) {
        thread_local std::random_device device;
        for (auto& b : bytes) b = static_cast<unsigned char>(device());
    }
    static constexpr char kHex[] = "0123456789abcdef";
    std::string name(prefix);
    for (unsigned char b : bytes) {
        name += kHex[b >> 4];
        name += kHex[b & 15];
    }
    return name;
}

// In a Query: fails (34000) without side effects, as no cursor of that name exists.
std::string probe_sql() { return "FETCH ALL FROM \"" + fresh_name(kProbePortal) + "\""; }
constexpr std::string_view kReadOnlySql = "SET TRANSACTION READ ONLY";

std::string error_bytes(const policy::Message& m) {
    std::string out;
    wire::append_error_response(out, wire::Diagnostic{"ERROR", m.sqlstate, m.message, m.detail, m.hint});
    return out;
}

std::string notice_bytes(const policy::Message& m) {
    std::string out;
    wire::append_notice_response(out, wire::Diagnostic{"NOTICE", m.sqlstate, m.message, m.detail, m.hint});
    return out;
}

std::string_view body_of(std::string_view message) { return message.substr(wire::kHeaderSize); }

const policy::StatementInfo& unknown_statement() {
    // Kind other, a write, and matching every kind and table condition: fail closed.
    static const policy::StatementInfo unknown = [] {
        policy::StatementInfo s;
        s.unknown = true;
        return s;
    }();
    return unknown;
}

// A classification of one unknown statement, for text pgwarden cannot read as the server will.
const std::shared_ptr<const policy::Classification>& unknown_classification() {
    static const auto unknown = [] {
        auto c = std::make_shared<policy::Classification>();
        c->statements.push_back(unknown_statement());
        return std::shared_ptr<const policy::Classification>(std::move(c));
    }();
    return unknown;
}

// Whether `text` has a byte above 0x7F, or (with `backslash`) a backslash: sixteen bytes
// at a time, since every pipelined statement is looked at.
bool has_byte_above_7f_or(std::string_view text, bool backslash) {
    const char* p = text.data();
    std::size_t i = 0;
#if defined(__SSE2__)
    const __m128i backslashes = _mm_set1_epi8('\\');
    for (; i + 16 <= text.size(); i += 16) {
        const __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
        int found = _mm_movemask_epi8(chunk);  // the high bits
        if (backslash) found |= _mm_movemask_epi8(_mm_cmpeq_epi8(chunk, backslashes));
        if (found != 0) return true;
    }
#endif
    for (; i < text.size(); ++i) {
        const auto c = static_cast<unsigned char>(p[i]);
        if (c >= 0x80 || (backslash && c == '\\')) return true;
    }
    return false;
}

bool has_high_bytes(std::string_view text) { return has_byte_above_7f_or(text, false); }

// Client encodings whose multibyte characters may contain the bytes of ASCII quotes and
// backslashes (PostgreSQL accepts them from clients only): libpg_query reads text as UTF-8.
bool client_only_encoding(std::string_view name) {
    for (std::string_view e : {"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "JOHAB", "GB18030"})
        if (name == e) return true;
    return false;
}

std::string too_large_detail(std::size_t size, std::uint64_t limit) {
    return std::to_string(size) + " bytes exceed max_statement_bytes (" + std::to_string(limit) + ")";
}

// PostgreSQL keys prepared statements and portals by their first NAMEDATALEN - 1 bytes,
// cut byte-wise: past 63 bytes, names that differ only after that are one to the server.
// (SQL-level names are identifiers, which the parser already cut.)
std::string_view server_name(std::string_view name) {
    constexpr std::size_t kNameBytes = 63;
    return name.substr(0, std::min(name.size(), kNameBytes));
}

}  // namespace

Interceptor::Interceptor(Runtime& runtime, std::uint64_t session_id, policy::ClientIdentity identity)
    : runtime_(runtime),
      config_(runtime.config()),
      policies_(runtime.policies()),
      session_id_(session_id),
      session_text_(std::to_string(session_id)),
      identity_(std::move(identity)) {}

Interceptor::~Interceptor() {
    // A session that ends while a statement waits gives its slot back at once.
    for (auto& r : reservations_) r->release();
}

void Interceptor::note_throttle(const policy::Verdict& verdict, std::string_view sql, StatementKind kind) {
    auto& m = metrics::proxy_metrics();
    for (const auto& e : verdict.throttle_events) {
        auto client = m.clients.label(e.client);
        if (e.rejected) {
            m.throttle_rejected.labels({e.rule, client}).inc();
            log::warn("throttle_rejected", {{"session", session_text_}, {"client", e.client},
                                            {"rule", e.rule}, {"kind", policy::to_string(kind)},
                                            {"statement", log::truncate_statement(sql)}});
        } else {
            double seconds = std::chrono::duration<double>(e.delay).count();
            m.throttle_delayed.labels({e.rule, client}).inc();
            m.throttle_delay.labels({e.rule}).observe(seconds);
            log::debug("throttle_delayed", {{"session", session_text_}, {"client", e.client},
                                            {"rule", e.rule}, {"seconds", std::to_string(seconds)}});
        }
    }
    for (const auto& r : verdict.reservations) reservations_.push_back(r);
    if (verdict.delay_until) delaying_rule_ = verdict.rule;
}

void Interceptor::attach_throttle(Plan& plan, const std::shared_ptr<const policy::Classification>& holder,
                                  const policy::StatementInfo* statement, const std::string& client) {
    plan.throttled_by = policies_;
    plan.holder = holder;
    plan.statement = statement;
    plan.client = client;
}

bool Interceptor::observes(char type) {
    switch (type) {
        case wire::be::kCopyInResponse:
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

char Interceptor::client_status() const {
    if (tracker_.rolled_back_for_idle()) return 'E';
    switch (tracker_.state()) {
        case TxState::kInBlock: return 'T';
        case TxState::kFailed: return 'E';
        case TxState::kIdle: return 'I';
    }
    return 'I';
}

bool Interceptor::idle_in_transaction() const {
    // Not while the server skips to Sync: a rollback sent then would be skipped too (and
    // the failed transaction holds no locks any more).
    return queue_.empty() && !server_skipping_ && !tracker_.rolled_back_for_idle() &&
           tracker_.state() != TxState::kIdle;
}

std::string Interceptor::roll_back_for_idle(const std::string& after) {
    Pending entry;
    entry.kind = Pending::Kind::kQuery;
    entry.swallow = true;
    push(std::move(entry));
    tracker_.rolled_back_for_idle(after);
    identity_.rollback_transaction();
    std::string out;
    wire::append_query(out, "ROLLBACK");
    return out;
}

std::string Interceptor::doom(const std::string& reason) {
    if (!tracker_.doom(reason)) return "the client is not in a transaction";
    metrics::proxy_metrics().doomed_transactions.labels({"admin"}).inc();
    log::warn("transaction_doomed", {{"session", session_text_}, {"reason", "admin"},
                                     {"detail", reason}, {"transaction", log::truncate_statement(tracker_.outer_begin_statement())}});
    return {};
}

// ---- client side ------------------------------------------------------------------------

void Interceptor::on_parameter(std::string_view name, std::string_view value) {
    if (name == "application_name") {
        identity_.set_application_name(std::string(value));
    } else if (name == "standard_conforming_strings") {
        backslashes_differ_ = value != "on";
    } else if (name == "client_encoding" || name == "server_encoding") {
        (name == "client_encoding" ? client_encoding_ : server_encoding_) = std::string(value);
        high_bytes_differ_ = client_only_encoding(client_encoding_);
        names_converted_ = client_encoding_ != server_encoding_ && client_encoding_ != "SQL_ASCII";
    }
}

std::shared_ptr<const policy::Classification> Interceptor::classify(std::string_view sql) const {
    // With standard_conforming_strings off a backslash escapes a quote, and in a client-only
    // encoding a high byte may swallow the byte after it (a backslash, or a backquote that
    // libpg_query fails on where the server reads a letter); libpg_query knows neither.
    // Such text is judged unknown (fail closed) rather than read another way than the
    // server. So is text with either while something sent since the latest ReadyForQuery
    // may have changed those settings (must_wait_for_server held it back until then when a
    // ReadyForQuery was on its way).
    if (last_exec_seq_ > last_ready_seq_) {
        if (has_byte_above_7f_or(sql, true)) return unknown_classification();
    } else if ((backslashes_differ_ && sql.find('\\') != std::string_view::npos) ||
               (high_bytes_differ_ && has_high_bytes(sql))) {
        return unknown_classification();
    }
    auto classification = runtime_.classifier().classify(sql);
    // SQL names (PREPARE, EXECUTE, DEALLOCATE, FETCH) are cut at 63 bytes too, after the
    // server has converted them: see name_converted().
    if (names_converted_)
        for (const auto& st : classification->statements)
            for (const std::string* name : {&st.prepare_name, &st.execute_name, &st.deallocate_name, &st.fetch_portal})
                if (name->size() >= 16 && has_high_bytes(*name)) return unknown_classification();
    return classification;
}

bool Interceptor::long_name_converted(std::string_view name, std::uint64_t before) const {
    // The server converts a name to its encoding before cutting it at 63 bytes: a long
    // non-ASCII name may be cut elsewhere than in the client's bytes. Something sent since
    // the latest ReadyForQuery may have changed the client encoding.
    if (!has_high_bytes(name)) return false;
    return names_converted_ || reading_before(before) != Reading::kSettled;
}

Interceptor::Reading Interceptor::reading_before(std::uint64_t before) const {
    if (last_exec_seq_ <= last_ready_seq_) return Reading::kSettled;
    // A ReadyForQuery that will come by itself, for the latest message that may have changed
    // them or one after it (a Sync the server ignores during COPY FROM STDIN will not do;
    // its CopyInResponse wakes a wait to look again).
    for (std::size_t i = queue_.size(); i-- > 0;) {
        const Pending& entry = queue_[i];
        if (entry.seq < last_exec_seq_) break;
        if (entry.seq >= before) continue;
        if (entry.kind == Pending::Kind::kQuery || entry.kind == Pending::Kind::kFunctionCall ||
            (entry.kind == Pending::Kind::kSync && !entry.ignored))
            return Reading::kAwaitable;
    }
    return Reading::kUnsettled;
}

bool Interceptor::definition_unsettled(const std::string_view* name) const {
    auto named = [name](const std::string& n) { return !n.empty() && (name == nullptr || n == *name); };
    bool parsed = false;  // a Parse defined the name, and its batch has not ended yet
    for (std::size_t i = 0; i < queue_.size(); ++i) {
        const Pending& entry = queue_[i];
        switch (entry.kind) {
            case Pending::Kind::kParse:
                if (entry.created && !entry.swallow && named(entry.name)) parsed = true;
                break;
            case Pending::Kind::kClose:
                // Skipped (its batch failed), it leaves the old statement in place, and a
                // new Parse of the name fails; run, it makes room for the new one.
                if (entry.closed_target == 'S' && named(entry.name)) parsed = true;
                break;
            case Pending::Kind::kQuery:
                // A Query answers for itself (its ReadyForQuery, or the error that made the
                // server skip it, reaches pgwarden without waiting for anything else).
                for (const auto& plan : entry.plans)
                    if (named(plan.prepared) || named(plan.deallocated) || plan.cleared) return true;
                break;
            case Pending::Kind::kExecute:
                // PREPARE or DEALLOCATE run through the extended protocol: answered by Sync.
                for (const auto& plan : entry.plans)
                    if (named(plan.prepared) || named(plan.deallocated) || plan.cleared) parsed = true;
                break;
            case Pending::Kind::kSync:
                // Without a Sync in between, a later definition of the name never runs
                // when this one fails (the server skips to Sync) and fails when it succeeds
                // (42P05): the outcome is known, and waiting could hang, since the server
                // holds a ParseComplete until Sync or Flush.
                if (parsed) return true;
                break;
            default:
                break;
        }
    }
    return false;
}

const std::shared_ptr<const policy::Classification>* Interceptor::statement_named(std::string_view name) const {
    auto it = statements_.find(name);
    if (it == statements_.end() || (!closing_statements_.empty() && closing_statements_.contains(name))) return nullptr;
    return &it->second;
}

const Interceptor::Portal* Interceptor::portal_named(std::string_view name) const {
    auto it = portals_.find(name);
    if (it == portals_.end() || (!closing_portals_.empty() && closing_portals_.contains(name))) return nullptr;
    return &it->second;
}

bool Interceptor::redefinition_unanswered(std::string_view name) const {
    if (redefining_.empty()) return false;
    auto it = redefining_.find(name);
    return it != redefining_.end() && it->second < last_sync_ && unanswered(it->second);
}

bool Interceptor::use_unsettled(const policy::StatementInfo& s) const {
    if (!s.execute_name.empty() && redefinition_unanswered(s.execute_name)) return true;
    if (!s.fetch_portal.empty()) {
        auto it = portals_.find(s.fetch_portal);
        if (it != portals_.end() && bind_unanswered(it->second.bound)) return true;
    }
    return false;
}

bool Interceptor::reading_awaited(std::string_view sql) const {
    // Text read once the server has said whether something sent before it changed
    // standard_conforming_strings or the client encoding (classify()).
    return last_exec_seq_ > last_ready_seq_ && has_byte_above_7f_or(sql, true) &&
           reading_before(next_seq_ + 1) == Reading::kAwaitable;
}

bool Interceptor::must_wait_given_queue(char type, std::string_view message) const {
    if (type == wire::fe::kParse) {
        // The unnamed statement is always the last Parse's (the body starts with the name).
        const bool unnamed = message.size() <= wire::kHeaderSize || message[wire::kHeaderSize] == '\0';
        if (unnamed && reading_before(next_seq_ + 1) != Reading::kAwaitable) return false;  // settled or not awaitable
        auto parse = wire::parse_parse(body_of(message));
        if (!parse) return false;
        if (reading_awaited(parse->sql)) return true;
        if (parse->statement.empty()) return false;
        std::string_view name = server_name(parse->statement);
        return definition_unsettled(&name);
    }
    if (type == wire::fe::kBind) {
        // A Parse that redefined the statement (the unnamed one, or one a Close freed) may
        // yet be skipped (something before it in its batch may fail), which leaves the
        // definition before: wait when its batch has ended.
        if (redefining_.empty()) return false;
        auto bind = wire::parse_bind(body_of(message));
        return bind && redefinition_unanswered(server_name(bind->statement));
    }
    if (type == wire::fe::kExecute) {
        // A portal bound in a batch that ended unanswered: if that Bind fails, a portal of
        // the name from before (inside a transaction block) may still be there.
        auto execute = wire::parse_execute(body_of(message));
        if (!execute) return false;
        auto it = portals_.find(server_name(execute->portal));
        if (it == portals_.end()) return false;
        if (bind_unanswered(it->second.bound)) return true;
        // Its statement may run another: EXECUTE name, FETCH portal.
        if (it->second.classification)
            for (const auto& s : it->second.classification->statements)
                if (use_unsettled(s)) return true;
        return false;
    }
    if (type == wire::fe::kQuery) {
        auto q = wire::parse_query(body_of(message));
        if (!q || q->sql.size() > runtime_.config()->proxy.max_statement_bytes) return false;
        if (reading_awaited(q->sql)) return true;
        const bool definitions = definition_unsettled(nullptr);
        const bool ended = queue_.front().seq < last_sync_;
        if (!definitions && !ended) return false;
        for (const auto& s : classify(q->sql)->statements) {
            // Any PREPARE or DEALLOCATE waits (rare enough not to match names).
            if (definitions && (!s.prepare_name.empty() || !s.deallocate_name.empty() || s.deallocate_all))
                return true;
            if (ended && use_unsettled(s)) return true;
        }
    }
    return false;
}

Interceptor::ClientStep Interceptor::on_client_message(char type, std::string_view message) {
    if (skip_until_sync_) {
        // pgwarden reported an error in this batch without the server: like the server,
        // ignore everything up to Sync.
        if (type != wire::fe::kSync) return {ClientStep::Action::kDrop, {}, {}};
        skip_until_sync_ = false;
    }
    if (server_skipping_) {
        // The server reported an error in this batch before this message came: it skips
        // everything up to Sync without an answer, so nothing of it is noted or decided.
        if (type != wire::fe::kSync) return {};
        server_skipping_ = false;
    }
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
        case wire::fe::kDescribe:
            emplace(Pending::Kind::kDescribe);
            pushed();
            return {};
        case wire::fe::kSync:
            // Sent after copy data: the server ignores it if the copy is still running and
            // answers it if that data already failed the copy. pgwarden cannot know which,
            // so the server never sees it (no client of libpq's kind sends one there).
            if (copy_data_sent_) return {ClientStep::Action::kDrop, {}, {}};
            if (copy_in_) return {};  // the server ignores it
            probe_until_sync_ = false;
            last_sync_ = emplace(Pending::Kind::kSync).seq;
            pushed();
            return {};
        case wire::fe::kCopyData:
            on_copy_data();
            return {};
        case wire::fe::kCopyDone:
        case wire::fe::kCopyFail:
            copy_data_sent_ = false;
            if (copy_in_) {
                copy_in_ = false;  // ends the copy the server is in
            } else if (!queue_.empty()) {
                // A copy may yet start on the server before this arrives there. (With
                // nothing unanswered, none can: the server will ignore it. Ends recorded
                // before the oldest unanswered message no copy can take any more.)
                drop_copy_ends_before(queue_.front().seq);
                if (!copy_ends_.empty() && copy_ends_.back().after == next_seq_)
                    ++copy_ends_.back().count;
                else
                    copy_ends_.push_back({next_seq_, 1});
            }
            return {};
        case wire::fe::kFunctionCall:
            return on_function_call();
        default:
            return {};
    }
}

Interceptor::ClientStep Interceptor::on_query(std::string_view sql) {
    received_ = policy::Clock::now();
    // Built in place at the end of the queue; pushed() once it is complete.
    Pending& entry = emplace(Pending::Kind::kQuery);
    entry.sent = received_;
    ClientStep step;
    std::string text;            // what the server gets, when it differs from `sql`
    bool rewritten = false;
    bool stopped = false;        // a failure ends the batch: nothing after it runs

    if (sql.size() > config_->proxy.max_statement_bytes) {
        Plan plan;
        plan.mode = tracker_.rolled_back_for_idle() ? Plan::Mode::kError : Plan::Mode::kProbe;
        plan.error = error_bytes({"54000", "pgwarden: statement too large",
                                  too_large_detail(sql.size(), config_->proxy.max_statement_bytes), ""});
        log::warn("statement_rejected", {{"session", session_text_}, {"reason", "statement_too_large"},
                                         {"bytes", std::to_string(sql.size())}});
        tracker_.on_error();
        entry.plans.push_back(std::move(plan));
        if (entry.plans.back().mode == Plan::Mode::kProbe) {
            step.action = ClientStep::Action::kReplace;
            wire::append_query(step.replacement, probe_sql());
        } else {
            entry.kind = Pending::Kind::kSynthetic;
            entry.synthetic = entry.plans.back().error;
            wire::append_ready_for_query(entry.synthetic, client_status());
            step.action = ClientStep::Action::kDrop;
        }
        pushed();
        return step;
    }

    auto classification = classify(sql);
    const auto& statements = classification->statements;
    const TxState tx_at_start = tracker_.state();
    // A throttle that rejects the Query takes back what its statements did to the tracker.
    std::optional<policy::TransactionTracker> tracker_at_start;
    if (policies_->throttle) tracker_at_start = tracker_;
    struct Candidate {
        const policy::StatementInfo* statement;
        std::string client;
        std::string_view sql;
        std::size_t plan;  // index into entry.plans
    };
    // Per-thread lists, reused: the common path allocates nothing. Nothing in this function
    // waits, so no other session on the thread can use them meanwhile.
    thread_local std::vector<Candidate> candidates;
    candidates.clear();
    bool has_set = false;
    for (const auto& s : statements) has_set = has_set || s.kind == StatementKind::kSet;
    if (has_set && tx_at_start == TxState::kIdle) identity_at_query_start_ = identity_;
    bool server_work = false;

    for (std::size_t i = 0; i < statements.size() && !stopped; ++i) {
        const auto& statement = statements[i];
        std::size_t begin = std::min<std::size_t>(statement.location, sql.size());
        std::size_t length = statement.length == 0 ? sql.size() - begin : statement.length;
        std::string_view original = sql.substr(begin, length);
        Decision decision = decide(statement, original, false);
        if (decision.delay_until && (!step.delay_until || *decision.delay_until > *step.delay_until))
            step.delay_until = decision.delay_until;
        if (decision.throttle_candidate && (policies_->throttle || !policies_->pipeline.empty()))
            candidates.push_back({decision.effective, decision.client, original, entry.plans.size()});

        if (decision.steps.empty() && !rewritten) {
            // Built where it stays: a Plan is six strings and three pointers to move.
            Plan& plan = entry.plans.emplace_back();
            plan.kind = statement.kind;
            if (!decision.notices.empty()) plan.before = std::move(decision.notices);
            keep_prepared(plan, decision);
            server_work = true;
            continue;
        }
        if (!rewritten) {
            // Statements before this one go as the client wrote them (error positions
            // in them stay right); from here on the text is rebuilt.
            text.assign(sql.substr(0, begin));
            rewritten = true;
        }
        if (decision.steps.empty()) decision.steps.push_back(ServerStep{});
        bool first = true;
        for (auto& s : decision.steps) {
            Plan plan;
            plan.kind = statement.kind;
            if (first) {
                plan.before = std::move(decision.notices);
                keep_prepared(plan, decision);
            }
            first = false;
            auto add_sql = [&](std::string_view piece) {
                // The newline first: the piece before may end in a line comment,
                // which would swallow a separator written on the same line.
                if (!text.empty()) text += "\n;\n";
                text.append(piece);
                server_work = true;
            };
            switch (s.type) {
                case ServerStep::Type::kOriginal:
                    add_sql(original);
                    plan.tag = s.tag;
                    break;
                case ServerStep::Type::kSql:
                    add_sql(s.sql);
                    plan.tag = s.tag;
                    plan.hidden = s.hidden;
                    break;
                case ServerStep::Type::kSynthetic:
                    plan.mode = Plan::Mode::kSynthetic;
                    plan.tag = s.tag;
                    break;
                case ServerStep::Type::kProbe:
                    add_sql(probe_sql());
                    plan.mode = Plan::Mode::kProbe;
                    plan.error = error_bytes(s.error);
                    stopped = true;
                    break;
                case ServerStep::Type::kError:
                    plan.mode = Plan::Mode::kError;
                    plan.error = error_bytes(s.error);
                    stopped = true;
                    break;
            }
            entry.plans.push_back(std::move(plan));
            if (stopped) break;
        }
    }

    if (!candidates.empty() && policies_->throttle) {
        // Throttles admit or reject the Query whole.
        thread_local std::vector<policy::StatementContext> contexts;
        thread_local std::vector<const policy::StatementContext*> pointers;
        contexts.clear();
        pointers.clear();
        contexts.reserve(candidates.size());
        for (const auto& c : candidates)
            contexts.push_back({*c.statement, c.sql, identity_, c.client, tx_at_start, tracker_.depth(), false,
                                session_id_, &throttle_matches_, received_});
        for (const auto& c : contexts) pointers.push_back(&c);
        policy::Verdict verdict = policies_->throttle->before_batch(pointers);
        // A batch logs as the kind of its first throttled statement.
        note_throttle(verdict, sql, candidates.front().statement->kind);
        if (verdict.rejects()) {
            // Nothing of it runs: the probe stands in for the whole Query.
            tracker_ = *tracker_at_start;
            tracker_.on_error();
            if (identity_at_query_start_) identity_ = *identity_at_query_start_;
            undo_prepared(entry, 0);  // its PREPAREs and DEALLOCATEs never reach the server
            entry = Pending{};
            entry.kind = Pending::Kind::kQuery;
            Plan& plan = entry.plans.emplace_back();
            plan.mode = Plan::Mode::kProbe;
            plan.error = error_bytes({verdict.error.sqlstate, verdict.error.message, verdict.error.detail,
                                      verdict.error.hint});
            ClientStep reject;
            reject.action = ClientStep::Action::kReplace;
            wire::append_query(reject.replacement, probe_sql());
            pushed();
            return reject;
        }
        if (verdict.delay_until && (!step.delay_until || *verdict.delay_until > *step.delay_until))
            step.delay_until = verdict.delay_until;
        for (const auto& c : candidates)
            if (c.plan < entry.plans.size() && entry.plans[c.plan].mode == Plan::Mode::kServer)
                attach_throttle(entry.plans[c.plan], classification, c.statement, c.client);
    }
    if (!candidates.empty() && !policies_->throttle) {
        // The pipeline's after-execute hook sees each statement's outcome.
        for (const auto& c : candidates)
            if (c.plan < entry.plans.size() && entry.plans[c.plan].mode == Plan::Mode::kServer)
                attach_throttle(entry.plans[c.plan], classification, c.statement, c.client);
    }
    if (stopped && tracker_.state() == TxState::kIdle && tx_at_start == TxState::kIdle && identity_at_query_start_) {
        // The error rolls back the implicit transaction, and every SET it made.
        identity_ = *identity_at_query_start_;
    }
    if (!rewritten) {
        if (statements.empty()) entry.plans.clear();
        pushed();
        return step;
    }
    if (!server_work) {
        // pgwarden answers the whole Query itself.
        entry.kind = Pending::Kind::kSynthetic;
        entry.started = true;
        for (auto& plan : entry.plans) {
            entry.synthetic += plan.before;
            if (plan.mode == Plan::Mode::kSynthetic) wire::append_command_complete(entry.synthetic, plan.tag);
            if (plan.mode == Plan::Mode::kError) entry.synthetic += plan.error;
        }
        wire::append_ready_for_query(entry.synthetic, client_status());
        entry.plans.clear();
        step.action = ClientStep::Action::kDrop;
        pushed();
        return step;
    }
    step.action = ClientStep::Action::kReplace;
    wire::append_query(step.replacement, text);
    pushed();
    return step;
}

Interceptor::ClientStep Interceptor::on_parse(std::string_view message) {
    auto parse = wire::parse_parse(body_of(message));
    // Built in place at the end of the queue; pushed() once it is complete.
    Pending& entry = emplace(Pending::Kind::kParse);
    if (!parse) {
        pushed();
        return {};
    }
    config_ = runtime_.config();
    policies_ = runtime_.policies();
    entry.name = std::string(server_name(parse->statement));
    ClientStep step;
    if (parse->sql.size() > config_->proxy.max_statement_bytes) {
        // Too large to classify: make the server fail here, so that the rest of the batch
        // is skipped until Sync, as PostgreSQL would after a failed Parse.
        Plan plan;
        plan.mode = Plan::Mode::kProbe;
        plan.error = error_bytes({"54000", "pgwarden: statement too large",
                                  too_large_detail(parse->sql.size(), config_->proxy.max_statement_bytes), ""});
        log::warn("statement_rejected", {{"session", session_text_}, {"reason", "statement_too_large"},
                                         {"bytes", std::to_string(parse->sql.size())}});
        entry.kind = Pending::Kind::kExecute;
        entry.plans.push_back(std::move(plan));
        step.action = ClientStep::Action::kReplace;
        wire::append_execute(step.replacement, fresh_name(kProbePortal));
        tracker_.on_error();
        pushed();
        return step;
    }
    auto classification =
        name_converted(entry.name, entry.seq) ? unknown_classification() : classify(parse->sql);
    if (entry.name.empty()) {
        // The unnamed statement is this Parse's whatever became of a Close of it.
        if (!closing_statements_.empty()) closing_statements_.erase(entry.name);
        auto& slot = statements_[entry.name];
        entry.previous = std::exchange(slot, classification);
        entry.created = true;
        // Skippable when something of its batch came before it.
        if (entry.seq > last_sync_ + 1)
            redefining_[entry.name] = entry.seq;
        else if (!redefining_.empty())
            redefining_.erase(entry.name);
    } else if (closing_statements_.count(entry.name) > 0) {
        // A Close of this name is in flight in this batch (must_wait_for_server held the
        // Parse back if it was in an earlier one): if it runs, this Parse defines the name
        // anew (and the Close must not remove it); if it is skipped, so is this Parse.
        closing_statements_.erase(entry.name);
        entry.previous = std::exchange(statements_[entry.name], classification);
        entry.created = true;
        redefining_[entry.name] = entry.seq;  // the Close before it makes it skippable
    } else if (statements_.find(entry.name) == statements_.end()) {
        // A named statement cannot be redefined (the server answers 42P05), so the old
        // classification stays for an existing name.
        statements_.emplace(entry.name, classification);
        entry.created = true;
    }
    pushed();
    return step;
}

Interceptor::ClientStep Interceptor::on_bind(std::string_view message) {
    auto bind = wire::parse_bind(body_of(message));
    Pending& entry = emplace(Pending::Kind::kBind);
    if (bind) {
        bind->statement = server_name(bind->statement);
        bind->portal = server_name(bind->portal);
        if (!bind->portal.empty()) entry.name.assign(bind->portal);  // the slot's name is empty
        std::shared_ptr<const policy::Classification> classification;
        if (const auto* statement = statement_named(bind->statement))
            classification = *statement;  // else unknown: fail closed at Execute
        if (name_converted(bind->portal, entry.seq) || name_converted(bind->statement, entry.seq)) classification = nullptr;
        if (auto it = portals_.find(bind->portal); it != portals_.end())
            it->second = {std::move(classification), entry.seq};
        else
            portals_.emplace(std::string(bind->portal), Portal{std::move(classification), entry.seq});
        if (!closing_portals_.empty())
            if (auto it = closing_portals_.find(bind->portal); it != closing_portals_.end()) closing_portals_.erase(it);
    }
    pushed();
    return {};
}

void Interceptor::inject_extended(std::string& out, const std::string& sql, Plan plan) {
    const std::string name = fresh_name(kInjectName);
    wire::append_parse(out, name, sql);
    wire::append_bind(out, name, name);
    wire::append_execute(out, name);
    // A named portal outlives its statement's Close: close both.
    wire::append_close(out, 'P', name);
    wire::append_close(out, 'S', name);
    Pending parse, bind, execute, close_portal, close;
    parse.kind = Pending::Kind::kParse;
    parse.swallow = true;
    bind.kind = Pending::Kind::kBind;
    bind.swallow = true;
    execute.kind = Pending::Kind::kExecute;
    // pgwarden's own statement: its notices (e.g. PostgreSQL's "skipping cleanup for
    // portal" when it rolls back under a client portal) are not the client's business.
    execute.swallow = true;  // its CommandComplete still reaches the client when the plan has a tag
    execute.plans.push_back(std::move(plan));
    close.kind = Pending::Kind::kClose;
    close.swallow = true;
    close_portal.kind = Pending::Kind::kClose;
    close_portal.swallow = true;
    push(std::move(parse));
    push(std::move(bind));
    push(std::move(execute));
    push(std::move(close_portal));
    push(std::move(close));
}

Interceptor::ClientStep Interceptor::on_execute(std::string_view message) {
    received_ = policy::Clock::now();
    auto execute = wire::parse_execute(body_of(message));
    ClientStep step;
    if (probe_until_sync_) {
        // A probe earlier in this batch fails on the server, which then skips everything
        // up to Sync: this Execute will not run, so there is nothing to decide or charge.
        Pending entry;
        entry.kind = Pending::Kind::kExecute;
        entry.plans.emplace_back();
        push(std::move(entry));
        return step;
    }
    std::shared_ptr<const policy::Classification> classification;
    if (execute && !name_converted(execute->portal, next_seq_ + 1)) {
        execute->portal = server_name(execute->portal);
        if (const Portal* portal = portal_named(execute->portal)) classification = portal->classification;
    }
    if (classification && classification->statements.empty()) {
        // An empty query: EmptyQueryResponse, nothing to decide.
        Pending entry;
        entry.kind = Pending::Kind::kExecute;
        entry.plans.emplace_back();
        push(std::move(entry));
        return step;
    }
    const policy::StatementInfo& statement =
        classification ? classification->statements.front() : unknown_statement();
    std::string_view text = classification ? std::string_view(classification->log_text) : std::string_view{};
    Decision decision = decide(statement, text, true);
    step.delay_until = decision.delay_until;
    // Whether the plan must carry what the throttle or the pipeline's after-hook needs.
    bool throttled = decision.throttle_candidate && !policies_->throttle && !policies_->pipeline.empty();
    if (decision.throttle_candidate && policies_->throttle) {
        policy::StatementContext context{*decision.effective, {}, identity_, decision.client, tracker_.state(),
                                         tracker_.depth(), true, session_id_, &throttle_matches_, received_};
        policy::Verdict verdict = policies_->throttle->before(context);
        note_throttle(verdict, text, decision.effective->kind);
        if (verdict.rejects()) {
            tracker_.on_error();
            ServerStep probe;
            probe.type = ServerStep::Type::kProbe;
            probe.error = {verdict.error.sqlstate, verdict.error.message, verdict.error.detail, verdict.error.hint};
            decision.steps.assign(1, std::move(probe));
        } else {
            if (verdict.delay_until && (!step.delay_until || *verdict.delay_until > *step.delay_until))
                step.delay_until = verdict.delay_until;
            throttled = true;
        }
    }

    if (decision.steps.empty()) {
        Pending& entry = emplace(Pending::Kind::kExecute);
        entry.sent = received_;
        Plan& plan = entry.plans.emplace_back();
        if (throttled) attach_throttle(plan, classification, decision.effective, decision.client);
        plan.kind = statement.kind;
        plan.before = std::move(decision.notices);
        keep_prepared(plan, decision);
        pushed();
        return step;
    }

    step.action = ClientStep::Action::kReplace;
    bool first = true;
    for (auto& s : decision.steps) {
        Plan plan;
        plan.kind = statement.kind;
        if (first) plan.before = std::move(decision.notices);
        first = false;
        switch (s.type) {
            case ServerStep::Type::kOriginal: {
                plan.tag = s.tag;
                keep_prepared(plan, decision);
                step.replacement.append(message);
                Pending entry;
                entry.kind = Pending::Kind::kExecute;
                entry.sent = received_;
                entry.plans.push_back(std::move(plan));
                push(std::move(entry));
                break;
            }
            case ServerStep::Type::kSql:
                plan.tag = s.tag;
                plan.hidden = s.hidden;
                inject_extended(step.replacement, s.sql, std::move(plan));
                break;
            case ServerStep::Type::kSynthetic: {
                Pending entry;
                entry.kind = Pending::Kind::kSynthetic;
                entry.synthetic = std::move(plan.before);
                wire::append_command_complete(entry.synthetic, s.tag);
                push(std::move(entry));
                break;
            }
            case ServerStep::Type::kProbe: {
                plan.mode = Plan::Mode::kProbe;
                plan.error = error_bytes(s.error);
                wire::append_execute(step.replacement, fresh_name(kProbePortal));
                Pending entry;
                entry.kind = Pending::Kind::kExecute;
                entry.plans.push_back(std::move(plan));
                push(std::move(entry));
                probe_until_sync_ = true;
                return step;
            }
            case ServerStep::Type::kError: {
                Pending entry;
                entry.kind = Pending::Kind::kSynthetic;
                entry.synthetic = std::move(plan.before);
                entry.synthetic += error_bytes(s.error);
                push(std::move(entry));
                skip_until_sync_ = true;
                return step;
            }
        }
    }
    return step;
}

Interceptor::ClientStep Interceptor::on_close(std::string_view message) {
    auto close = wire::parse_close(body_of(message));
    Pending entry;
    entry.kind = Pending::Kind::kClose;
    if (close) {
        // Forgotten only when the server confirms: a Close skipped after an error
        // leaves the statement in place. Meanwhile its uses count as unknown.
        entry.name = std::string(server_name(close->name));
        entry.closed_target = close->target;
        ++(close->target == 'S' ? closing_statements_ : closing_portals_)[entry.name];
    }
    push(std::move(entry));
    return {};
}

Interceptor::ClientStep Interceptor::on_function_call() {
    received_ = policy::Clock::now();
    // A fast-path function call can do anything (large objects write): a write of kind call.
    policy::StatementInfo call;
    call.kind = StatementKind::kCall;
    call.is_write = true;
    ClientStep step;
    Decision decision = decide(call, {}, false);
    step.delay_until = decision.delay_until;
    if (decision.throttle_candidate && policies_->throttle) {
        policy::StatementContext context{call, {}, identity_, decision.client, tracker_.state(), tracker_.depth(),
                                         false, session_id_, &throttle_matches_, received_};
        policy::Verdict verdict = policies_->throttle->before(context);
        note_throttle(verdict, "<function call>", StatementKind::kCall);
        if (verdict.rejects()) {
            ServerStep probe;
            probe.type = ServerStep::Type::kProbe;
            probe.error = {verdict.error.sqlstate, verdict.error.message, verdict.error.detail, verdict.error.hint};
            decision.steps.assign(1, std::move(probe));
        } else if (verdict.delay_until && (!step.delay_until || *verdict.delay_until > *step.delay_until)) {
            step.delay_until = verdict.delay_until;
        }
    }
    Pending entry;
    entry.kind = Pending::Kind::kFunctionCall;
    entry.sent = received_;
    for (const auto& s : decision.steps) {
        if (s.type != ServerStep::Type::kProbe && s.type != ServerStep::Type::kError) continue;
        // FunctionCall has no probe of its own: answer it here, as the server would
        // after an error (ErrorResponse, ReadyForQuery), without sending it.
        if (s.type == ServerStep::Type::kProbe) tracker_.on_error();
        entry.kind = Pending::Kind::kSynthetic;
        entry.synthetic = decision.notices + error_bytes(s.error);
        wire::append_ready_for_query(entry.synthetic, client_status());
        step.action = ClientStep::Action::kDrop;
        push(std::move(entry));
        return step;
    }
    Plan plan;
    plan.kind = StatementKind::kCall;
    plan.before = std::move(decision.notices);
    entry.plans.push_back(std::move(plan));
    push(std::move(entry));
    return step;
}

Interceptor::Decision Interceptor::decide(const policy::StatementInfo& input, std::string_view sql, bool extended) {
    Decision decision;
    const policy::StatementInfo* statement = &input;
    struct Candidate {
        Decision& d;
        ~Candidate() {
            // Only what reaches the server as the client's own statement is throttled.
            bool original = d.steps.empty();
            for (const auto& s : d.steps) original = original || s.type == ServerStep::Type::kOriginal;
            if (!original) d.throttle_candidate = false;
        }
    };
    // SQL-level EXECUTE runs a statement prepared earlier: judge what it runs.
    if (!input.execute_name.empty()) {
        const auto* prepared = statement_named(input.execute_name);
        statement = prepared && !(*prepared)->statements.empty() ? &(*prepared)->statements.front() : &unknown_statement();
    } else if (!input.fetch_portal.empty() && !portals_.empty()) {
        // FETCH or MOVE of a protocol-level portal runs that portal's statement (an INSERT
        // ... RETURNING, say): judge that. SQL cursors are not in the map; they are reads.
        if (portals_.contains(input.fetch_portal)) {
            const Portal* portal = portal_named(input.fetch_portal);
            const policy::Classification* held = portal ? portal->classification.get() : nullptr;
            statement = held && !held->statements.empty() ? &held->statements.front() : &unknown_statement();
        }
    }
    const bool prepare_only = !input.prepare_name.empty();
    decision.client = client_name(statement);
    const std::string& client = decision.client;
    count_statement(prepare_only ? unknown_statement() : *statement, client);
    decision.effective = statement;
    decision.throttle_candidate = !prepare_only;
    Candidate candidate{decision};
    auto& m = metrics::proxy_metrics();
    const std::string& session = session_text_;

    // Transaction control first: nesting modes and doom decide on their own.
    auto mode = config_->transactions.nesting;
    const bool transaction_control = statement->kind == StatementKind::kBegin ||
                                     statement->kind == StatementKind::kCommit ||
                                     statement->kind == StatementKind::kRollback ||
                                     statement->kind == StatementKind::kPrepareTransaction;
    // A rule's nesting mode governs the whole nest: BEGIN and the COMMIT/ROLLBACK that end it.
    if (transaction_control && tracker_.state() != TxState::kIdle && policies_->rules)
        if (auto o = policies_->rules->nesting_override(identity_, client)) mode = *o;
    const TxState before = tracker_.state();
    // Inside a failed block the server refuses the statement (25P02) without running it:
    // it costs no tokens and is no policy's to judge. Only when that is certain, though: a
    // server error that came after later statements were foreseen (a pipelined ROLLBACK TO,
    // say) leaves the foresight off until the next quiet ReadyForQuery, and the statement
    // may well run.
    const bool surely_failed = before == TxState::kFailed && !errors_in_flight_;
    if (surely_failed) decision.throttle_candidate = false;
    // The outer transaction's first statement, for the log lines of a nested BEGIN or an
    // early COMMIT (only transaction control can cause those).
    const std::string outer = transaction_control ? tracker_.outer_begin_statement() : std::string();
    auto tc = tracker_.on_statement(prepare_only ? input : *statement, sql, mode);
    if (tc.nested_begin) {
        m.nested_begins.labels({m.clients.label(client), policy::to_string(mode)}).inc();
        log::warn("nested_begin", {{"session", session}, {"client", client}, {"mode", policy::to_string(mode)},
                                   {"depth", std::to_string(tracker_.depth())},
                                   {"statement", log::truncate_statement(sql)},
                                   {"outer_transaction", log::truncate_statement(outer)}});
    }
    if (tc.early_commit) {
        m.lint_findings.labels({"early_commit", m.clients.label(client)}).inc();
        log::warn("early_commit", {{"session", session}, {"client", client},
                                   {"statement", log::truncate_statement(sql)},
                                   {"outer_transaction", log::truncate_statement(outer)}});
    }
    if (tc.doomed_now) {
        m.doomed_transactions.labels({*tc.doomed_now}).inc();
        log::warn("transaction_doomed", {{"session", session}, {"client", client}, {"reason", *tc.doomed_now},
                                         {"statement", log::truncate_statement(sql)}});
    }
    if (tc.doomed_write_rejected) {
        m.doomed_writes_rejected.inc();
        log::info("doomed_write_rejected", {{"session", session}, {"client", client},
                                            {"kind", policy::to_string(statement->kind)},
                                            {"statement", log::truncate_statement(sql)}});
    }
    if (tc.doomed_commit) {
        m.transaction(metrics::TransactionOutcome::kDoomedRollback).inc();
        log::warn("doomed_commit_rolled_back", {{"session", session}, {"client", client}});
    }
    if (before == TxState::kIdle && statement->is_write && !transaction_control) {
        // Many autocommitted writes in a row, each soon after the last: probably one
        // transaction was meant (and each write pays for its own commit).
        auto now = policy::Clock::now();
        if (autocommit_run_ > 0 && now - last_autocommit_write_ > kAutocommitRunGap) autocommit_run_ = 0;
        last_autocommit_write_ = now;
        if (++autocommit_run_ == kAutocommitRunLength) {
            m.lint_findings.labels({"autocommit_write_run", m.clients.label(client)}).inc();
            log::info("lint_autocommit_write_run", {{"session", session}, {"client", client},
                                                    {"writes", std::to_string(kAutocommitRunLength)},
                                                    {"statement", log::truncate_statement(sql)}});
        }
    } else if (statement->kind == StatementKind::kBegin || (before != TxState::kIdle)) {
        autocommit_run_ = 0;
    }
    if (statement->row_locking && before == TxState::kIdle && statement->kind == StatementKind::kSelect) {
        // FOR UPDATE outside a block: the lock ends with the statement.
        m.lint_findings.labels({"row_lock_outside_transaction", m.clients.label(client)}).inc();
        log::info("lint_row_lock_outside_transaction", {{"session", session}, {"client", client},
                                                        {"statement", log::truncate_statement(sql)}});
    }
    for (const auto& n : tc.notices) decision.notices += notice_bytes(n);
    if (tc.final) {
        decision.steps = std::move(tc.steps);
        if (!decision.steps.empty() && decision.steps.back().type == ServerStep::Type::kProbe)
            log::warn("statement_rejected", {{"session", session}, {"client", client}, {"policy", "transactions"},
                                             {"kind", policy::to_string(statement->kind)},
                                             {"sqlstate", decision.steps.back().error.sqlstate},
                                             {"statement", log::truncate_statement(sql)}});
        return decision;
    }

    // Then the policy pipeline (rules, throttles). Inside a failed block the server
    // refuses everything but the end of it (25P02): nothing for a policy to add.
    // Without a pipeline there is no verdict to build and take apart for each statement.
    static const policy::Verdict kNoVerdict;
    std::optional<policy::Verdict> ran;
    if (!prepare_only && !surely_failed && !policies_->pipeline.empty()) {
        policy::StatementContext context{*statement, sql, identity_, client, before, tracker_.depth(), extended,
                                         session_id_};
        context.rule_matches = &rule_matches_;
        ran.emplace(policies_->pipeline.before(context));
        if (!ran->hits.empty() || ran->rejects()) log_decision(*ran, *statement, sql, client);
    }
    const policy::Verdict& verdict = ran ? *ran : kNoVerdict;
    for (const auto& n : verdict.notices) decision.notices += notice_bytes(n);
    decision.delay_until = verdict.delay_until;
    if (verdict.rejects()) {
        // As if the server had failed the statement: a block is aborted, an implicit
        // transaction rolled back.
        if (before == TxState::kIdle && tracker_.state() != TxState::kIdle) {
            // a BEGIN that was just tracked did not happen
            tracker_.on_ready_for_query(TxState::kIdle);
        }
        tracker_.on_error();
        ServerStep probe;
        probe.type = ServerStep::Type::kProbe;
        probe.error = policy::Message{verdict.error.sqlstate, verdict.error.message, verdict.error.detail,
                                      verdict.error.hint};
        decision.steps.push_back(std::move(probe));
        decision.throttle_candidate = false;
        return decision;
    }
    if (verdict.doom_reason && tracker_.doom(*verdict.doom_reason)) {
        m.doomed_transactions.labels({*verdict.doom_reason}).inc();
        log::warn("transaction_doomed", {{"session", session}, {"client", client}, {"reason", *verdict.doom_reason},
                                         {"rule", verdict.rule}, {"statement", log::truncate_statement(sql)}});
        if (statement->is_write && !tracker_.server_read_only()) {
            // The statement that dooms the transaction is its first refused write.
            auto again = tracker_.on_statement(*statement, sql, mode);
            if (again.final) {
                m.doomed_writes_rejected.inc();
                decision.steps = std::move(again.steps);
                return decision;
            }
        }
    }
    if (tracker_.doom_reason() && !tracker_.server_read_only() && tracker_.state() == TxState::kInBlock) {
        // The server enforces the doom too, so that writes pgwarden cannot see (inside
        // functions) are refused as well: a transaction may turn read-only at any time.
        tracker_.set_server_read_only();
        policy::ServerStep read_only{ServerStep::Type::kSql, std::string(kReadOnlySql), "", true, {}};
        if (statement->kind == StatementKind::kRollbackTo) {
            // ROLLBACK TO undoes a SET TRANSACTION made after the savepoint: say it again after.
            decision.steps.push_back(policy::ServerStep{});
            decision.steps.push_back(std::move(read_only));
        } else {
            decision.steps.push_back(std::move(read_only));
            decision.steps.push_back(policy::ServerStep{});
        }
    }
    track_prepared(input, decision);
    if (statement->kind == StatementKind::kSet || !input.prepare_name.empty() || !input.deallocate_name.empty() ||
        input.deallocate_all || statement->kind == StatementKind::kBegin || statement->kind == StatementKind::kCommit ||
        statement->kind == StatementKind::kRollback || statement->kind == StatementKind::kSavepoint ||
        statement->kind == StatementKind::kRelease || statement->kind == StatementKind::kRollbackTo) {
        // Identity follows the statements it depends on (SET and transaction ends).
        switch (statement->kind) {
            case StatementKind::kBegin:
                if (before == TxState::kIdle) identity_.begin_transaction();
                break;
            case StatementKind::kCommit:
                if (before == TxState::kFailed)
                    identity_.rollback_transaction();
                else
                    identity_.commit_transaction();
                if (statement->chain) identity_.begin_transaction();
                break;
            case StatementKind::kRollback:
                identity_.rollback_transaction();
                if (statement->chain) identity_.begin_transaction();
                break;
            case StatementKind::kSavepoint:
                identity_.savepoint(statement->savepoint);
                break;
            case StatementKind::kRelease:
                identity_.release_savepoint(statement->savepoint);
                break;
            case StatementKind::kRollbackTo:
                identity_.rollback_to_savepoint(statement->savepoint);
                break;
            case StatementKind::kSet:
                identity_.apply_set(*statement, tracker_.state() != TxState::kIdle);
                if (statement->set_name == "application_name" && statement->set_value)
                    identity_.set_application_name(*statement->set_value);
                break;
            default:
                break;
        }
    }
    return decision;
}

std::string Interceptor::client_name(const policy::StatementInfo* statement) {
    if (statement && !statement->tags.empty()) return identity_.resolve(config_->identity, statement);
    // Without tags the name depends only on the identity and the configuration.
    if (resolved_config_ != config_ || resolved_version_ != identity_.version()) {
        resolved_client_ = identity_.resolve(config_->identity, nullptr);
        resolved_config_ = config_;
        resolved_version_ = identity_.version();
    }
    return resolved_client_;
}

void Interceptor::track_prepared(const policy::StatementInfo& s, Decision& decision) {
    if (!s.prepare_name.empty() && !closing_statements_.empty() && closing_statements_.erase(s.prepare_name) > 0) {
        // A Close of the name is in flight in this batch (an earlier batch's would have
        // held the Query back): if it runs, so does this PREPARE, which defines the name anew.
        statements_.erase(s.prepare_name);
    }
    if (!s.prepare_name.empty() && statements_.find(s.prepare_name) == statements_.end()) {
        // PREPARE shares the namespace of protocol-level statements.
        auto inner = std::make_shared<policy::Classification>();
        inner->statements.push_back(s);
        inner->statements.back().prepare_name.clear();
        statements_.emplace(s.prepare_name, std::move(inner));
        decision.prepared = s.prepare_name;
    }
    if (!s.deallocate_name.empty()) {
        if (auto it = statements_.find(s.deallocate_name); it != statements_.end()) {
            decision.deallocated = s.deallocate_name;
            decision.deallocated_value = it->second;
            statements_.erase(it);
        }
    }
    if (s.deallocate_all) {
        // The unnamed statement is not a prepared statement to DEALLOCATE ALL (nor DISCARD ALL).
        if (!statements_.empty()) decision.cleared = std::make_shared<const StatementMap>(statements_);
        std::shared_ptr<const policy::Classification> unnamed;
        if (auto it = statements_.find(std::string_view{}); it != statements_.end()) unnamed = std::move(it->second);
        statements_.clear();
        if (unnamed) statements_.emplace(std::string(), std::move(unnamed));
    }
}

void Interceptor::keep_prepared(Plan& plan, Decision& decision) {
    if (!decision.prepared.empty()) plan.prepared = std::move(decision.prepared);
    if (!decision.deallocated.empty()) plan.deallocated = std::move(decision.deallocated);
    if (decision.deallocated_value) plan.deallocated_value = std::move(decision.deallocated_value);
    if (decision.cleared) plan.cleared = std::move(decision.cleared);
}

void Interceptor::undo_prepared(Pending& entry, std::size_t from) {
    // Last first: each plan's undo returns the map to what that plan found.
    for (std::size_t i = entry.plans.size(); i-- > from;) {
        Plan& plan = entry.plans[i];
        if (plan.cleared) statements_ = *plan.cleared;
        if (!plan.prepared.empty()) statements_.erase(plan.prepared);
        if (!plan.deallocated.empty() && plan.deallocated_value)
            statements_.emplace(plan.deallocated, plan.deallocated_value);
    }
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
        log::info("rule_matched", {{"session", session_text_},
                                   {"client", client},
                                   {"rule", hit.rule},
                                   {"action", policy::to_string(hit.action)},
                                   {"kind", policy::to_string(statement.kind)},
                                   {"statement", log::truncate_statement(sql)}});
    }
    if (verdict.rejects())
        log::warn("statement_rejected", {{"session", session_text_},
                                         {"client", client},
                                         {"policy", verdict.policy},
                                         {"rule", verdict.rule},
                                         {"kind", policy::to_string(statement.kind)},
                                         {"sqlstate", verdict.error.sqlstate},
                                         {"statement", log::truncate_statement(sql)}});
}

void Interceptor::count_transaction_end(StatementKind kind, std::string_view message) {
    if (kind != StatementKind::kCommit && kind != StatementKind::kRollback && kind != StatementKind::kPrepareTransaction)
        return;
    auto cc = wire::parse_command_complete(body_of(message));
    if (!cc) return;
    auto& m = metrics::proxy_metrics();
    // COMMIT of a failed transaction is answered with ROLLBACK: it failed.
    if (cc->tag == "COMMIT" || cc->tag == "PREPARE TRANSACTION")
        m.transaction(metrics::TransactionOutcome::kCommit).inc();
    else if (cc->tag == "ROLLBACK")
        m.transaction(kind == StatementKind::kRollback ? metrics::TransactionOutcome::kRollback
                                                       : metrics::TransactionOutcome::kFailed)
            .inc();
}

void Interceptor::push(Pending&& pending) {
    pending.seq = ++next_seq_;
    queue_.push_back(std::move(pending));
    pushed();
}

// ---- server side ------------------------------------------------------------------------

void Interceptor::reach(Pending& entry, std::string& sink) {
    while (!entry.failed && entry.next < entry.plans.size()) {
        Plan& plan = entry.plans[entry.next];
        if (!plan.before.empty()) sink += std::exchange(plan.before, {});
        if (plan.mode == Plan::Mode::kSynthetic) {
            wire::append_command_complete(sink, plan.tag);
            ++entry.next;
            continue;
        }
        if (plan.mode == Plan::Mode::kError) {
            sink += plan.error;
            entry.failed = true;
        }
        return;
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
        if (front.kind == Pending::Kind::kSync && front.ignored) {
            queue_.pop_front();  // sent during COPY FROM STDIN: no answer will come for it
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

void Interceptor::drop_copy_ends_before(std::uint64_t seq) {
    std::size_t stale = 0;
    while (stale < copy_ends_.size() && copy_ends_[stale].after < seq) ++stale;
    if (stale > 0) copy_ends_.erase(copy_ends_.begin(), copy_ends_.begin() + static_cast<std::ptrdiff_t>(stale));
}

void Interceptor::on_copy_in_response() {
    // The server reads the client's copy data now, and ignores any Sync or Flush until
    // CopyDone or CopyFail (libpq sends a Sync right after the Execute of a COPY): those
    // Syncs will get no ReadyForQuery. The copy reads the client's messages from just after
    // the one that started it (a Query may run several copies, one after the other), so it
    // ends at the first CopyDone or CopyFail sent after that message and not yet taken by
    // an earlier copy.
    const std::uint64_t started = queue_.front().seq;
    drop_copy_ends_before(started);
    const bool ended = !copy_ends_.empty();
    const std::uint64_t end = ended ? copy_ends_.front().after : next_seq_;
    for (std::size_t i = 1; i < queue_.size(); ++i) {
        Pending& later = queue_.at(i);
        if (later.seq > end) break;
        if (later.kind == Pending::Kind::kSync) later.ignored = true;
    }
    if (!ended) {
        copy_in_ = true;  // the client has not ended it yet
    } else if (--copy_ends_.front().count == 0) {
        copy_ends_.erase(copy_ends_.begin());
    }
}

Interceptor::ResponseStep Interceptor::on_server_message(char type, std::string_view message) {
    ResponseStep step;
    if (type == wire::be::kParameterStatus) {
        auto status = wire::parse_parameter_status(body_of(message));
        if (status) on_parameter(status->name, status->value);
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
    if (type == wire::be::kCopyInResponse) {
        on_copy_in_response();
        return step;
    }
    if (front.swallow) step.action = ResponseStep::Action::kDrop;
    switch (type) {
        case wire::be::kCommandComplete:
        case wire::be::kEmptyQueryResponse:
        case wire::be::kPortalSuspended: {
            if (front.kind != Pending::Kind::kQuery && front.kind != Pending::Kind::kExecute) break;
            if (front.next < front.plans.size()) {
                const Plan& plan = front.plans[front.next];
                if (plan.hidden) {
                    step.action = ResponseStep::Action::kDrop;
                } else if (!plan.tag.empty() && type == wire::be::kCommandComplete) {
                    step.action = ResponseStep::Action::kReplace;
                    wire::append_command_complete(step.replacement, plan.tag);
                }
                if (type == wire::be::kCommandComplete && !plan.hidden) count_transaction_end(plan.kind, message);
                if (plan.throttled_by && plan.statement && type == wire::be::kCommandComplete) {
                    auto cc = wire::parse_command_complete(body_of(message));
                    policy::Outcome outcome;
                    if (cc) {
                        outcome.command_tag = cc->tag;
                        outcome.rows = wire::command_tag_rows(cc->tag);
                    }
                    if (front.sent != policy::Clock::time_point{}) outcome.duration = policy::Clock::now() - front.sent;
                    policy::StatementContext context{*plan.statement, {}, identity_, plan.client, tracker_.state(),
                                                     tracker_.depth(), front.kind == Pending::Kind::kExecute,
                                                     session_id_};
                    if (plan.throttled_by->throttle) plan.throttled_by->throttle->after(context, outcome);
                    plan.throttled_by->pipeline.after(context, outcome);
                }
                if (type != wire::be::kPortalSuspended && front.sent != policy::Clock::time_point{} && !plan.hidden) {
                    auto seconds = std::chrono::duration<double>(policy::Clock::now() - front.sent).count();
                    statement_duration(plan.kind).observe(seconds);
                }
            }
            if (front.kind == Pending::Kind::kQuery) {
                ++front.next;
                reach(front, step.emit_after);
            } else {
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
            if (front.kind == Pending::Kind::kClose) {
                if (front.closed_target != 0) {
                    auto& closing = front.closed_target == 'S' ? closing_statements_ : closing_portals_;
                    if (auto it = closing.find(front.name); it != closing.end()) {
                        if (--it->second <= 0) closing.erase(it);
                        if (front.closed_target == 'S')
                            statements_.erase(front.name);
                        else
                            portals_.erase(front.name);
                    }
                }
                pop_front(step.emit_after);
            }
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

void Interceptor::on_error_response(std::string_view message, ResponseStep& step) {
    // A COPY FROM STDIN that fails ends there: the server answers the client's next Sync
    // (extended protocol) and ignores the copy data and CopyDone still to come.
    copy_in_ = false;
    copy_data_sent_ = false;
    if (queue_.empty()) return;
    auto fields = wire::parse_error_fields(body_of(message));
    std::string_view sqlstate = fields ? fields->sqlstate() : std::string_view{};
    errors_in_flight_ = true;
    tracker_.on_error();
    Pending& front = queue_.front();
    // An injected statement that stands for a client's statement (it has a tag the
    // client sees) reports its failure as that statement's.
    const bool stands_for_client = front.kind == Pending::Kind::kExecute && !front.plans.empty() &&
                                   !front.plans.front().hidden && !front.plans.front().tag.empty();
    if (front.swallow && !stands_for_client) {
        step.action = ResponseStep::Action::kDrop;
        log::error("injected_statement_failed", {{"session", session_text_}, {"sqlstate", sqlstate},
                                                 {"message", fields ? fields->message() : std::string_view{}}});
    }
    auto replace_probe = [&](Pending& entry) {
        if (entry.next < entry.plans.size() && entry.plans[entry.next].mode == Plan::Mode::kProbe &&
            sqlstate == kProbeSqlstate) {
            step.action = ResponseStep::Action::kReplace;
            step.replacement = entry.plans[entry.next].error;
        }
    };
    switch (front.kind) {
        case Pending::Kind::kQuery:
            replace_probe(front);
            front.failed = true;
            undo_prepared(front, front.next);
            if (tracker_.state() == TxState::kIdle && identity_at_query_start_) {
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
        default: {
            // The server now skips everything up to Sync, and so do the answers we expect.
            // Names this batch defined are forgotten once the batch is off the queue, unless
            // a later batch defines them again: the unnamed statement belongs to the last
            // Parse of it, whatever became of earlier ones.
            // (name, what it meant before: restored when the Parse was skipped, not failed)
            std::vector<std::pair<std::string, std::shared_ptr<const policy::Classification>>> undefined;
            // A failed Bind may or may not have replaced an existing portal of its name (it
            // depends on where it failed), and a skipped one did not: what pgwarden noted
            // for the name is no longer known, which Execute treats as unknown.
            auto unbound = [this](const Pending& bind) {
                if (auto it = portals_.find(bind.name); it != portals_.end()) it->second.classification = nullptr;
            };
            if (front.kind == Pending::Kind::kParse && front.created) undefined.emplace_back(front.name, nullptr);
            if (front.kind == Pending::Kind::kBind) unbound(front);
            // A failed Execute's PREPARE or DEALLOCATE did not happen.
            if (front.kind == Pending::Kind::kExecute) undo_prepared(front, 0);
            queue_.pop_front();
            while (!queue_.empty() && (queue_.front().kind != Pending::Kind::kSync || queue_.front().ignored)) {
                Pending& skipped = queue_.front();
                if (skipped.kind == Pending::Kind::kParse && skipped.created)
                    undefined.emplace_back(skipped.name, std::move(skipped.previous));
                if (skipped.kind == Pending::Kind::kBind) unbound(skipped);
                // A Query or Execute inside the skipped part never runs: nor do its PREPAREs
                // and DEALLOCATEs.
                if (skipped.kind == Pending::Kind::kQuery || skipped.kind == Pending::Kind::kExecute)
                    undo_prepared(skipped, 0);
                if (skipped.kind == Pending::Kind::kClose && skipped.closed_target != 0) {
                    // The server never ran this Close: what it named still exists.
                    auto& closing = skipped.closed_target == 'S' ? closing_statements_ : closing_portals_;
                    if (auto it = closing.find(skipped.name); it != closing.end() && --it->second <= 0)
                        closing.erase(it);
                }
                queue_.pop_front();
            }
            for (auto& [name, previous] : undefined) {
                bool redefined = false;
                for (std::size_t i = 0; i < queue_.size() && !redefined; ++i) {
                    const Pending& later = queue_[i];
                    redefined = later.kind == Pending::Kind::kParse && later.created && later.name == name;
                }
                if (redefined) continue;
                if (previous)
                    statements_[name] = std::move(previous);
                else
                    statements_.erase(name);
            }
            // No Sync yet: what the client sends until its Sync is skipped as well.
            if (queue_.empty()) server_skipping_ = true;
            return;
        }
    }
}

void Interceptor::on_ready_for_query(std::string_view message, ResponseStep& step) {
    auto ready = wire::parse_ready_for_query(body_of(message));
    bool swallowed = false;
    // Answers end at the first Sync, Query or FunctionCall entry.
    while (!queue_.empty()) {
        auto kind = queue_.front().kind;
        const bool ignored = queue_.front().ignored;  // a Sync sent during COPY FROM STDIN
        swallowed = queue_.front().swallow;
        const std::uint64_t seq = queue_.front().seq;
        queue_.pop_front();
        if ((kind == Pending::Kind::kSync && !ignored) || kind == Pending::Kind::kQuery ||
            kind == Pending::Kind::kFunctionCall) {
            last_ready_seq_ = seq;  // its ParameterStatus messages have come
            break;
        }
    }
    if (swallowed) step.action = ResponseStep::Action::kDrop;
    if (ready && queue_.empty()) {
        TxState actual = ready->status == 'T'   ? TxState::kInBlock
                         : ready->status == 'E' ? TxState::kFailed
                                                : TxState::kIdle;
        // pgwarden's prediction must agree with the server whenever nothing is in flight.
        if (!errors_in_flight_ && !tracker_.rolled_back_for_idle() && actual != tracker_.state())
            log::error("tx_state_mismatch", {{"session", session_text_},
                                             {"predicted", policy::to_string(tracker_.state())},
                                             {"server", policy::to_string(actual)}});
        if (actual == TxState::kIdle && tracker_.state() != TxState::kIdle) identity_.rollback_transaction();
        tracker_.on_ready_for_query(actual);
        errors_in_flight_ = false;
        if (!redefining_.empty()) redefining_.clear();  // all answered
        if (actual == TxState::kIdle) {
            // Portals end with their transaction. The names stay (up to a few), mapped to
            // null, so that the next Bind of the same name allocates nothing.
            if (portals_.size() > kKeptPortalNames) {
                portals_.clear();
            } else {
                for (auto& [name, portal] : portals_) portal.classification.reset();
            }
            identity_at_query_start_.reset();
        }
    }
    if (!swallowed && tracker_.rolled_back_for_idle() && ready && ready->status != 'E') {
        // The client is in a block pgwarden rolled back: it sees a failed transaction.
        step.action = ResponseStep::Action::kReplace;
        wire::append_ready_for_query(step.replacement, 'E');
    }
    activate_front(step.emit_after);
}

}  // namespace pgwarden::proxy
