// libFuzzer target: the input is the text of a config file, loaded as `pgwarden --check`
// and a reload load it. Loading must not throw: every problem comes back as a ConfigError
// with the file and a line inside the text, and a config that loads satisfies every rule
// the loader claims to enforce.
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>

#include <toml++/toml.h>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "tests/fuzz/fuzz_check.hpp"

namespace {

using namespace pgwarden::policy;
using pgwarden::wire::fuzz::require;

constexpr const char* kFile = "fuzz.toml";
// Real config files are a few kB; the suggestion search for unknown keys is quadratic in
// the key's length, so megabyte keys would only make single runs slow.
constexpr std::size_t kMaxInputBytes = 64 * 1024;

// [tls] cert/key (any mode but "disable") and [upstream_tls] ca (mode "verify-full") name
// files the loader checks by opening them. The fuzzer runs as whoever starts it, so paths
// that can leave its working directory (where an open could block on a FIFO or touch a
// device) are not tried; relative names inside it still reach every outcome of the check.
bool names_outside_file(std::string_view text) {
    toml::table root;
    try {
        root = toml::parse(text, std::string_view(kFile));
    } catch (const toml::parse_error&) {
        return false;  // the loader stops at the syntax error, before any file check
    }
    const auto outside = [](const toml::node_view<toml::node>& value) {
        const auto path = value.value<std::string>();
        return path && (path->starts_with('/') || path->find("..") != std::string::npos);
    };
    const toml::node_view<toml::node> tls = root["tls"], upstream = root["upstream_tls"];
    if (tls["mode"].value_or(std::string("disable")) != "disable" &&
        (outside(tls["cert"]) || outside(tls["key"]))) {
        return true;
    }
    return upstream["mode"].value_or(std::string()) == "verify-full" && outside(upstream["ca"]);
}

bool is_sqlstate(std::string_view code) {
    if (code.size() != 5) return false;
    for (const char c : code) {
        if (!((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z'))) return false;
    }
    return true;
}

bool has_control_character(std::string_view text) {
    for (const char c : text) {
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return true;
    }
    return false;
}

void check_endpoint(const Endpoint& endpoint) {
    require(endpoint.port != 0 && !endpoint.host.empty());
    // What the loader accepted prints back to text it accepts again.
    const auto again = parse_endpoint(endpoint.to_string());
    require(again && again->host == endpoint.host && again->port == endpoint.port);
}

void check_patterns(const std::vector<std::string>& patterns) {
    for (const std::string& pattern : patterns) {
        require(!pattern.empty() && !has_control_character(pattern));
    }
}

void check_statement_kinds(const std::vector<std::string>& kinds) {
    for (const std::string& kind : kinds) {
        require(kind == "write" || statement_kind_from_string(kind).has_value());
    }
}

void check_config(const Config& config) {
    require(config.source == kFile);
    const ProxyConfig& proxy = config.proxy;
    check_endpoint(proxy.listen);
    check_endpoint(proxy.upstream);
    check_endpoint(config.admin.listen);
    require(proxy.threads <= 1024);
    require(proxy.max_client_connections >= 1 && proxy.max_client_connections <= 1'000'000);
    require(proxy.max_unauthenticated >= 1 && proxy.max_unauthenticated <= 1'000'000);
    require(proxy.auth_timeout.count() > 0 && proxy.connect_timeout.count() > 0);
    require(proxy.shutdown_timeout.count() >= 0);
    require(proxy.max_message_bytes >= 1024 && proxy.max_message_bytes <= (1ull << 30));
    require(proxy.max_statement_bytes >= 1 && proxy.max_statement_bytes <= (1ull << 30));
    if (config.admin.enabled) {
        require(proxy.listen.host != config.admin.listen.host ||
                proxy.listen.port != config.admin.listen.port);
    }
    for (const char c : config.admin.token) require(c > 0x20 && c < 0x7f);
    require(config.log.format == "text" || config.log.format == "json");
    require(config.log.level == "debug" || config.log.level == "info" ||
            config.log.level == "warn" || config.log.level == "error");
    if (config.tls.mode != ClientTlsMode::kDisable) {
        require(!config.tls.cert_file.empty() && !config.tls.key_file.empty());
    }
    require(!config.identity.sources.empty());
    for (const std::string& source : config.identity.sources) {
        require(source == "application_name" || source == "user" || source == "database" ||
                source == "address" ||
                (source.size() > 8 && (source.starts_with("comment:") ||
                                       source.starts_with("setting:"))));
    }
    for (const std::string& name : config.classify.write_functions) {
        require(!name.empty() && name.find_first_of(" ()") == std::string::npos);
    }
    require(config.classify.cache_entries <= 10'000'000);
    require(config.transactions.idle_timeout.count() >= 0);

    std::set<std::string> throttle_names;
    for (const ThrottleRule& throttle : config.throttles) {
        require(!throttle.name.empty() && !has_control_character(throttle.name));
        require(throttle_names.insert(throttle.name).second);
        require(throttle.rate > 0 && throttle.rate < 1e308);
        require(throttle.burst >= 1 && throttle.burst < 1e308);
        require(throttle.max_delay.count() >= 0 && throttle.penalty.count() >= 0);
        require(throttle.line >= 1);
        check_statement_kinds(throttle.statements);
        for (const std::string& kind : throttle.statements) {
            require(kind != "commit" && kind != "rollback");  // never throttled
        }
        require(throttle.match.statements.empty() && throttle.match.tables.empty());
        check_patterns(throttle.match.user);
        check_patterns(throttle.match.client);
    }
    std::set<std::string> rule_names;
    for (const Rule& rule : config.rules) {
        require(!rule.name.empty() && !has_control_character(rule.name));
        require(rule_names.insert(rule.name).second);
        require(is_sqlstate(rule.sqlstate) && !rule.message.empty());
        if (rule.action == RuleAction::kReject) {
            // A rejection must be an error; success and warning classes would not stop anything.
            const std::string_view sqlstate_class = std::string_view(rule.sqlstate).substr(0, 2);
            require(sqlstate_class != "00" && sqlstate_class != "01" && sqlstate_class != "02");
        }
        require(rule.line >= 1);
        check_statement_kinds(rule.match.statements);
        check_patterns(rule.match.tables);
        check_patterns(rule.match.user);
        check_patterns(rule.match.database);
        check_patterns(rule.match.application_name);
        check_patterns(rule.match.client);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size > kMaxInputBytes) return 0;
    const std::string text(reinterpret_cast<const char*>(data), size);
    if (names_outside_file(text)) return 0;

    const LoadResult result = load_config_text(text, kFile);
    require(result.config.has_value() == result.errors.empty());
    if (result.config) check_config(*result.config);

    // Every problem names the file and, when it has one, a line of the text.
    std::size_t lines = 1;
    for (const char c : text) lines += c == '\n' ? 1 : 0;
    int previous_line = 0;
    for (const ConfigError& error : result.errors) {
        require(error.file == kFile && !error.message.empty());
        require(error.line >= 0 && static_cast<std::size_t>(error.line) <= lines);
        require(error.line >= previous_line);  // listed in line order
        previous_line = error.line;
        const std::string shown = error.to_string();
        require(shown.starts_with(kFile) && shown.ends_with(error.message));
    }

    // Loading depends on the text alone.
    const LoadResult again = load_config_text(text, kFile);
    require(again.errors.size() == result.errors.size());
    for (std::size_t i = 0; i < again.errors.size(); ++i) {
        require(again.errors[i].to_string() == result.errors[i].to_string());
    }
    return 0;
}
