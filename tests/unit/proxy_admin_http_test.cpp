// The admin HTTP server over real sockets on 127.0.0.1: routes, the bearer token, error
// statuses, request limits, keep-alive, timeouts, the connection cap and stopping.
#include "proxy/asio.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "proxy/admin_http.hpp"

using namespace pgwarden;
using namespace std::chrono_literals;
using proxy::tcp;
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;
using Response = http::response<http::string_body>;

namespace {

constexpr auto kWait = 5s;  // upper bound for anything the server should do promptly
constexpr const char* kMetricsPage = "# HELP t_total t\n# TYPE t_total counter\nt_total 1\n";

// Handlers that answer from fixed data and record how they were called.
struct FakeBackend {
    std::atomic<bool> ready{true};
    std::atomic<bool> reload_ok{true};
    std::atomic<int> metrics_calls{0};
    std::mutex mutex;
    std::optional<std::uint64_t> doomed_id;
    std::string doomed_reason;

    proxy::AdminHandlers handlers() {
        proxy::AdminHandlers h;
        h.metrics = [this] {
            ++metrics_calls;
            return std::string(kMetricsPage);
        };
        h.ready = [this] { return ready.load(); };
        h.clients = [] {
            return nlohmann::json::array({{{"id", 7}, {"client", "app"}, {"state", "idle"}}});
        };
        h.doom = [this](std::uint64_t id, const std::string& reason) -> std::optional<std::string> {
            if (id != 7) return "no client with id " + std::to_string(id);
            std::lock_guard lock(mutex);
            doomed_id = id;
            doomed_reason = reason;
            return std::nullopt;
        };
        h.reload = [this] {
            return reload_ok ? std::pair<bool, std::string>{true, "reloaded"}
                             : std::pair<bool, std::string>{false, "line 3: bad value"};
        };
        h.throttles = [] { return nlohmann::json{{"rules", {{{"name", "w"}, {"level", 2.5}}}}}; };
        return h;
    }
};

// An AdminServer on 127.0.0.1:0, served by one background thread.
struct ServerFixture {
    explicit ServerFixture(std::string token = "", proxy::AdminLimits limits = {},
                           proxy::AdminHandlers handlers = {}, int threads = 1)
        : guard(asio::make_work_guard(io)),
          server(io, config_for(std::move(token)),
                 handlers.metrics ? std::move(handlers) : backend.handlers(), limits),
          running(threads) {
        server.start();
        for (int i = 0; i < threads; ++i) {
            runners.emplace_back([this] {
                io.run();
                if (--running == 0) ran_down.set_value();
            });
        }
    }

    ~ServerFixture() { shut_down(); }

    // Stops the server; true when the io_context then ran out of work on its own.
    bool shut_down() {
        if (runners.empty()) return true;
        server.stop();
        guard.reset();
        const bool clean = ran_down.get_future().wait_for(kWait) == std::future_status::ready;
        if (!clean) io.stop();
        for (auto& runner : runners)
            runner.join();
        runners.clear();
        return clean;
    }

    static policy::AdminConfig config_for(std::string token) {
        policy::AdminConfig config;
        config.listen = {"127.0.0.1", 0};
        config.token = std::move(token);
        return config;
    }

    tcp::endpoint endpoint() const { return server.local_endpoint(); }

    FakeBackend backend;
    asio::io_context io;
    asio::executor_work_guard<asio::io_context::executor_type> guard;
    proxy::AdminServer server;
    std::atomic<int> running;
    std::promise<void> ran_down;
    std::vector<std::thread> runners;
};

// A blocking HTTP client: every call runs its own io_context until the operation ends or
// the stream's deadline closes it.
class Client {
public:
    explicit Client(const tcp::endpoint& server) : stream_(io_) {
        stream_.expires_after(kWait);
        error_code result = asio::error::would_block;
        stream_.async_connect(server, [&](error_code ec) { result = ec; });
        run();
        REQUIRE(!result);
    }

    void send(const http::request<http::string_body>& request) {
        error_code result = asio::error::would_block;
        stream_.expires_after(kWait);
        http::async_write(stream_, request, [&](error_code ec, std::size_t) { result = ec; });
        run();
        REQUIRE(!result);
    }

    void send_raw(const std::string& bytes) {
        error_code result = asio::error::would_block;
        stream_.expires_after(kWait);
        asio::async_write(stream_, asio::buffer(bytes),
                          [&](error_code ec, std::size_t) { result = ec; });
        run();
        REQUIRE(!result);
    }

