// pgwarden's configuration: the values a config file (TOML) and the command line set,
// validated as a whole. Loading never throws: problems come back with file:line.
#pragma once
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace pgwarden::policy {

using Duration = std::chrono::milliseconds;

struct Endpoint {
    std::string host;
    std::uint16_t port = 0;
    std::string to_string() const;  // "host:port", IPv6 hosts in brackets
};
// "host:port", "[v6]:port"; nullopt when malformed or the port is out of range.
std::optional<Endpoint> parse_endpoint(const std::string& text);
// "500ms", "1s", "2m", "1h", "0"; nullopt when malformed.
std::optional<Duration> parse_duration(const std::string& text);
// "64kB", "1MB", "1048576" (bytes), 1024-based as PostgreSQL's units; nullopt when malformed.
std::optional<std::uint64_t> parse_size(const std::string& text);

struct ProxyConfig {
    Endpoint listen{"127.0.0.1", 6432};
    Endpoint upstream{"127.0.0.1", 5432};
    unsigned threads = 0;  // 0 = one per core
    bool io_uring = true;  // relay through io_uring where the kernel allows it (else epoll)
    unsigned max_client_connections = 10000;
    unsigned max_unauthenticated = 1000;  // connections still in startup/auth at once
    Duration auth_timeout{std::chrono::seconds(60)};
    Duration connect_timeout{std::chrono::seconds(5)};
    Duration shutdown_timeout{std::chrono::seconds(30)};
    std::uint64_t max_message_bytes = 64ull << 20;   // any one protocol message
    std::uint64_t max_statement_bytes = 1ull << 20;  // text of Query/Parse (54000 above)
};

struct AdminConfig {
    Endpoint listen{"127.0.0.1", 9187};
    bool enabled = true;
    std::string token;  // empty: /api needs no token
};

struct LogConfig {
    std::string format = "text";  // text | json
    std::string level = "info";   // debug | info | warn | error
};

enum class ClientTlsMode { kDisable, kAllow, kRequire };
struct ClientTlsConfig {
    ClientTlsMode mode = ClientTlsMode::kDisable;
    std::string cert_file;
    std::string key_file;
};

enum class UpstreamTlsMode { kDisable, kPrefer, kRequire, kVerifyFull };
struct UpstreamTlsConfig {
    UpstreamTlsMode mode = UpstreamTlsMode::kDisable;
    std::string ca_file;      // verify-full: the CA bundle (system default when empty)
    std::string server_name;  // verify-full: name to check (default: upstream host)
};

struct IdentityConfig {
    // Tried in order; the first with a value names the client. Forms: "comment:KEY",
    // "setting:NAME", "application_name", "user", "database", "address".
    std::vector<std::string> sources{"comment:client", "setting:pgwarden.client",
                                     "application_name", "user"};
};

struct ClassifyConfig {
    std::vector<std::string> write_functions{"nextval", "setval"};
    std::size_t cache_entries = 10000;  // per thread; 0 disables the cache
};

enum class NestingMode { kWarn, kReject, kFlatten, kSavepoint };
struct TransactionsConfig {
    NestingMode nesting = NestingMode::kWarn;
    Duration idle_timeout{0};  // 0 = off
};

struct MetricsConfig {
    std::size_t max_clients = 100;  // distinct `client` label values before "other"
};

// Who a rule or throttle applies to. Empty fields match everything; strings may use
// '*' wildcards; address is a CIDR.
struct Match {
    std::vector<std::string> user;
    std::vector<std::string> database;
    std::vector<std::string> application_name;
    std::vector<std::string> client;
    std::vector<std::string> address;
    // Only in [[rule]]: statement kinds and table patterns ("schema.table", '*' allowed).
    // "write" among the kinds stands for every statement classified as a write.
    std::vector<std::string> statements;
    std::vector<std::string> tables;
};

enum class ThrottleCost { kStatement, kRow };
enum class ThrottleBucket { kClient, kUser, kDatabase, kRule };
enum class ThrottleAction { kDelay, kReject };
struct ThrottleRule {
    std::string name;
    Match match;
    std::vector<std::string> statements;  // empty or "write": every write
    double rate = 0;                      // tokens per second, > 0
    double burst = 0;                     // >= 1; default: rate (at least 1)
    ThrottleCost cost = ThrottleCost::kStatement;
    ThrottleBucket bucket = ThrottleBucket::kClient;
    ThrottleAction action = ThrottleAction::kDelay;
    Duration max_delay{std::chrono::seconds(1)};
    Duration penalty{0};
    int line = 0;  // where it was defined, for messages
};

enum class RuleAction { kReject, kDoom, kNotice, kLog };
struct Rule {
    std::string name;
    Match match;
    RuleAction action = RuleAction::kReject;
    std::string sqlstate = "42501";
    std::string message;
    std::optional<NestingMode> nesting;  // overrides [transactions] nesting for matches
    int line = 0;
};

struct Config {
    std::string source;  // file it was loaded from, "" for defaults
    ProxyConfig proxy;
    AdminConfig admin;
    LogConfig log;
    ClientTlsConfig tls;
    UpstreamTlsConfig upstream_tls;
    IdentityConfig identity;
    ClassifyConfig classify;
    TransactionsConfig transactions;
    MetricsConfig metrics;
    std::vector<ThrottleRule> throttles;
    std::vector<Rule> rules;
};

struct ConfigError {
    std::string file;
    int line = 0;  // 0 when not tied to a line
    std::string message;
    std::string to_string() const;  // "file:line: message"
};

struct LoadResult {
    std::optional<Config> config;     // set when errors is empty
    std::vector<ConfigError> errors;  // every problem found, not just the first
};

// Parses and validates TOML text; `file` only names it in errors. Relative TLS file paths
// are taken from the config file's directory by load_config_file (the working directory here).
// Unknown keys, wrong types, bad values (durations, endpoints, enums, CIDRs, statement kinds,
// SQLSTATEs), duplicate rule names and missing required keys are all errors.
LoadResult load_config_text(const std::string& text, const std::string& file);
LoadResult load_config_file(const std::string& path);

// The config file's spelling of each choice ("savepoint", "verify-full", ...).
const char* to_string(NestingMode m);
const char* to_string(RuleAction a);
const char* to_string(ClientTlsMode m);
const char* to_string(UpstreamTlsMode m);
const char* to_string(ThrottleCost c);
const char* to_string(ThrottleBucket b);
const char* to_string(ThrottleAction a);

}  // namespace pgwarden::policy
