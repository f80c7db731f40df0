// The admin HTTP/1.1 server: one coroutine accepts, one coroutine per connection reads a
// request, has admin_routes.cpp answer it and writes the answer, until the client closes,
// stops keeping alive, goes quiet for the I/O timeout, or the server stops.
#include "proxy/admin_http.hpp"

#include <array>
#include <map>
#include <mutex>
#include <optional>
#include <system_error>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace pgwarden::proxy {

namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;
using Request = AdminRequest;
using Response = AdminResponse;

namespace {

// After an error answer the client may still be sending a body we will not read; reading
// and dropping it for a moment before closing keeps the kernel from answering it with a
// reset that could destroy our answer before the client reads it.
constexpr std::chrono::seconds kLingerTime{1};
constexpr std::size_t kLingerBytes = 1 << 20;
// Pause before accepting again after an accept error (typically out of descriptors).
constexpr std::chrono::milliseconds kAcceptRetryDelay{100};

}  // namespace

// Everything the coroutines share. They hold it by shared_ptr, so it outlives the
// AdminServer object while connections wind down.
struct AdminServer::State {
    State(asio::io_context& io_context, const policy::AdminConfig& admin_config,
          AdminHandlers admin_handlers, AdminLimits admin_limits)
        : io(io_context),
          config(admin_config),
          handlers(std::move(admin_handlers)),
          limits(admin_limits),
          strand(asio::make_strand(io_context)),
          acceptor(strand),
          slot_freed(strand),
          token(admin_config.token) {}

    struct Connection {
        explicit Connection(tcp::socket socket) : stream(std::move(socket)) {}
        beast::tcp_stream stream;  // on the connection's own strand
    };

    asio::io_context& io;
    const policy::AdminConfig config;
    const AdminHandlers handlers;
    const AdminLimits limits;

    // The acceptor, the connection table and the flags below are used on `strand` only.
    asio::strand<asio::io_context::executor_type> strand;
    tcp::acceptor acceptor;
    asio::steady_timer slot_freed;  // cancelled to wake the accept loop
    std::map<std::uint64_t, std::weak_ptr<Connection>> connections;
    std::uint64_t next_connection_id = 0;
    bool started = false;
    bool stopping = false;

    tcp::endpoint bound;  // written by start() before anything runs

    mutable std::mutex token_mutex;
    std::string token;

    std::string current_token() const {
        std::lock_guard lock(token_mutex);
        return token;
    }

    Response handle(const Request& request) const {
        return handle_admin_request(handlers, current_token(), request);
    }
};

namespace {

awaitable<void> close_connection(beast::tcp_stream& stream, bool drain_input) {
    error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_send, ec);
    if (drain_input && !ec) {
        stream.expires_after(kLingerTime);
        std::array<char, 4096> sink{};
        for (std::size_t drained = 0; drained < kLingerBytes;) {
            const std::size_t n = co_await stream.async_read_some(
                asio::buffer(sink), asio::redirect_error(asio::use_awaitable, ec));
            if (ec) break;
            drained += n;
        }
    }
    stream.close();
}

awaitable<void> serve_connection(std::shared_ptr<AdminServer::State> state,
                                 std::shared_ptr<AdminServer::State::Connection> connection) {
    beast::tcp_stream& stream = connection->stream;
    const AdminLimits& limits = state->limits;
    // Bounded so that pipelined or oversized input cannot grow it past one request.
    beast::flat_buffer buffer(limits.max_header_bytes + limits.max_body_bytes + 4096);
    for (;;) {
        AdminRequestParser parser;
        limit_admin_parser(parser, limits);
        error_code ec;
        stream.expires_after(limits.io_timeout);
        co_await http::async_read(stream, buffer, parser,
                                  asio::redirect_error(asio::use_awaitable, ec));
        if (ec) {
            std::optional<Response> response = admin_read_error_response(ec);
            if (!response) {
                if (ec == http::error::end_of_stream) {
                    co_await close_connection(stream, false);
                } else {
                    // A timed-out or broken connection is closed here, not whenever the
                    // last reference to it goes away.
                    error_code ignored;
                    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
                    stream.socket().close(ignored);
                }
                co_return;
            }
            stream.expires_after(limits.io_timeout);
            co_await http::async_write(stream, *response,
                                       asio::redirect_error(asio::use_awaitable, ec));
            if (!ec) co_await close_connection(stream, true);
            co_return;
        }

        Response response = state->handle(parser.get());
        stream.expires_after(limits.io_timeout);
        co_await http::async_write(stream, response, asio::redirect_error(asio::use_awaitable, ec));
        if (ec) co_return;
        if (!response.keep_alive()) {
            co_await close_connection(stream, false);
            co_return;
        }
    }
}