    std::pair<error_code, Response> receive(std::chrono::milliseconds within = kWait) {
        http::response_parser<http::string_body> parser;
        parser.body_limit(16 << 20);
        error_code result = asio::error::would_block;
        stream_.expires_after(within);
        http::async_read(stream_, buffer_, parser,
                         [&](error_code ec, std::size_t) { result = ec; });
        run();
        return {result, parser.release()};
    }

    Response request(http::verb verb, std::string target, std::string body = "",
                     std::string authorization = "") {
        http::request<http::string_body> request{verb, target, 11};
        request.set(http::field::host, "127.0.0.1");
        if (!authorization.empty()) request.set(http::field::authorization, authorization);
        if (!body.empty() || verb == http::verb::post) {
            request.body() = std::move(body);
            request.prepare_payload();
        }
        send(request);
        auto [ec, response] = receive();
        INFO(ec.message());
        REQUIRE(!ec);
        return std::move(response);
    }

    // True when the server closes the connection (EOF or reset) within `within`.
    bool closed_by_server(std::chrono::milliseconds within = kWait) {
        error_code result = asio::error::would_block;
        std::array<char, 4096> sink{};
        stream_.expires_after(within);
        for (;;) {
            result = asio::error::would_block;
            stream_.async_read_some(asio::buffer(sink),
                                    [&](error_code ec, std::size_t) { result = ec; });
            run();
            if (result) break;
        }
        return result == asio::error::eof || result == asio::error::connection_reset;
    }

    std::size_t bytes_waiting() { return stream_.socket().available(); }
    void close() { stream_.close(); }

private:
    void run() {
        io_.restart();
        io_.run();
    }

    asio::io_context io_;
    beast::tcp_stream stream_;
    beast::flat_buffer buffer_;
};

nlohmann::json json_of(const Response& response) {
    const auto parsed = nlohmann::json::parse(response.body(), nullptr, false);
    INFO(response.body());
    REQUIRE_FALSE(parsed.is_discarded());
    return parsed;
}

std::string header(const Response& response, http::field field) {
    const auto value = response[field];
    return {value.data(), value.size()};
}

}  // namespace

TEST_CASE("GET /metrics serves the exposition text") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    const Response response = client.request(http::verb::get, "/metrics");
    CHECK(response.result() == http::status::ok);
    CHECK(header(response, http::field::content_type).starts_with("text/plain; version=0.0.4"));
    CHECK(response.body() == kMetricsPage);
    CHECK(fixture.backend.metrics_calls == 1);
}

TEST_CASE("GET /healthz is ok and /readyz follows upstream reachability") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    const Response health = client.request(http::verb::get, "/healthz");
    CHECK(health.result() == http::status::ok);
    CHECK(health.body() == "ok\n");
    CHECK(client.request(http::verb::get, "/readyz").result() == http::status::ok);
    fixture.backend.ready = false;
    CHECK(client.request(http::verb::get, "/readyz").result() == http::status::service_unavailable);
}

TEST_CASE("GET /api/clients and /api/throttles return the handlers' JSON") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    const Response clients = client.request(http::verb::get, "/api/clients");
    CHECK(clients.result() == http::status::ok);
    CHECK(header(clients, http::field::content_type) == "application/json");
    CHECK(json_of(clients) == fixture.backend.handlers().clients());
    const Response throttles = client.request(http::verb::get, "/api/throttles?verbose=1");
    CHECK(throttles.result() == http::status::ok);
    CHECK(json_of(throttles)["rules"][0]["level"] == 2.5);
}

