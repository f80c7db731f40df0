// The admin API without the sockets: a parsed HTTP request in, its response out. The
// server in admin_http.cpp reads requests and writes these answers; keeping this part free
// of Asio's coroutines lets the fuzz target (tests/fuzz/fuzz_admin_http.cpp) call exactly
// what the server calls, built by compilers that cannot build the coroutines.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/system/error_code.hpp>
#include <nlohmann/json.hpp>

namespace pgwarden::proxy {

// What the routes call. Called on the admin server's strands, possibly from several threads
// of the io_context at once, so they must be thread-safe. An empty function makes its route
// answer 501; an exception answers 500 with its message.
struct AdminHandlers {
    std::function<std::string()> metrics;  // exposition text
    std::function<bool()> ready;           // upstream reachable
    std::function<nlohmann::json()> clients;
    // nullopt when the client was doomed, else why not (the id is unknown).
    std::function<std::optional<std::string>(std::uint64_t id, const std::string& reason)> doom;
    std::function<std::pair<bool, std::string>()> reload;  // ok, message
    std::function<nlohmann::json()> throttles;
};

// Bounds that keep a misbehaving admin client from holding memory or connections.
struct AdminLimits {
    std::size_t max_header_bytes = 8 * 1024;
    std::size_t max_body_bytes = 64 * 1024;
    // For each request to arrive (idle keep-alive included) and each response to be sent.
    std::chrono::milliseconds io_timeout{std::chrono::seconds(10)};
    std::size_t max_connections = 64;  // further clients wait in the listen backlog
};

// The reason a POST /api/clients/{id}/doom without a body gives.
inline constexpr const char* kDefaultDoomReason = "admin request";

using AdminRequest = boost::beast::http::request<boost::beast::http::string_body>;
using AdminResponse = boost::beast::http::response<boost::beast::http::string_body>;
using AdminRequestParser = boost::beast::http::request_parser<boost::beast::http::string_body>;

// Applies the header and body limits to a parser for one request.
void limit_admin_parser(AdminRequestParser& parser, const AdminLimits& limits);

// The answer to one request. `token` is the bearer token /api/* requires (empty: none).
// A handler's exception becomes a 500; nothing else throws.
AdminResponse handle_admin_request(const AdminHandlers& handlers, std::string_view token,
                                   const AdminRequest& request);

// The answer to a request that failed to read with `ec` (always with Connection: close);
// nullopt when there is nobody left to answer (closed, reset, timed out).
std::optional<AdminResponse> admin_read_error_response(const boost::system::error_code& ec);

}  // namespace pgwarden::proxy
