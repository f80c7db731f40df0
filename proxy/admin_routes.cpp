// The admin API's routes and its bearer-token guard, from a parsed request to the response.
#include "proxy/admin_routes.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <array>
#include <charconv>
#include <exception>
#include <system_error>

#include <boost/beast/http/error.hpp>
#include <boost/beast/http/field.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/verb.hpp>

namespace pgwarden::proxy {

namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;
using Request = AdminRequest;
using Response = AdminResponse;

namespace {

constexpr std::string_view kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";
constexpr std::string_view kTextContentType = "text/plain; charset=utf-8";
constexpr std::string_view kJsonContentType = "application/json";

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

Response route_api(const AdminHandlers& handlers, const Request& request, std::string_view path) {
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

Response route(const AdminHandlers& handlers, std::string_view token, const Request& request) {
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
        if (!token.empty() && !same_secret(bearer_token(request), token)) {
            Response response =
                json_error(request, http::status::unauthorized, "missing or wrong bearer token");
            response.set(http::field::www_authenticate, R"(Bearer realm="pgwarden")");
            return response;
        }
        return route_api(handlers, request, path);
    }
    return json_error(request, http::status::not_found, "not found");
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

}  // namespace

void limit_admin_parser(AdminRequestParser& parser, const AdminLimits& limits) {
    parser.header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
    parser.body_limit(limits.max_body_bytes);
}

AdminResponse handle_admin_request(const AdminHandlers& handlers, std::string_view token,
                                   const AdminRequest& request) {
    try {
        return route(handlers, token, request);
    } catch (const std::exception& error) {
        return json_error(request, http::status::internal_server_error, error.what());
    }
}

std::optional<AdminResponse> admin_read_error_response(const error_code& ec) {
    const auto status = status_for_read_error(ec);
    if (!status) return std::nullopt;
    Request failed;
    failed.version(11);
    failed.keep_alive(false);
    const char* message = *status == http::status::request_header_fields_too_large
                              ? "request header too large"
                          : *status == http::status::payload_too_large ? "request body too large"
                                                                        : "malformed HTTP request";
    return json_error(failed, *status, message);
}

}  // namespace pgwarden::proxy