TEST_CASE("POST /api/clients/{id}/doom dooms known clients with the given reason") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    auto& backend = fixture.backend;

    SECTION("with a reason") {
        const Response response =
            client.request(http::verb::post, "/api/clients/7/doom", R"({"reason": "deploy"})");
        CHECK(response.result() == http::status::ok);
        CHECK(json_of(response)["ok"] == true);
        std::lock_guard lock(backend.mutex);
        CHECK(backend.doomed_id == 7u);
        CHECK(backend.doomed_reason == "deploy");
    }
    SECTION("without a body") {
        CHECK(client.request(http::verb::post, "/api/clients/7/doom").result() == http::status::ok);
        std::lock_guard lock(backend.mutex);
        CHECK(backend.doomed_reason == proxy::kDefaultDoomReason);
    }
    SECTION("unknown id is 404 with the handler's message") {
        const Response response = client.request(http::verb::post, "/api/clients/8/doom");
        CHECK(response.result() == http::status::not_found);
        CHECK(json_of(response)["error"] == "no client with id 8");
    }
    SECTION("a non-numeric or out-of-range id is 400") {
        for (const char* target :
             {"/api/clients/abc/doom", "/api/clients/-1/doom", "/api/clients//doom",
              "/api/clients/7x/doom", "/api/clients/99999999999999999999999/doom"}) {
            INFO(target);
            const Response response = client.request(http::verb::post, target);
            CHECK(response.result() == http::status::bad_request);
            CHECK(json_of(response).contains("error"));
        }
    }
    SECTION("a body that is not the expected JSON is 400") {
        for (const char* body : {"{not json", "[1,2]", R"({"reason": 5})"}) {
            INFO(body);
            CHECK(client.request(http::verb::post, "/api/clients/7/doom", body).result() ==
                  http::status::bad_request);
        }
        std::lock_guard lock(backend.mutex);
        CHECK_FALSE(backend.doomed_id.has_value());
    }
    SECTION("GET is 405") {
        const Response response = client.request(http::verb::get, "/api/clients/7/doom");
        CHECK(response.result() == http::status::method_not_allowed);
        CHECK(header(response, http::field::allow) == "POST");
    }
}

TEST_CASE("POST /api/reload answers 200 or 500 with ok and message") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    const Response ok = client.request(http::verb::post, "/api/reload");
    CHECK(ok.result() == http::status::ok);
    CHECK(json_of(ok) == nlohmann::json{{"ok", true}, {"message", "reloaded"}});
    fixture.backend.reload_ok = false;
    const Response failed = client.request(http::verb::post, "/api/reload");
    CHECK(failed.result() == http::status::internal_server_error);
    CHECK(json_of(failed) == nlohmann::json{{"ok", false}, {"message", "line 3: bad value"}});
}

TEST_CASE("with a token, /api needs the bearer token and the rest stays open") {
    ServerFixture fixture("s3cret");
    Client client(fixture.endpoint());
    auto status = [&](http::verb verb, const char* target, std::string authorization) {
        return client.request(verb, target, "", std::move(authorization)).result();
    };

    const Response missing = client.request(http::verb::get, "/api/clients");
    CHECK(missing.result() == http::status::unauthorized);
    CHECK(header(missing, http::field::www_authenticate).starts_with("Bearer"));
    CHECK(json_of(missing).contains("error"));
    CHECK(status(http::verb::get, "/api/clients", "Bearer wrong") == http::status::unauthorized);
    CHECK(status(http::verb::get, "/api/clients", "Bearer s3cre") == http::status::unauthorized);
    CHECK(status(http::verb::get, "/api/clients", "Basic s3cret") == http::status::unauthorized);
    CHECK(status(http::verb::get, "/api/clients", "Bearers3cret") == http::status::unauthorized);
    CHECK(status(http::verb::post, "/api/reload", "") == http::status::unauthorized);
    CHECK(status(http::verb::get, "/api/unknown", "") == http::status::unauthorized);

    CHECK(status(http::verb::get, "/api/clients", "Bearer s3cret") == http::status::ok);
    CHECK(status(http::verb::get, "/api/clients", "bearer  s3cret ") == http::status::ok);
    CHECK(status(http::verb::get, "/metrics", "") == http::status::ok);
    CHECK(status(http::verb::get, "/healthz", "") == http::status::ok);
    CHECK(status(http::verb::get, "/readyz", "") == http::status::ok);

    fixture.server.set_token("rotated");
    CHECK(status(http::verb::get, "/api/clients", "Bearer s3cret") == http::status::unauthorized);
    CHECK(status(http::verb::get, "/api/clients", "Bearer rotated") == http::status::ok);
    fixture.server.set_token("");
    CHECK(status(http::verb::get, "/api/clients", "") == http::status::ok);
}

