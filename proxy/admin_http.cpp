// The admin HTTP/1.1 server: one coroutine accepts, one coroutine per connection reads a
// request, routes it to AdminHandlers and writes the answer, until the client closes,
// stops keeping alive, goes quiet for the I/O timeout, or the server stops.
#include "proxy/admin_http.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <array>
#include <charconv>
#include <map>
#include <mutex>
#include <string_view>
#include <system_error>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace pgwarden::proxy {

namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

namespace {

constexpr std::string_view kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";
constexpr std::string_view kTextContentType = "text/plain; charset=utf-8";
constexpr std::string_view kJsonContentType = "application/json";
// After an error answer the client may still be sending a body we will not read; reading
// and dropping it for a moment before closing keeps the kernel from answering it with a
// reset that could destroy our answer before the client reads it.
constexpr std::chrono::seconds kLingerTime{1};
constexpr std::size_t kLingerBytes = 1 << 20;
// Pause before accepting again after an accept error (typically out of descriptors).
constexpr std::chrono::milliseconds kAcceptRetryDelay{100};

std::string dump(const nlohmann::json& value) {
    // Replace, not throw, on invalid UTF-8: application names come from clients.
    return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Response make_response(const Request& request, http::status status, std::string_view type,
                       std::string body) {
    Response response{status, request.version()};
    response.set(http::field::server, "pgwarden");
    response.set(http::field::content_type, beast::string_view(type.data(), type.size()));
    response.set(http::field::cache_control, "no-store");
    response.keep_alive(request.keep_alive());
    response.body() = std::move(body);
    response.prepare_payload();
    return response;
}

Response json_response(const Request& request, http::status status, const nlohmann::json& body) {
    return make_response(request, status, kJsonContentType, dump(body) + "\n");
}

Response json_error(const Request& request, http::status status, std::string_view message) {
    return json_response(request, status, nlohmann::json{{"error", message}});
}

Response method_not_allowed(const Request& request, std::string_view allowed) {
    Response response = json_error(request, http::status::method_not_allowed,
                                   "method not allowed; use " + std::string(allowed));
    response.set(http::field::allow, beast::string_view(allowed.data(), allowed.size()));
    return response;
}

// Compares digests rather than the strings so the time taken says nothing about the
// token, not even its length.
bool same_secret(std::string_view given, std::string_view expected) {
    std::array<unsigned char, EVP_MAX_MD_SIZE> a{}, b{};
    unsigned int a_size = 0, b_size = 0;
    if (EVP_Digest(given.data(), given.size(), a.data(), &a_size, EVP_sha256(), nullptr) != 1 ||
        EVP_Digest(expected.data(), expected.size(), b.data(), &b_size, EVP_sha256(), nullptr) !=
            1) {
        return false;
    }
    return a_size == b_size && CRYPTO_memcmp(a.data(), b.data(), a_size) == 0;
}

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c; };
        if (lower(a[i]) != lower(b[i])) return false;
    }
    return true;
}

std::string_view trim(std::string_view text) {
    while (!text.empty() && (text.front() == ' ' || text.front() == '\t'))
        text.remove_prefix(1);
    while (!text.empty() && (text.back() == ' ' || text.back() == '\t'))
        text.remove_suffix(1);
    return text;
}

// The token of an "Authorization: Bearer <token>" header (scheme case-insensitive, as
// RFC 7235 has it); empty when absent or another scheme.
std::string_view bearer_token(const Request& request) {
    const auto it = request.find(http::field::authorization);
    if (it == request.end()) return {};
    const std::string_view value = trim({it->value().data(), it->value().size()});
    constexpr std::string_view kScheme = "Bearer";
    if (value.size() <= kScheme.size() || !iequals(value.substr(0, kScheme.size()), kScheme) ||
        (value[kScheme.size()] != ' ' && value[kScheme.size()] != '\t')) {
        return {};
    }
    return trim(value.substr(kScheme.size()));
}

std::optional<std::uint64_t> parse_id(std::string_view text) {
    std::uint64_t id = 0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), id);
    if (text.empty() || result.ec != std::errc() || result.ptr != text.data() + text.size()) {
        return std::nullopt;
    }
    return id;
}

// The reason in a doom request's optional body, or why the body is unusable.
struct DoomReason {
    std::string reason;
    std::string error;
};

DoomReason doom_reason(const std::string& body) {
    if (trim(body).empty()) return {kDefaultDoomReason, {}};
    const nlohmann::json parsed = nlohmann::json::parse(body, nullptr, false);
    if (parsed.is_discarded()) return {{}, "body is not valid JSON"};
    if (!parsed.is_object()) return {{}, R"(body must be a JSON object like {"reason": "..."})"};
    const auto it = parsed.find("reason");
    if (it == parsed.end()) return {kDefaultDoomReason, {}};
    if (!it->is_string()) return {{}, "reason must be a string"};
    std::string reason = it->get<std::string>();
    if (reason.empty()) reason = kDefaultDoomReason;
    return {std::move(reason), {}};
}

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

    Response handle(const Request& request) const;
    Response route(const Request& request) const;
    Response route_api(const Request& request, std::string_view path) const;
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

// An answer to a request that could not be read as one; nullopt when there is nobody
// left to answer (closed, reset, timed out).
std::optional<http::status> status_for_read_error(const error_code& ec) {
    if (ec == http::error::header_limit) return http::status::request_header_fields_too_large;
    if (ec == http::error::body_limit || ec == http::error::buffer_overflow) {
        return http::status::payload_too_large;
    }
    if (ec == http::error::end_of_stream || ec == http::error::partial_message) {
        return std::nullopt;
    }
    if (ec.category() == http::make_error_code(http::error::bad_method).category()) {
        return http::status::bad_request;
    }
    return std::nullopt;
}