void connection_finished(const std::shared_ptr<AdminServer::State>& state, std::uint64_t id) {
    state->connections.erase(id);
    state->slot_freed.cancel();
}

awaitable<void> accept_connections(std::shared_ptr<AdminServer::State> state) {
    for (;;) {
        while (!state->stopping && state->connections.size() >= state->limits.max_connections) {
            // Waits for connection_finished to cancel the timer; the deadline never comes.
            state->slot_freed.expires_at(asio::steady_timer::time_point::max());
            error_code ignored;
            co_await state->slot_freed.async_wait(
                asio::redirect_error(asio::use_awaitable, ignored));
        }
        if (state->stopping) co_return;

        error_code ec;
        // Each connection gets its own strand, so slow handlers on one do not hold up the
        // others when several threads run the io_context.
        const asio::any_io_executor connection_executor = asio::make_strand(state->io);
        tcp::socket socket = co_await state->acceptor.async_accept(
            connection_executor, asio::redirect_error(asio::use_awaitable, ec));
        if (state->stopping) co_return;
        if (ec) {
            if (ec == asio::error::operation_aborted) co_return;
            asio::steady_timer pause(state->strand, kAcceptRetryDelay);
            co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
            continue;
        }

        auto connection = std::make_shared<AdminServer::State::Connection>(std::move(socket));
        const std::uint64_t id = state->next_connection_id++;
        state->connections.emplace(id, connection);
        asio::co_spawn(connection->stream.get_executor(), serve_connection(state, connection),
                       [state, id](const std::exception_ptr&) {
                           asio::post(state->strand,
                                      [state, id] { connection_finished(state, id); });
                       });
    }
}

tcp::endpoint resolve_listen(asio::io_context& io, const policy::Endpoint& listen) {
    error_code ec;
    const auto address = asio::ip::make_address(listen.host, ec);
    if (!ec) return {address, listen.port};
    tcp::resolver resolver(io);
    const auto results =
        resolver.resolve(listen.host, std::to_string(listen.port), tcp::resolver::passive, ec);
    if (ec) throw std::system_error(ec, "admin listen address " + listen.to_string());
    if (results.empty()) {
        throw std::system_error(std::make_error_code(std::errc::address_not_available),
                                "admin listen address " + listen.to_string());
    }
    return results.begin()->endpoint();
}

}  // namespace

AdminServer::AdminServer(asio::io_context& io, const policy::AdminConfig& config,
                         AdminHandlers handlers, AdminLimits limits)
    : state_(std::make_shared<State>(io, config, std::move(handlers), limits)) {}

AdminServer::~AdminServer() { stop(); }

void AdminServer::start() {
    State& state = *state_;
    if (!state.config.enabled || state.started) return;
    const tcp::endpoint endpoint = resolve_listen(state.io, state.config.listen);
    const std::string where = "admin listener on " + state.config.listen.to_string();
    error_code ec;
    state.acceptor.open(endpoint.protocol(), ec);
    if (!ec) state.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) state.acceptor.bind(endpoint, ec);
    if (!ec) state.acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (!ec) state.bound = state.acceptor.local_endpoint(ec);
    if (ec) {
        error_code ignored;
        state.acceptor.close(ignored);
        throw std::system_error(ec, where);
    }
    state.started = true;
    asio::co_spawn(state.strand, accept_connections(state_), asio::detached);
}

void AdminServer::stop() {
    asio::dispatch(state_->strand, [state = state_] {
        if (state->stopping) return;
        state->stopping = true;
        error_code ignored;
        state->acceptor.close(ignored);
        state->slot_freed.cancel();
        for (const auto& [id, weak] : state->connections) {
            if (auto connection = weak.lock()) {
                asio::dispatch(connection->stream.get_executor(),
                               [connection] { connection->stream.close(); });
            }
        }
    });
}

tcp::endpoint AdminServer::local_endpoint() const { return state_->bound; }

void AdminServer::set_token(std::string token) {
    std::lock_guard lock(state_->token_mutex);
    state_->token = std::move(token);
}

}  // namespace pgwarden::proxy