TEST_CASE("unknown paths are 404 and wrong methods 405, as JSON errors") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    for (const char* target : {"/", "/nope", "/metricsx", "/api", "/api/nope", "/api/clients/7",
                               "/api/clients/7/doom/extra"}) {
        INFO(target);
        const Response response = client.request(http::verb::get, target);
        CHECK(response.result() == http::status::not_found);
        CHECK(json_of(response).contains("error"));
    }
    const Response post_metrics = client.request(http::verb::post, "/metrics");
    CHECK(post_metrics.result() == http::status::method_not_allowed);
    CHECK(header(post_metrics, http::field::allow) == "GET");
    CHECK(json_of(post_metrics).contains("error"));
    CHECK(client.request(http::verb::delete_, "/healthz").result() ==
          http::status::method_not_allowed);
    CHECK(client.request(http::verb::get, "/api/reload").result() ==
          http::status::method_not_allowed);
    CHECK(client.request(http::verb::post, "/api/clients").result() ==
          http::status::method_not_allowed);
    CHECK(fixture.backend.metrics_calls == 0);
}

TEST_CASE("oversized and malformed requests are refused and the connection closed") {
    ServerFixture fixture;
    Client client(fixture.endpoint());

    SECTION("headers over 8 KiB: 431") {
        client.send_raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(10000, 'a') +
                        "\r\n\r\n");
        auto [ec, response] = client.receive();
        REQUIRE(!ec);
        CHECK(response.result() == http::status::request_header_fields_too_large);
        CHECK(client.closed_by_server());
    }
    SECTION("a body over 64 KiB: 413, and the handler never runs") {
        client.send_raw(
            "POST /api/clients/7/doom HTTP/1.1\r\nHost: x\r\nContent-Length: 70000"
            "\r\n\r\n" +
            std::string(70000, 'x'));
        auto [ec, response] = client.receive();
        REQUIRE(!ec);
        CHECK(response.result() == http::status::payload_too_large);
        CHECK(client.closed_by_server());
        std::lock_guard lock(fixture.backend.mutex);
        CHECK_FALSE(fixture.backend.doomed_id.has_value());
    }
    SECTION("a body just under the limit is accepted") {
        const std::string body = R"({"reason": ")" + std::string(60000, 'r') + R"("})";
        CHECK(client.request(http::verb::post, "/api/clients/7/doom", body).result() ==
              http::status::ok);
    }
    SECTION("not HTTP: 400") {
        client.send_raw("HELLO THERE\r\n\r\n");
        auto [ec, response] = client.receive();
        REQUIRE(!ec);
        CHECK(response.result() == http::status::bad_request);
        CHECK(client.closed_by_server());
    }
}

TEST_CASE("keep-alive serves several requests on one connection until Connection: close") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    for (int i = 0; i < 3; ++i) {
        const Response response = client.request(http::verb::get, "/metrics");
        CHECK(response.result() == http::status::ok);
        CHECK(response.keep_alive());
    }
    CHECK(fixture.backend.metrics_calls == 3);

    // Two pipelined requests in one write are answered in order.
    client.send_raw(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    auto [ec1, first] = client.receive();
    auto [ec2, second] = client.receive();
    REQUIRE(!ec1);
    REQUIRE(!ec2);
    CHECK(first.body() == "ok\n");
    CHECK(second.body() == "ready\n");

    http::request<http::string_body> last{http::verb::get, "/healthz", 11};
    last.set(http::field::host, "x");
    last.keep_alive(false);
    client.send(last);
    auto [ec, response] = client.receive();
    REQUIRE(!ec);
    CHECK_FALSE(response.keep_alive());
    CHECK(client.closed_by_server());
}

TEST_CASE("a silent connection is closed after the I/O timeout") {
    proxy::AdminLimits limits;
    limits.io_timeout = 200ms;
    ServerFixture fixture("", limits);
    Client idle(fixture.endpoint());
    CHECK(idle.closed_by_server());
    Client partial(fixture.endpoint());
    partial.send_raw("GET /metrics HTTP/1.1\r\nHo");
    CHECK(partial.closed_by_server());
}

