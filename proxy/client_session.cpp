// The client session: startup, authentication relay, and the two relay loops.
#include "proxy/client_session.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <array>
#include <deque>
#include <vector>

#include "proxy/deadline.hpp"
#include "metrics/proxy_metrics.hpp"
#include "proxy/event_log.hpp"
#include "wire/limits.hpp"
#include "wire/reader.hpp"
#include "wire/message_types.hpp"

namespace pgwarden::proxy {

using namespace std::chrono_literals;

namespace {

// Authentication messages carry at most PG_MAX_AUTH_TOKEN_LENGTH (65535) bytes of token,
// src/backend/libpq/auth.c; allow a little framing on top.
constexpr std::size_t kMaxAuthMessageLength = 65535 + 1024;
// A FATAL error to a client that may not be reading must not hold the session open.
constexpr auto kFarewellTimeout = 2s;

// Backend messages whose body the relay must read; any other type may be forwarded in
// pieces as it arrives (DataRow, CopyData, RowDescription...).
bool server_message_needs_body(char type) {
    switch (type) {
        case wire::be::kReadyForQuery:
        case wire::be::kParameterStatus:
        case wire::be::kErrorResponse:
        case wire::be::kCommandComplete:
            return true;
        default:
            return false;
    }
}

// Adds bytes to a gathering write. Messages relayed from one read lie back to back in
// its buffer: they become one piece, so the write is one contiguous copy in the kernel
// rather than one iovec per message.
void append_bytes(std::vector<asio::const_buffer>& out, const char* data, std::size_t size) {
    if (!out.empty()) {
        asio::const_buffer& last = out.back();
        if (static_cast<const char*>(last.data()) + last.size() == data) {
            last = asio::const_buffer(last.data(), last.size() + size);
            return;
        }
    }
    out.emplace_back(data, size);
}

// The first half of a relay loop's read, without a coroutine: the room for a read of at
// least `want` bytes, filled at once when the bytes are already there. True when that
// read happened (`n` bytes, or `ec` set); otherwise `room` is where the loop waits. Once
// everything read is handled, the next read waits for the peer in the buffer's small
// space, unless a burst is on; when a burst finds nothing more, it is over and the wait
// goes back to the small space. TLS has no read that does not wait, so an empty TLS
// buffer always waits in the small space.
bool read_without_waiting(Stream& stream, Buffer& buffer, std::size_t want, bool burst,
                          asio::mutable_buffer& room, std::size_t& n, error_code& ec) {
    const bool drained = buffer.empty();
    if (drained && stream.is_tls()) burst = false;
    std::span<char> space = buffer.prepare_read(want, burst);
    room = asio::mutable_buffer(space.data(), space.size());
    n = 0;
    // A drained buffer usually means a drained socket, and then only a wait makes sense;
    // but when Asio would read before it waits anyway, that read is ours to make: if it
    // finds nothing, the socket is marked drained and the wait is one Asio need not try.
    if ((!drained || burst || stream.reads_before_waiting()) && stream.try_read(room, n, ec)) return true;
    if (drained && burst) {
        space = buffer.prepare_read(want, false);
        room = asio::mutable_buffer(space.data(), space.size());
    }
    return false;
}

// After a relay read of `n` bytes into a room of `room` bytes: a read that filled its room
// most likely left more behind. When that room was the buffer's small space, a plain
// socket is read again at once, into the heap, so that an answer a little larger than the
// small space still leaves in one write; otherwise the next read, a large one, takes it.
// True when the last read filled its room. An error here ends the session all the same:
// after a reset or an end of stream the next read finds the end of the stream, once the
// bytes already read are relayed (the loops end a session alike for either).
bool read_on(Stream& stream, Buffer& buffer, std::size_t n, std::size_t room) {
    if (n == 0 || n < room) return false;
    if (stream.is_tls() || buffer.on_heap()) return true;
    const std::span<char> room_more = buffer.prepare_read(1, true);
    const asio::mutable_buffer more(room_more.data(), room_more.size());
    std::size_t got = 0;
    error_code ec;
    if (!stream.try_read(more, got, ec) || ec) return false;
    buffer.commit(got);
    return got == more.size();
}

bool auth_code_expects_reply(std::int32_t code) {
    switch (code) {
        case wire::auth::kCleartextPassword:
        case wire::auth::kMd5Password:
        case wire::auth::kGss:
        case wire::auth::kGssContinue:
        case wire::auth::kSspi:
        case wire::auth::kSasl:
        case wire::auth::kSaslContinue:
            return true;
        default:
            return false;
    }
}

std::string address_of(const tcp::socket& socket) {
    error_code ec;
    auto ep = socket.remote_endpoint(ec);
    if (ec) return "unknown";
    return ep.address().to_string();
}

}  // namespace

const char* to_string(SessionState state) {
    switch (state) {
        case SessionState::kStartup: return "startup";
        case SessionState::kConnecting: return "connecting";
        case SessionState::kAuthenticating: return "authenticating";
        case SessionState::kIdle: return "idle";
        case SessionState::kInTransaction: return "in_transaction";
        case SessionState::kFailedTransaction: return "failed_transaction";
        case SessionState::kClosing: return "closing";
    }
    return "unknown";
}

ClientSession::ClientSession(Runtime& runtime, tcp::socket socket)
    : runtime_(runtime),
      config_(runtime.config()),
      id_(runtime.next_session_id()),
      client_(std::move(socket)),
      started_(std::chrono::steady_clock::now()) {
    peer_address_ = address_of(client_.socket());
    error_code ec;
    client_.socket().set_option(tcp::no_delay(true), ec);
}

ClientSession::~ClientSession() {
    if (client_secret_ != 0 && server_) runtime_.cancels().remove(server_->process_id, client_secret_);
    if (counted_unauthenticated_) runtime_.unauthenticated.fetch_sub(1, std::memory_order_relaxed);
}

void ClientSession::set_state(SessionState state) {
    bool in_block = state == SessionState::kInTransaction || state == SessionState::kFailedTransaction;
    bool was_in_block = state_ == SessionState::kInTransaction || state_ == SessionState::kFailedTransaction;
    if (in_block && !was_in_block) transaction_started_ = std::chrono::steady_clock::now();
    state_ = state;
}

void ClientSession::begin_shutdown() {
    shutting_down_ = true;
    end_if_quiet_for_shutdown();
}

void ClientSession::end_if_quiet_for_shutdown() {
    // Quiet: nothing in flight and no transaction open. Waking the client loop makes
    // it end the session with a goodbye to both sides.
    if (!shutting_down_ || !interceptor_ || interceptor_->in_flight() > 0 ||
        interceptor_->tx_state() != policy::TxState::kIdle)
        return;
    client_.cancel();
}

std::string ClientSession::doom(const std::string& reason) {
    if (!interceptor_) return "the client is not logged in yet";
    return interceptor_->doom(reason);
}

awaitable<bool> ClientSession::wait_for_throttle(std::chrono::steady_clock::time_point until) {
    // Waits in short slices so that a client that hangs up gives its place in the queue
    // back at once, and a reload that removes the delaying rule lets the statement go.
    constexpr auto kSlice = std::chrono::milliseconds(50);
    asio::steady_timer timer(co_await asio::this_coro::executor);
    auto generation = runtime_.generation();
    error_code ec;
    while (std::chrono::steady_clock::now() < until) {
        timer.expires_at(std::min(until, std::chrono::steady_clock::now() + kSlice));
        co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        if (ec || relay_stopping_) {
            interceptor_->abandon_delay();
            co_return false;
        }
        char byte;
        ssize_t peeked = ::recv(client_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (peeked == 0 || (peeked < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            interceptor_->abandon_delay();  // before the log line, which tests wait for
            log::info("throttle_waiter_left", {{"session", std::to_string(id_)}});
            co_return false;
        }
        if (runtime_.generation() != generation) {
            generation = runtime_.generation();
            if (!runtime_.policies()->has_throttle(interceptor_->delaying_rule())) break;
        }
    }
    co_return true;
}

awaitable<bool> ClientSession::wait_for_server(char type, std::string_view message) {
    if (!server_answered_) server_answered_ = std::make_unique<asio::steady_timer>(client_.socket().get_executor());
    error_code ec;
    // The check and the wait run with nothing in between on this session's thread, so a
    // wake-up cannot fall between them; the server loop wakes this after every batch.
    // Woken by the server loop; also every second, to notice a client that hung up or a
    // shutdown, so that no session can outlive its client here.
    while (interceptor_->must_wait_for_server(type, message)) {
        if (relay_stopping_ || shutting_down_) co_return false;
        char byte;
        ssize_t peeked = ::recv(client_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
        if (peeked == 0 || (peeked < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) co_return false;
        server_answered_->expires_after(std::chrono::seconds(1));
        co_await server_answered_->async_wait(asio::redirect_error(asio::use_awaitable, ec));
    }
    co_return !relay_stopping_;
}

void ClientSession::note_client_activity() {
    ++client_activity_;
    if (idle_timer_) idle_timer_->cancel();
}

void ClientSession::arm_idle_timer() {
    auto timeout = config_->transactions.idle_timeout;
    if (timeout.count() <= 0 || !interceptor_ || !interceptor_->idle_in_transaction()) return;
    if (!idle_timer_) idle_timer_ = std::make_unique<asio::steady_timer>(client_.socket().get_executor());
    idle_timer_->expires_after(timeout);
    std::weak_ptr<ClientSession> weak = shared_from_this();
    std::uint64_t activity = client_activity_;
    idle_timer_->async_wait([weak, activity](const error_code& ec) {
        auto self = weak.lock();
        if (ec || !self || self->client_activity_ != activity) return;
        asio::co_spawn(self->executor(), self->roll_back_idle_transaction(activity), asio::detached);
    });
}

awaitable<void> ClientSession::roll_back_idle_transaction(std::uint64_t activity) {
    auto self = shared_from_this();
    if (client_activity_ != activity || !interceptor_->idle_in_transaction()) co_return;
    auto timeout = config_->transactions.idle_timeout;
    std::string after = std::to_string(timeout.count() % 1000 == 0 ? timeout.count() / 1000 : timeout.count()) +
                        (timeout.count() % 1000 == 0 ? "s" : "ms");
    auto age = std::chrono::duration<double>(std::chrono::steady_clock::now() - transaction_started_).count();
    std::string rollback = interceptor_->roll_back_for_idle(after);
    auto& m = metrics::proxy_metrics();
    m.idle_transaction_rollbacks.inc();
    m.transaction(metrics::TransactionOutcome::kIdleRollback).inc();
    log::warn("idle_transaction_rolled_back", {{"session", std::to_string(id_)}, {"user", user_},
                                               {"client", interceptor_->identity().resolve(config_->identity, nullptr)},
                                               {"idle_timeout", after}, {"transaction_seconds", std::to_string(age)}});
    error_code ec;
    if (!server_write_.try_lock()) co_await server_write_.lock();
    co_await server_->stream().write(asio::buffer(rollback), ec);
    server_write_.unlock();
}

nlohmann::json ClientSession::describe() const {
    nlohmann::json j;
    j["id"] = id_;
    j["address"] = peer_address_;
    j["user"] = user_;
    j["database"] = database_;
    j["application_name"] = interceptor_ ? interceptor_->identity().application_name() : application_name_;
    j["client"] = interceptor_ ? interceptor_->identity().resolve(config_->identity, nullptr) : std::string();
    j["state"] = interceptor_ && interceptor_->in_flight() > 0 ? "active" : to_string(state_);
    j["nesting_depth"] = interceptor_ ? interceptor_->transaction().depth() : 0;
    if (interceptor_ && interceptor_->transaction().doom_reason())
        j["doomed_reason"] = *interceptor_->transaction().doom_reason();
    else
        j["doomed_reason"] = nullptr;
    bool in_block = state_ == SessionState::kInTransaction || state_ == SessionState::kFailedTransaction;
    if (in_block)
        j["transaction_age_seconds"] =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - transaction_started_).count();
    else
        j["transaction_age_seconds"] = nullptr;
    j["server_pid"] = server_ ? server_->process_id : 0;
    j["tls"] = client_.is_tls();
    j["connected_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    return j;
}

void ClientSession::close_all() {
    client_.close();
    if (server_) server_->stream().close();
}

awaitable<void> ClientSession::send_to_client(const std::string& bytes) {
    error_code ec;
    Deadline deadline(co_await asio::this_coro::executor, kFarewellTimeout, [this] { client_.close(); });
    co_await client_.write(asio::buffer(bytes), ec);
}

awaitable<void> ClientSession::reject_client_violation(const std::string& reason, const std::string& detail) {
    log::warn("protocol_violation", {{"session", std::to_string(id_)}, {"address", peer_address_}, {"reason", reason}});
    metrics::proxy_metrics().protocol_errors.inc();
    co_await send_fatal("08P01", "pgwarden: protocol violation", detail);
}

awaitable<void> ClientSession::send_fatal(const std::string& sqlstate, const std::string& message,
                                          const std::string& detail) {
    std::string out;
    wire::append_error_response(out, wire::Diagnostic{"FATAL", sqlstate, message, detail, {}});
    co_await send_to_client(out);
}

awaitable<std::optional<wire::FrameHeader>> ClientSession::read_message(Stream& stream, Buffer& buffer,
                                                                       std::size_t max_length, bool& violation) {
    violation = false;
    for (;;) {
        wire::FrameHeader header;
        auto status = wire::read_frame(buffer.data(), header, max_length);
        if (status == wire::FrameStatus::kComplete) co_return header;
        if (status == wire::FrameStatus::kInvalid) {
            violation = true;
            co_return std::nullopt;
        }
        std::size_t want = status == wire::FrameStatus::kPartial ? header.total_size() - buffer.size() : 1;
        char* p = buffer.prepare(want);
        error_code ec;
        std::size_t n = co_await stream.read_some(asio::buffer(p, buffer.free_space()), ec);
        if (ec) co_return std::nullopt;
        buffer.commit(n);
    }
}

awaitable<void> ClientSession::run() {
    auto self = shared_from_this();
    const auto& limits = config_->proxy;
    auto& metrics = metrics::proxy_metrics();
    runtime_.client_connections.fetch_add(1, std::memory_order_relaxed);
    metrics.client_connections.inc();
    metrics.client_connections_accepted.inc();
    struct Uncount {
        Runtime& r;
        metrics::ProxyMetrics& m;
        ~Uncount() {
            r.client_connections.fetch_sub(1, std::memory_order_relaxed);
            m.client_connections.dec();
        }
    } uncount{runtime_, metrics};
    const std::string session = std::to_string(id_);

    if (runtime_.client_connections.load(std::memory_order_relaxed) > int(limits.max_client_connections)) {
        log::warn("connection_refused", {{"session", session}, {"address", peer_address_}, {"reason", "max_client_connections"}});
        co_await send_fatal("53300", "pgwarden: sorry, too many clients already");
        close_all();
        co_return;
    }
    if (runtime_.unauthenticated.fetch_add(1, std::memory_order_relaxed) >= int(limits.max_unauthenticated)) {
        runtime_.unauthenticated.fetch_sub(1, std::memory_order_relaxed);
        log::warn("connection_refused", {{"session", session}, {"address", peer_address_}, {"reason", "max_unauthenticated"}});
        co_await send_fatal("53300", "pgwarden: too many connections still authenticating");
        close_all();
        co_return;
    }
    counted_unauthenticated_ = true;
    log::debug("connection_accepted", {{"session", session}, {"address", peer_address_}});

    bool started;
    {
        // A client that never finishes logging in loses its connection: closing the
        // sockets fails whatever the startup was waiting for.
        Deadline deadline(co_await asio::this_coro::executor, limits.auth_timeout, [this] { close_all(); });
        started = co_await startup();
        if (deadline.expired()) {
            log::warn("auth_timeout", {{"session", session}, {"address", peer_address_}, {"state", to_string(state_)}});
            started = false;
        }
    }
    runtime_.unauthenticated.fetch_sub(1, std::memory_order_relaxed);
    counted_unauthenticated_ = false;
    if (!started) {
        close_all();
        co_return;
    }

    log::info("session_started", {{"session", session}, {"address", peer_address_}, {"user", user_},
                                  {"database", database_}, {"application_name", application_name_},
                                  {"server_pid", std::to_string(server_->process_id)},
                                  {"tls", client_.is_tls() ? "true" : "false"}});
    if (runtime_.shutting_down.load()) {
        co_await send_fatal("57P01", "pgwarden: terminating connection because pgwarden is shutting down");
        close_all();
        co_return;
    }
    interceptor_ = std::make_unique<Interceptor>(runtime_, id_, policy::ClientIdentity(startup_parameters_, peer_address_));
    for (const auto& [name, value] : reported_parameters_) interceptor_->on_parameter(name, value);
    reported_parameters_.clear();
    reported_parameters_.shrink_to_fit();
    startup_parameters_.clear();
    startup_parameters_.shrink_to_fit();
    runtime_.server_connections.fetch_add(1, std::memory_order_relaxed);
    metrics.server_connections.inc();
    runtime_.sessions().add(id_, self);
    End why = co_await relay();
    runtime_.sessions().remove(id_);
    runtime_.server_connections.fetch_sub(1, std::memory_order_relaxed);
    metrics.server_connections.dec();
    set_state(SessionState::kClosing);
    const char* reason = "client_closed";
    switch (why) {
        case End::kClientClosed: break;
        case End::kTerminated: reason = "terminate"; break;
        case End::kShutdown:
            reason = "shutdown";
            co_await send_fatal("57P01", "pgwarden: terminating connection because pgwarden is shutting down");
            break;
        case End::kServerClosed:
            reason = "server_closed";
            // A server that ends a session says why (FATAL); one that vanished did not.
            if (!server_said_goodbye_)
                co_await send_fatal("08006", "pgwarden: server closed the connection unexpectedly",
                                    "The PostgreSQL backend terminated abnormally or the network failed.");
            break;
        case End::kClientProtocolError:
            reason = "client_protocol_violation";
            metrics.protocol_errors.inc();
            co_await send_fatal("08P01", "pgwarden: protocol violation",
                                "The client sent a malformed or unexpected message.");
            break;
        case End::kServerProtocolError:
            reason = "server_protocol_violation";
            co_await send_fatal("08P01", "pgwarden: protocol violation from the server");
            break;
    }
    if (why == End::kClientClosed || why == End::kClientProtocolError || why == End::kShutdown) {
        // Tell the server we are leaving, so it does not log an unexpected EOF.
        std::string bye;
        wire::append_terminate(bye);
        error_code ec;
        Deadline deadline(co_await asio::this_coro::executor, kFarewellTimeout, [this] { server_->stream().close(); });
        co_await server_->stream().write(asio::buffer(bye), ec);
    }
    close_all();
    auto lifetime = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    log::info("session_ended", {{"session", session}, {"reason", reason}, {"seconds", std::to_string(lifetime)}});
}

awaitable<std::optional<wire::StartupPacket>> ClientSession::read_startup_packet() {
    std::array<char, 4> length_bytes{};
    error_code ec;
    co_await client_.read_exact(asio::buffer(length_bytes), ec);
    if (ec) co_return std::nullopt;
    const std::uint32_t length = std::uint32_t(wire::Reader(std::string_view(length_bytes.data(), 4)).int32());
    if (length < wire::kMinStartupPacketLength || length > wire::kMaxStartupPacketLength) {
        co_await reject_client_violation("invalid startup packet length", "invalid length of startup packet");
        co_return std::nullopt;
    }
    std::string packet(length, '\0');
    std::memcpy(packet.data(), length_bytes.data(), 4);
    co_await client_.read_exact(asio::buffer(packet.data() + 4, length - 4), ec);
    if (ec) co_return std::nullopt;
    auto parsed = wire::parse_startup_packet(packet);
    if (!parsed) {
        co_await reject_client_violation("malformed startup packet", "malformed startup packet");
    }
    co_return parsed;
}

awaitable<bool> ClientSession::startup() {
    bool negotiated_tls = false, negotiated_gss = false;
    std::optional<wire::StartupPacket> packet;
    for (;;) {
        packet = co_await read_startup_packet();
        if (!packet) co_return false;
        if (packet->kind == wire::StartupKind::kSslRequest) {
            if (negotiated_tls || client_.is_tls()) {
                co_await reject_client_violation("duplicate SSLRequest", "duplicate SSLRequest");
                co_return false;
            }
            negotiated_tls = true;
            auto* tls = runtime_.client_tls();
            char answer = tls ? 'S' : 'N';
            error_code ec;
            co_await client_.write(asio::buffer(&answer, 1), ec);
            if (ec) co_return false;
            if (tls) {
                // Bytes sent before the handshake finished would be a downgrade attack
                // (CVE-2021-23222 for libpq): the first read must be the TLS ClientHello.
                co_await client_.accept_tls(*tls, ec);
                if (ec) {
                    log::warn("tls_handshake_failed", {{"session", std::to_string(id_)}, {"address", peer_address_},
                                                       {"error", ec.message()}});
                    co_return false;
                }
            }
            continue;
        }
        if (packet->kind == wire::StartupKind::kGssEncRequest) {
            if (negotiated_gss) {
                co_await reject_client_violation("duplicate GSSENCRequest", "duplicate GSSENCRequest");
                co_return false;
            }
            negotiated_gss = true;
            char answer = 'N';
            error_code ec;
            co_await client_.write(asio::buffer(&answer, 1), ec);
            if (ec) co_return false;
            continue;
        }
        break;
    }
    if (packet->kind == wire::StartupKind::kCancelRequest) {
        co_await handle_cancel(*packet);
        co_return false;
    }
    if (packet->kind != wire::StartupKind::kStartup) {
        co_await send_fatal("0A000", "pgwarden: unsupported frontend protocol " +
                                         std::to_string(packet->protocol >> 16) + "." +
                                         std::to_string(packet->protocol & 0xffff),
                            "pgwarden supports protocol 3.0.");
        co_return false;
    }
    if (config_->tls.mode == policy::ClientTlsMode::kRequire && !client_.is_tls()) {
        log::warn("connection_refused", {{"session", std::to_string(id_)}, {"address", peer_address_},
                                         {"reason", "tls_required"}});
        co_await send_fatal("28000", "pgwarden: TLS is required", "Connect with sslmode=require or stronger.");
        co_return false;
    }
    user_ = std::string(packet->parameter("user"));
    database_ = std::string(packet->parameter("database"));
    if (database_.empty()) database_ = user_;
    application_name_ = std::string(packet->parameter("application_name"));
    startup_parameters_ = packet->parameters;
    if (user_.empty()) {
        co_await send_fatal("28000", "no PostgreSQL user name specified in startup packet");
        co_return false;
    }

    set_state(SessionState::kConnecting);
    server_ = std::make_unique<ServerConnection>(co_await asio::this_coro::executor);
    std::string error;
    const auto& up = config_->proxy.upstream;
    bool connected = co_await server_->connect(up, config_->upstream_tls.mode, runtime_.upstream_tls(),
                                               config_->upstream_tls.server_name, config_->proxy.connect_timeout,
                                               error);
    if (!connected) {
        log::error("upstream_connect_failed", {{"session", std::to_string(id_)}, {"upstream", up.to_string()},
                                                {"error", error}});
        metrics::proxy_metrics().upstream_connect_errors.inc();
        co_await send_fatal("08006", "pgwarden: cannot connect to upstream " + up.to_string(), error);
        co_return false;
    }
    std::string startup_message;
    wire::append_startup_message(startup_message, packet->parameters, packet->protocol);
    error_code ec;
    co_await server_->stream().write(asio::buffer(startup_message), ec);
    if (ec) {
        co_await send_fatal("08006", "pgwarden: cannot connect to upstream " + up.to_string(), ec.message());
        co_return false;
    }
    set_state(SessionState::kAuthenticating);
    co_return co_await authenticate();
}

awaitable<bool> ClientSession::authenticate() {
    Buffer& sbuf = server_->buffer();
    const std::string session = std::to_string(id_);
    for (;;) {
        bool violation = false;
        auto header = co_await read_message(server_->stream(), sbuf, config_->proxy.max_message_bytes, violation);
        if (!header) {
            co_await send_fatal(violation ? "08P01" : "08006",
                                violation ? "pgwarden: protocol violation from the server"
                                          : "pgwarden: server closed the connection during authentication");
            co_return false;
        }
        std::string_view message = sbuf.data().substr(0, header->total_size());
        std::string_view body = message.substr(wire::kHeaderSize);
        std::string rewritten;
        bool expect_reply = false;
        switch (header->type) {
            case wire::be::kAuthentication: {
                auto auth = wire::parse_authentication(body);
                if (!auth) {
                    co_await send_fatal("08P01", "pgwarden: protocol violation from the server");
                    co_return false;
                }
                expect_reply = auth_code_expects_reply(auth->code);
                if (auth->code == wire::auth::kSasl) {
                    // Channel binding ties SCRAM to the TLS session the client sees, which a
                    // TLS-terminating proxy cannot carry through: offer only the plain mechanisms.
                    auto mechanisms = wire::parse_sasl_mechanisms(auth->data);
                    if (!mechanisms) {
                        co_await send_fatal("08P01", "pgwarden: protocol violation from the server");
                        co_return false;
                    }
                    std::erase(*mechanisms, std::string_view("SCRAM-SHA-256-PLUS"));
                    wire::append_authentication_sasl(rewritten, *mechanisms);
                }
                break;
            }
            case wire::be::kBackendKeyData: {
                auto key = wire::parse_backend_key_data(body);
                if (!key) {
                    co_await send_fatal("08P01", "pgwarden: protocol violation from the server");
                    co_return false;
                }
                server_->process_id = key->process_id;
                server_->secret_key = key->secret_key;
                client_secret_ = runtime_.cancels().add(key->process_id, key->secret_key);
                wire::append_backend_key_data(rewritten, key->process_id, client_secret_);
                break;
            }
            case wire::be::kParameterStatus: {
                auto status = wire::parse_parameter_status(body);
                if (status && status->name == "application_name") application_name_ = std::string(status->value);
                // How the server will read statement text: the interceptor must know.
                if (status && (status->name == "standard_conforming_strings" || status->name == "client_encoding" ||
                               status->name == "server_encoding"))
                    reported_parameters_.emplace_back(status->name, status->value);
                break;
            }
            case wire::be::kErrorResponse:
            case wire::be::kNoticeResponse:
            case wire::be::kNegotiateProtocolVersion:
            case wire::be::kReadyForQuery:
                break;
            default:
                co_await send_fatal("08P01", "pgwarden: protocol violation from the server");
                co_return false;
        }
        error_code ec;
        if (rewritten.empty())
            co_await client_.write(asio::buffer(message.data(), message.size()), ec);
        else
            co_await client_.write(asio::buffer(rewritten), ec);
        char type = header->type;
        sbuf.consume(header->total_size());
        if (ec) co_return false;
        if (type == wire::be::kErrorResponse) {
            log::info("authentication_failed", {{"session", session}, {"address", peer_address_}, {"user", user_}});
            metrics::proxy_metrics().auth_failures.inc();
            co_return false;
        }
        if (type == wire::be::kReadyForQuery) {
            set_state(SessionState::kIdle);
            co_return true;
        }
        if (!expect_reply) continue;

        auto reply = co_await read_message(client_, client_buffer_, kMaxAuthMessageLength, violation);
        if (!reply || reply->type != wire::fe::kPassword) {
            if (violation || reply)
                co_await reject_client_violation("bad authentication response",
                                                 "expected an authentication response message");
            co_return false;
        }
        co_await server_->stream().write(asio::buffer(client_buffer_.data().data(), reply->total_size()), ec);
        client_buffer_.consume(reply->total_size());
        if (ec) {
            co_await send_fatal("08006", "pgwarden: server closed the connection during authentication");
            co_return false;
        }
    }
}

awaitable<void> ClientSession::handle_cancel(const wire::StartupPacket& packet) {
    auto target = runtime_.cancels().find(packet.process_id, packet.secret_key);
    const std::string pid = std::to_string(packet.process_id);
    if (!target) {
        // PostgreSQL says nothing to the sender either way; neither do we.
        log::warn("cancel_unknown_key", {{"address", peer_address_}, {"server_pid", pid}});
        metrics::proxy_metrics().cancel_requests.labels({"unknown_key"}).inc();
        co_return;
    }
    ServerConnection connection(co_await asio::this_coro::executor);
    std::string error;
    const auto& up = config_->proxy.upstream;
    auto mode = config_->upstream_tls.mode;
    if (mode == policy::UpstreamTlsMode::kPrefer) mode = policy::UpstreamTlsMode::kDisable;
    if (!co_await connection.connect(up, mode, runtime_.upstream_tls(), config_->upstream_tls.server_name,
                                     config_->proxy.connect_timeout, error)) {
        log::error("cancel_failed", {{"server_pid", pid}, {"error", error}});
        metrics::proxy_metrics().cancel_requests.labels({"upstream_error"}).inc();
        co_return;
    }
    std::string request;
    wire::append_cancel_request(request, target->process_id, target->server_secret);
    error_code ec;
    co_await connection.stream().write(asio::buffer(request), ec);
    // The server closes the connection when done; wait for that so the cancel has been
    // delivered before the client's own connection goes away.
    char byte;
    Deadline deadline(co_await asio::this_coro::executor, kFarewellTimeout, [&connection] { connection.stream().close(); });
    if (!ec) co_await connection.stream().read_some(asio::buffer(&byte, 1), ec);
    connection.stream().close();
    log::info("cancel_forwarded", {{"address", peer_address_}, {"server_pid", pid}});
    metrics::proxy_metrics().cancel_requests.labels({"forwarded"}).inc();
}

awaitable<ClientSession::End> ClientSession::relay() {
    // Both directions run at once; the first to end cancels the other's pending I/O,
    // and the session goes on only when both have returned.
    auto executor = co_await asio::this_coro::executor;
    auto self = shared_from_this();
    client_.use_ring(Ring::current());
    server_->stream().use_ring(Ring::current());
    struct Join {
        explicit Join(const asio::any_io_executor& ex) : done(ex) { done.expires_at(asio::steady_timer::time_point::max()); }
        asio::steady_timer done;
        int running = 2;
        std::optional<End> first;
    };
    auto join = std::make_shared<Join>(executor);
    auto finish = [this, join](End why) {
        if (!join->first) {
            join->first = why;
            relay_stopping_ = true;
            // cancel() only reaches an operation that is pending right now; the other
            // direction may be between operations (writing, or about to wait again).
            // Shutting down the receive side makes every later read or wait finish at
            // once, so that direction cannot block on a peer that will never speak.
            // Writes still work: the farewell messages go out after this.
            error_code ignored;
            client_.socket().shutdown(tcp::socket::shutdown_receive, ignored);
            server_->stream().socket().shutdown(tcp::socket::shutdown_receive, ignored);
            client_.cancel();
            server_->stream().cancel();
            if (server_answered_) server_answered_->cancel();
        }
        if (--join->running == 0) join->done.cancel();
    };
    asio::co_spawn(executor, [self, finish]() -> awaitable<void> { finish(co_await self->relay_client_to_server()); },
                   asio::detached);
    asio::co_spawn(executor, [self, finish]() -> awaitable<void> { finish(co_await self->relay_server_to_client()); },
                   asio::detached);
    error_code ec;
    while (join->running > 0) co_await join->done.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    co_return *join->first;
}

awaitable<ClientSession::End> ClientSession::relay_client_to_server() {
    Stream& server = server_->stream();
    std::vector<asio::const_buffer> out;
    std::deque<std::string> scratch;  // replacement messages; stable addresses for `out`
    std::size_t streaming = 0;        // bytes of a CopyData still to forward as they arrive
    bool burst = false;               // the last read filled its room: more is coming
    const std::size_t max_length = config_->proxy.max_message_bytes;
    Interceptor& interceptor = *interceptor_;
    metrics::Counter& bytes_up = metrics::proxy_metrics().bytes_in(metrics::ByteDirection::kClientToServer);
    error_code ec;

    // Sends what has been decided so far: first what pgwarden answers itself (nothing
    // in flight comes before it), then the messages for the server.
    auto flush = [&]() -> awaitable<bool> {
        if (interceptor.has_immediate_output()) {
            std::string bytes = interceptor.take_immediate_output();
            co_await write_client(asio::buffer(bytes), ec);
            if (ec) co_return false;
            arm_idle_timer();
        }
        if (!out.empty()) {
            bytes_up.inc(double(asio::buffer_size(out)));
            if (!server_write_.try_lock()) co_await server_write_.lock();
            co_await server.write(out, ec);
            server_write_.unlock();
            out.clear();
            if (ec) co_return false;
        }
        scratch.clear();
        co_return true;
    };

    for (;;) {
        if (relay_stopping_) co_return End::kClientClosed;  // the other direction ended
        std::size_t want = 1;
        wire::FrameHeader pending;
        if (streaming == 0 &&
            wire::read_frame(client_buffer_.data(), pending, max_length) == wire::FrameStatus::kPartial)
            want = pending.total_size() - client_buffer_.size();
        asio::mutable_buffer room;
        std::size_t n = 0;
        if (!read_without_waiting(client_, client_buffer_, want, burst, room, n, ec)) {
            n = co_await client_.wait_read(room, ec);
            if (!ec) client_.note_read(n, room.size());
        }
        if (relay_stopping_) co_return End::kClientClosed;
        if (ec) co_return shutting_down_ && ec == asio::error::operation_aborted ? End::kShutdown : End::kClientClosed;
        client_buffer_.commit(n);
        burst = read_on(client_, client_buffer_, n, room.size());
        note_client_activity();

        std::string_view data = client_buffer_.data();
        std::size_t consumed = 0;
        bool terminate = false;
        while (consumed < data.size()) {
            std::string_view rest = data.substr(consumed);
            if (streaming > 0) {
                std::size_t k = std::min(streaming, rest.size());
                append_bytes(out, rest.data(), k);
                consumed += k;
                streaming -= k;
                continue;
            }
            wire::FrameHeader header;
            auto status = wire::read_frame(rest, header, max_length);
            if (status == wire::FrameStatus::kNeedHeader) break;
            if (status == wire::FrameStatus::kInvalid || !wire::is_frontend_type(header.type)) {
                log::warn("protocol_violation", {{"session", std::to_string(id_)}, {"address", peer_address_},
                                                 {"reason", "bad message header from client"}});
                co_return End::kClientProtocolError;
            }
            if (status == wire::FrameStatus::kPartial) {
                if (header.type != wire::fe::kCopyData) break;  // wait for the whole message
                interceptor.on_copy_data();
                append_bytes(out, rest.data(), rest.size());
                streaming = header.total_size() - rest.size();
                consumed = data.size();
                break;
            }
            std::string_view message = rest.substr(0, header.total_size());
            if (header.type == wire::fe::kTerminate) {
                terminate = true;
                append_bytes(out, message.data(), message.size());
                consumed += message.size();
                break;
            }
            if ((header.type == wire::fe::kParse || header.type == wire::fe::kBind ||
                 header.type == wire::fe::kExecute || header.type == wire::fe::kQuery) &&
                interceptor.must_wait_for_server(header.type, message)) {
                // What came before goes now; this message is decided once the server has
                // said how the earlier definition of its statement name turned out.
                if (!co_await flush()) co_return ec == asio::error::operation_aborted ? End::kClientClosed : End::kServerClosed;
                if (!co_await wait_for_server(header.type, message)) co_return End::kClientClosed;
                data = client_buffer_.data();
                rest = data.substr(consumed);
                message = rest.substr(0, header.total_size());
            }
            auto step = interceptor.on_client_message(header.type, message);
            if (step.delay_until) {
                // Held back without blocking the thread: earlier messages go now, this one
                // and everything after it wait.
                if (!co_await flush()) co_return ec == asio::error::operation_aborted ? End::kClientClosed : End::kServerClosed;
                if (!co_await wait_for_throttle(*step.delay_until)) co_return End::kClientClosed;
                interceptor.delay_done();
                data = client_buffer_.data();
                rest = data.substr(consumed);
                message = rest.substr(0, header.total_size());
            }
            switch (step.action) {
                case Interceptor::ClientStep::Action::kForward:
                    append_bytes(out, message.data(), message.size());
                    break;
                case Interceptor::ClientStep::Action::kReplace:
                    scratch.push_back(std::move(step.replacement));
                    append_bytes(out, scratch.back().data(), scratch.back().size());
                    break;
                case Interceptor::ClientStep::Action::kDrop:
                    break;
            }
            consumed += message.size();
        }
        if (!interceptor.has_immediate_output() && !out.empty() && server_write_.try_lock()) {
            // The usual end of a batch, without flush()'s coroutine frames: nothing of
            // pgwarden's own goes first, and the server's socket mostly takes it all now.
            bytes_up.inc(double(asio::buffer_size(out)));
            std::size_t sent = 0;
            if (!server.try_write(out, sent, ec)) co_await server.write_rest(out, sent, ec);
            server_write_.unlock();
            out.clear();
            scratch.clear();
            if (ec) co_return End::kServerClosed;
        } else if (!co_await flush()) {
            co_return End::kServerClosed;
        }
        client_buffer_.consume(consumed);
        if (terminate) co_return End::kTerminated;
    }
}

awaitable<ClientSession::End> ClientSession::relay_server_to_client() {
    Stream& server = server_->stream();
    Buffer& sbuf = server_->buffer();
    std::vector<asio::const_buffer> out;
    std::deque<std::string> scratch;
    std::size_t streaming = 0;
    bool burst = false;  // the last read filled its room: more is coming
    Interceptor& interceptor = *interceptor_;
    metrics::Counter& bytes_down = metrics::proxy_metrics().bytes_in(metrics::ByteDirection::kServerToClient);
    // Server messages are only bound by PostgreSQL's own limit: a huge DataRow is
    // streamed through, never buffered whole.
    for (;;) {
        if (relay_stopping_) co_return End::kServerClosed;  // the other direction ended
        error_code ec;
        std::size_t want = 1;
        wire::FrameHeader pending;
        if (streaming == 0 && wire::read_frame(sbuf.data(), pending) == wire::FrameStatus::kPartial &&
            server_message_needs_body(pending.type))
            want = pending.total_size() - sbuf.size();
        asio::mutable_buffer room;
        std::size_t n = 0;
        if (!read_without_waiting(server, sbuf, want, burst, room, n, ec)) {
            n = co_await server.wait_read(room, ec);
            if (!ec) server.note_read(n, room.size());
        }
        if (ec || relay_stopping_) co_return End::kServerClosed;
        sbuf.commit(n);
        burst = read_on(server, sbuf, n, room.size());

        std::string_view data = sbuf.data();
        std::size_t consumed = 0;
        while (consumed < data.size()) {
            std::string_view rest = data.substr(consumed);
            if (streaming > 0) {
                std::size_t k = std::min(streaming, rest.size());
                append_bytes(out, rest.data(), k);
                consumed += k;
                streaming -= k;
                continue;
            }
            wire::FrameHeader header;
            auto status = wire::read_frame(rest, header);
            if (status == wire::FrameStatus::kNeedHeader) break;
            if (status == wire::FrameStatus::kInvalid || !wire::is_backend_type(header.type)) {
                log::error("protocol_violation", {{"session", std::to_string(id_)}, {"reason", "bad message header from server"}});
                co_return End::kServerProtocolError;
            }
            if (status == wire::FrameStatus::kPartial && server_message_needs_body(header.type)) break;
            if (header.type == wire::be::kErrorResponse) {
                auto fields = wire::parse_error_fields(rest.substr(wire::kHeaderSize, header.body_size()));
                if (fields && (fields->severity() == "FATAL" || fields->severity() == "PANIC"))
                    server_said_goodbye_ = true;
            }
            // Initialised, not assigned: no move of the step's two strings per message.
            const bool observed = Interceptor::observes(header.type);
            Interceptor::ResponseStep step =
                observed ? interceptor.on_server_message(header.type, rest.substr(0, header.total_size()))
                         : Interceptor::ResponseStep{};
            if (!observed && interceptor.swallowing()) step.action = Interceptor::ResponseStep::Action::kDrop;
            if (header.type == wire::be::kReadyForQuery) {
                auto tx = interceptor.tx_state();
                set_state(interceptor.transaction().rolled_back_for_idle() || tx == policy::TxState::kFailed
                              ? SessionState::kFailedTransaction
                          : tx == policy::TxState::kInBlock ? SessionState::kInTransaction
                                                            : SessionState::kIdle);
            }
            if (status == wire::FrameStatus::kPartial) {
                // Only types whose body nobody reads get here: stream them through.
                append_bytes(out, rest.data(), rest.size());
                streaming = header.total_size() - rest.size();
                consumed = data.size();
                if (!step.emit_after.empty()) {
                    // Cannot happen for streamed types; keep the bytes rather than lose them.
                    scratch.push_back(std::move(step.emit_after));
                }
                break;
            }
            switch (step.action) {
                case Interceptor::ResponseStep::Action::kRelay:
                    append_bytes(out, rest.data(), header.total_size());
                    break;
                case Interceptor::ResponseStep::Action::kReplace:
                    scratch.push_back(std::move(step.replacement));
                    append_bytes(out, scratch.back().data(), scratch.back().size());
                    break;
                case Interceptor::ResponseStep::Action::kDrop:
                    break;
            }
            if (!step.emit_after.empty()) {
                scratch.push_back(std::move(step.emit_after));
                append_bytes(out, scratch.back().data(), scratch.back().size());
            }
            consumed += header.total_size();
        }
        if (!out.empty()) {
            bytes_down.inc(double(asio::buffer_size(out)));
            std::size_t sent = 0;
            if (client_write_.try_lock()) {
                if (!client_.try_write(out, sent, ec)) co_await client_.write_rest(out, sent, ec);
                client_write_.unlock();
            } else {
                co_await write_client(out, ec);
            }
            out.clear();
            scratch.clear();
            if (ec) co_return End::kClientClosed;
            arm_idle_timer();
            end_if_quiet_for_shutdown();
        }
        // After the write: a held client message may now produce output of its own.
        if (server_answered_) server_answered_->cancel();
        sbuf.consume(consumed);
    }
}

void start_session(Runtime& runtime, tcp::socket socket) {
    auto executor = socket.get_executor();
    auto session = std::make_shared<ClientSession>(runtime, std::move(socket));
    asio::co_spawn(executor, [session]() -> awaitable<void> { co_await session->run(); },
                   [](std::exception_ptr e) {
                       if (!e) return;
                       try {
                           std::rethrow_exception(e);
                       } catch (const std::exception& ex) {
                           log::error("session_crashed", {{"error", ex.what()}});
                       }
                   });
}

}  // namespace pgwarden::proxy