awaitable<void> serve_connection(std::shared_ptr<AdminServer::State> state,
                                 std::shared_ptr<AdminServer::State::Connection> connection) {
    beast::tcp_stream& stream = connection->stream;
    const AdminLimits& limits = state->limits;
    // Bounded so that pipelined or oversized input cannot grow it past one request.
    beast::flat_buffer buffer(limits.max_header_bytes + limits.max_body_bytes + 4096);
    for (;;) {
        http::request_parser<http::string_body> parser;
        parser.header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
        parser.body_limit(limits.max_body_bytes);
        error_code ec;
        stream.expires_after(limits.io_timeout);
        co_await http::async_read(stream, buffer, parser,
                                  asio::redirect_error(asio::use_awaitable, ec));
        if (ec) {
            const auto status = status_for_read_error(ec);
            if (!status) {
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
            Request failed;
            failed.version(11);
            failed.keep_alive(false);
            const char* message = *status == http::status::request_header_fields_too_large
                                      ? "request header too large"
                                  : *status == http::status::payload_too_large
                                      ? "request body too large"
                                      : "malformed HTTP request";
            Response response = json_error(failed, *status, message);
            stream.expires_after(limits.io_timeout);
            co_await http::async_write(stream, response,
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

Response AdminServer::State::handle(const Request& request) const {
    try {
        return route(request);
    } catch (const std::exception& error) {
        return json_error(request, http::status::internal_server_error, error.what());
    }
}

Response AdminServer::State::route(const Request& request) const {
    const std::string_view target(request.target().data(), request.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    const bool get = request.method() == http::verb::get;

    if (path == "/metrics") {
        if (!get) return method_not_allowed(request, "GET");
        if (!handlers.metrics)
            return json_error(request, http::status::not_implemented, "no metrics");
        return make_response(request, http::status::ok, kMetricsContentType, handlers.metrics());
    }
    if (path == "/healthz") {
        if (!get) return method_not_allowed(request, "GET");
        return make_response(request, http::status::ok, kTextContentType, "ok\n");
    }
    if (path == "/readyz") {
        if (!get) return method_not_allowed(request, "GET");
        const bool ready = handlers.ready ? handlers.ready() : true;
        return ready ? make_response(request, http::status::ok, kTextContentType, "ready\n")
                     : make_response(request, http::status::service_unavailable, kTextContentType,
                                     "upstream unreachable\n");
    }
    if (path == "/api" || path.starts_with("/api/")) {
        // Checked before routing so that without the token nothing about /api is revealed.
        const std::string expected = current_token();
        if (!expected.empty() && !same_secret(bearer_token(request), expected)) {
            Response response =
                json_error(request, http::status::unauthorized, "missing or wrong bearer token");
            response.set(http::field::www_authenticate, R"(Bearer realm="pgwarden")");
            return response;
        }
        return route_api(request, path);
    }
    return json_error(request, http::status::not_found, "not found");
}

Response AdminServer::State::route_api(const Request& request, std::string_view path) const {
    const bool get = request.method() == http::verb::get;
    const bool post = request.method() == http::verb::post;
    auto unavailable = [&] {
        return json_error(request, http::status::not_implemented, "not available");
    };

    if (path == "/api/clients") {
        if (!get) return method_not_allowed(request, "GET");
        if (!handlers.clients) return unavailable();
        return json_response(request, http::status::ok, handlers.clients());
    }
    if (path == "/api/throttles") {
        if (!get) return method_not_allowed(request, "GET");
        if (!handlers.throttles) return unavailable();
        return json_response(request, http::status::ok, handlers.throttles());
    }
    if (path == "/api/reload") {
        if (!post) return method_not_allowed(request, "POST");
        if (!handlers.reload) return unavailable();
        const auto [ok, message] = handlers.reload();
        return json_response(request, ok ? http::status::ok : http::status::internal_server_error,
                             nlohmann::json{{"ok", ok}, {"message", message}});
    }
    constexpr std::string_view kClientsPrefix = "/api/clients/";
    constexpr std::string_view kDoomSuffix = "/doom";
    if (path.starts_with(kClientsPrefix) && path.ends_with(kDoomSuffix) &&
        path.size() >= kClientsPrefix.size() + kDoomSuffix.size()) {
        const std::string_view id_text = path.substr(
            kClientsPrefix.size(), path.size() - kClientsPrefix.size() - kDoomSuffix.size());
        if (id_text.find('/') == std::string_view::npos) {
            if (!post) return method_not_allowed(request, "POST");
            const auto id = parse_id(id_text);
            if (!id) {
                return json_error(request, http::status::bad_request,
                                  "client id must be a decimal number");
            }
            const DoomReason reason = doom_reason(request.body());
            if (!reason.error.empty()) {
                return json_error(request, http::status::bad_request, reason.error);
            }
            if (!handlers.doom) return unavailable();
            if (const auto error = handlers.doom(*id, reason.reason)) {
                return json_error(request, http::status::not_found, *error);
            }
            return json_response(
                request, http::status::ok,
                nlohmann::json{{"ok", true}, {"id", *id}, {"reason", reason.reason}});
        }
    }
    return json_error(request, http::status::not_found, "not found");
}

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