TEST_CASE("connections beyond the cap wait until one closes") {
    proxy::AdminLimits limits;
    limits.max_connections = 2;
    ServerFixture fixture("", limits);
    Client first(fixture.endpoint());
    Client second(fixture.endpoint());
    CHECK(first.request(http::verb::get, "/healthz").result() == http::status::ok);
    CHECK(second.request(http::verb::get, "/healthz").result() == http::status::ok);

    Client third(fixture.endpoint());  // completes in the listen backlog
    third.send_raw("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    // Absence of an answer can only be shown by waiting a while.
    std::this_thread::sleep_for(300ms);
    CHECK(third.bytes_waiting() == 0);
    CHECK(fixture.backend.metrics_calls == 0);

    first.close();
    auto [ec, response] = third.receive();
    REQUIRE(!ec);
    CHECK(response.result() == http::status::ok);
    CHECK(fixture.backend.metrics_calls == 1);
}

TEST_CASE("handler failures become 500 and missing handlers 501") {
    proxy::AdminHandlers handlers;
    handlers.metrics = []() -> std::string { throw std::runtime_error("registry exploded"); };
    ServerFixture fixture("", {}, handlers);
    Client client(fixture.endpoint());
    const Response failed = client.request(http::verb::get, "/metrics");
    CHECK(failed.result() == http::status::internal_server_error);
    CHECK(json_of(failed)["error"] == "registry exploded");
    CHECK(client.request(http::verb::get, "/api/clients").result() ==
          http::status::not_implemented);
    CHECK(client.request(http::verb::get, "/readyz").result() == http::status::ok);
}

TEST_CASE("JSON with invalid UTF-8 from a client is still served") {
    proxy::AdminHandlers handlers;
    handlers.metrics = [] { return std::string(); };
    handlers.clients = [] { return nlohmann::json{{"application_name", "bad\xff\xfe"}}; };
    ServerFixture fixture("", {}, handlers);
    Client client(fixture.endpoint());
    const Response response = client.request(http::verb::get, "/api/clients");
    CHECK(response.result() == http::status::ok);
    CHECK(json_of(response).contains("application_name"));
}

TEST_CASE("stop() closes open keep-alive connections and the server winds down") {
    ServerFixture fixture;
    Client client(fixture.endpoint());
    CHECK(client.request(http::verb::get, "/healthz").result() == http::status::ok);
    CHECK(fixture.shut_down());
    CHECK(client.closed_by_server());
    asio::io_context io;
    tcp::socket probe(io);
    error_code ec;
    probe.connect(fixture.endpoint(), ec);
    CHECK(ec);  // nothing listens any more
}

TEST_CASE("start() throws std::system_error when the port is taken") {
    asio::io_context io;
    tcp::acceptor holder(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    policy::AdminConfig config;
    config.listen = {"127.0.0.1", holder.local_endpoint().port()};
    proxy::AdminServer server(io, config, {});
    CHECK_THROWS_AS(server.start(), std::system_error);
}

TEST_CASE("a disabled admin listener does not listen") {
    asio::io_context io;
    policy::AdminConfig config;
    config.listen = {"127.0.0.1", 0};
    config.enabled = false;
    proxy::AdminServer server(io, config, {});
    server.start();
    CHECK(server.local_endpoint().port() == 0);
}

TEST_CASE("many clients at once on a multi-threaded io_context") {
    ServerFixture fixture("", {}, {}, 2);
    constexpr int kClients = 8;
    constexpr int kRequests = 20;
    int ok = 0;
    int failed = 0;
    // The clients are coroutines on one io_context run by this thread, so the counters and
    // Catch2 stay single-threaded; the stream deadlines bound every step.
    auto client = [&]() -> asio::awaitable<void> {
        try {
            beast::tcp_stream stream(co_await asio::this_coro::executor);
            stream.expires_after(kWait);
            co_await stream.async_connect(fixture.endpoint(), asio::use_awaitable);
            beast::flat_buffer buffer;
            for (int i = 0; i < kRequests; ++i) {
                http::request<http::string_body> request{http::verb::get, "/metrics", 11};
                request.set(http::field::host, "x");
                stream.expires_after(kWait);
                co_await http::async_write(stream, request, asio::use_awaitable);
                Response response;
                co_await http::async_read(stream, buffer, response, asio::use_awaitable);
                const bool good =
                    response.result() == http::status::ok && response.body() == kMetricsPage;
                ++(good ? ok : failed);
            }
        } catch (const std::exception&) {
            ++failed;
        }
    };
    asio::io_context io;
    for (int c = 0; c < kClients; ++c)
        asio::co_spawn(io, client(), asio::detached);
    io.run();
    CHECK(failed == 0);
    CHECK(ok == kClients * kRequests);
    CHECK(fixture.backend.metrics_calls == kClients * kRequests);
    CHECK(fixture.shut_down());
}
