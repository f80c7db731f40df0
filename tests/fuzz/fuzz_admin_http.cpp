// libFuzzer target: the input is what an admin client sends on one connection. It is read
// request by request with Beast's parser and the admin server's limits, and each request
// is answered by the server's own routing (admin_routes.hpp) with stub handlers, with and
// without a bearer token. Answers must be well-formed HTTP that reads back unchanged, the
// token must gate all of /api and nothing else, and handlers run only for their routes.
#include <boost/asio/buffer.hpp>
#include <boost/beast/http.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "proxy/admin_routes.hpp"
#include "tests/fuzz/fuzz_check.hpp"

namespace {

namespace http = boost::beast::http;
using namespace pgwarden::proxy;
using boost::system::error_code;
using pgwarden::wire::fuzz::require;

constexpr std::string_view kToken = "fuzz-token-0123456789";
// A connection's requests are answered one after another; past this many, later ones
// only repeat what the fuzzer can reach with shorter inputs.
constexpr int kMaxRequests = 16;

// Which handlers were called, and with what.
struct Calls {
    int metrics = 0, ready = 0, clients = 0, doom = 0, reload = 0, throttles = 0;
    std::uint64_t doom_id = 0;
    std::string doom_reason;
    int total() const { return metrics + ready + clients + doom + reload + throttles; }
};

enum class Stubs { kWorking, kMissing, kThrowing };

AdminHandlers make_handlers(Stubs stubs, Calls& calls) {
    AdminHandlers h;
    if (stubs == Stubs::kMissing) return h;  // every route that needs one answers 501
    const bool throwing = stubs == Stubs::kThrowing;
    const auto fail = [] { throw std::runtime_error("stub failure \xff"); };
    h.metrics = [&calls, throwing, fail] {
        ++calls.metrics;
        if (throwing) fail();
        return std::string("# TYPE up gauge\nup 1\n");
    };
    h.ready = [&calls, throwing] {
        ++calls.ready;
        return !throwing;  // the throwing set reports the upstream down instead
    };
    h.clients = [&calls, throwing, fail] {
        ++calls.clients;
        if (throwing) fail();
        return nlohmann::json::array({{{"id", 7}, {"application_name", "app\xc3"}}});
    };
    h.doom = [&calls, throwing, fail](std::uint64_t id,
                                      const std::string& reason) -> std::optional<std::string> {
        ++calls.doom;
        calls.doom_id = id;
        calls.doom_reason = reason;
        if (throwing) fail();
        if (id != 7) return "no such client";
        return std::nullopt;
    };
    h.reload = [&calls, throwing, fail] {
        ++calls.reload;
        if (throwing) fail();
        return std::pair<bool, std::string>{true, "reloaded"};
    };
    h.throttles = [&calls, throwing, fail] {
        ++calls.throttles;
        if (throwing) fail();
        return nlohmann::json::array();
    };
    return h;
}

std::string_view as_view(boost::beast::string_view text) { return {text.data(), text.size()}; }

// The decimal id of a /api/clients/{id}/doom path, as the doom handler must receive it.
std::optional<std::uint64_t> decimal(std::string_view text) {
    if (text.empty()) return std::nullopt;
    std::uint64_t value = 0;
    for (const char c : text) {
        if (c < '0' || c > '9') return std::nullopt;
        const std::uint64_t digit = static_cast<std::uint64_t>(c - '0');
        if (value > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) return std::nullopt;
        value = value * 10 + digit;
    }
    return value;
}

// Serialises the response as the server writes it and reads it back: the status, every
// header and the body survive, so nothing taken from the request broke the framing.
void check_wire_form(const AdminResponse& response) {
    std::ostringstream out;
    out << response;
    const std::string bytes = out.str();
    http::response_parser<http::string_body> parser;
    parser.body_limit(bytes.size());
    parser.eager(true);
    error_code ec;
    const std::size_t used = parser.put(boost::asio::buffer(bytes), ec);
    require(!ec && parser.is_done() && used == bytes.size());
    const AdminResponse& read = parser.get();
    require(read.result() == response.result() && read.body() == response.body());
    require(read.version() == response.version());
    std::size_t fields = 0, read_fields = 0;
    for (const auto& field : response) {
        ++fields;
        const auto found = read.find(field.name_string());
        require(found != read.end() && found->value() == field.value());
    }
    for (const auto& field : read) {
        (void)field;
        ++read_fields;
    }
    require(fields == read_fields);
}

void check_common(const AdminResponse& response) {
    const unsigned status = response.result_int();
    require(status == 200 || status == 400 || status == 401 || status == 404 || status == 405 ||
            status == 413 || status == 431 || status == 500 || status == 501 || status == 503);
    require(response[http::field::content_length] == std::to_string(response.body().size()));
    require(response[http::field::server] == "pgwarden");
    if (status == 405) require(!response[http::field::allow].empty());
    if (response[http::field::content_type] == "application/json") {
        // Valid JSON (and so valid UTF-8) whatever bytes the request or a handler held.
        const nlohmann::json body = nlohmann::json::parse(response.body(), nullptr, false);
        require(!body.is_discarded());
        if (status >= 400) {
            require(body.is_object() && body.contains("error") && body["error"].is_string());
        }
    }
    check_wire_form(response);
}

// Answers one parsed request with every stub set, with and without a token.
void check_request(const AdminRequest& request) {
    const std::string_view target = as_view(request.target());
    const std::string_view path = target.substr(0, target.find('?'));
    const bool is_api = path == "/api" || path.starts_with("/api/");
    const bool get = request.method() == http::verb::get;
    const bool post = request.method() == http::verb::post;
    const std::string_view authorization = as_view(request[http::field::authorization]);

    for (const Stubs stubs : {Stubs::kWorking, Stubs::kMissing, Stubs::kThrowing}) {
        Calls open_calls;
        const AdminHandlers open_handlers = make_handlers(stubs, open_calls);
        const AdminResponse open = handle_admin_request(open_handlers, "", request);
        Calls guarded_calls;
        const AdminHandlers guarded_handlers = make_handlers(stubs, guarded_calls);
        const AdminResponse guarded = handle_admin_request(guarded_handlers, kToken, request);

        for (const AdminResponse* response : {&open, &guarded}) {
            check_common(*response);
            require(response->version() == request.version());
            require(response->keep_alive() == request.keep_alive());
        }
        require(open.result() != http::status::unauthorized);

        // The token guards /api and only /api; where it lets a request through, the answer
        // is the one without a token.
        if (guarded.result() == http::status::unauthorized) {
            require(is_api && guarded_calls.total() == 0);
            require(!guarded[http::field::www_authenticate].empty());
            require(authorization != std::string("Bearer ") + std::string(kToken));
        } else {
            require(!is_api || authorization.find(kToken) != std::string_view::npos);
            require(guarded.result() == open.result() && guarded.body() == open.body());
        }

        // A handler runs only for its own route and method, at most one per request.
        const Calls& calls = open_calls;
        require(calls.total() <= 1);
        if (calls.metrics) require(path == "/metrics" && get);
        if (calls.ready) require(path == "/readyz" && get);
        if (calls.clients) require(path == "/api/clients" && get);
        if (calls.throttles) require(path == "/api/throttles" && get);
        if (calls.reload) require(path == "/api/reload" && post);
        if (calls.doom) {
            constexpr std::string_view kPrefix = "/api/clients/", kSuffix = "/doom";
            require(post && path.starts_with(kPrefix) && path.ends_with(kSuffix) &&
                    path.size() > kPrefix.size() + kSuffix.size());
            const auto id = decimal(
                path.substr(kPrefix.size(), path.size() - kPrefix.size() - kSuffix.size()));
            require(id && *id == calls.doom_id && !calls.doom_reason.empty());
        }
        if (stubs == Stubs::kWorking && open.result() == http::status::ok && is_api) {
            require(calls.total() == 1);
        }
        if (path == "/healthz" && get) require(open.result() == http::status::ok);
    }
}

void check_read_error(const error_code& ec) {
    const auto response = admin_read_error_response(ec);
    if (!response) return;
    check_common(*response);
    require(!response->keep_alive());
    const unsigned status = response->result_int();
    require(status == 400 || status == 413 || status == 431);
    if (ec == http::error::header_limit) require(status == 431);
    if (ec == http::error::body_limit) require(status == 413);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const AdminLimits limits;
    // The server's read buffer holds at most this much; more can only arrive in later
    // reads, after the parser has taken what fits, which the loop below does not model.
    if (size > limits.max_header_bytes + limits.max_body_bytes + 4096) return 0;
    std::string_view rest(reinterpret_cast<const char*>(data), size);

    for (int served = 0; served < kMaxRequests; ++served) {
        // As http::async_read over the connection: feed what has arrived, and at the end
        // of the input the client has closed its side.
        AdminRequestParser parser;
        limit_admin_parser(parser, limits);
        error_code ec;
        while (!parser.is_done()) {
            const std::size_t used = parser.put(boost::asio::buffer(rest.data(), rest.size()), ec);
            require(used <= rest.size());
            rest.remove_prefix(used);
            // No progress without an error counts as needing more, so the loop always ends.
            if (ec == http::error::need_more || (!ec && used == 0)) {
                if (used > 0 && !rest.empty()) {
                    ec = {};
                    continue;
                }
                ec = {};
                if (parser.got_some()) {
                    parser.put_eof(ec);
                } else {
                    ec = http::error::end_of_stream;
                }
                if (!ec) require(parser.is_done());
            }
            if (ec) break;
        }
        if (ec) {
            check_read_error(ec);
            return 0;
        }
        const AdminRequest& request = parser.get();
        check_request(request);
        if (!request.keep_alive()) return 0;  // the server closes after answering
    }
    return 0;
}
