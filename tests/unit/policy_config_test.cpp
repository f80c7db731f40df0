// Tests for the config loader: defaults, every key, value syntaxes, and that every kind of
// mistake is reported with the line it is on.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "policy/config.hpp"

using namespace pgwarden::policy;
using namespace std::chrono_literals;

namespace {

LoadResult load(const std::string& text) { return load_config_text(text, "test.toml"); }

Config load_ok(const std::string& text) {
    LoadResult result = load(text);
    for (const ConfigError& error : result.errors)
        UNSCOPED_INFO(error.to_string());
    REQUIRE(result.errors.empty());
    REQUIRE(result.config.has_value());
    return *result.config;
}

std::vector<ConfigError> errors_of(const std::string& text) {
    LoadResult result = load(text);
    CHECK_FALSE(result.config.has_value());
    return result.errors;
}

std::string describe(const std::vector<ConfigError>& errors) {
    std::string out;
    for (const ConfigError& error : errors)
        out += error.to_string() + "\n";
    return out;
}

// True when one error is on `line` and its message contains `text`.
bool has_error(const std::vector<ConfigError>& errors, int line, const std::string& text) {
    for (const ConfigError& error : errors)
        if (error.line == line && error.message.find(text) != std::string::npos) return true;
    return false;
}

// The only error of a document, which must be on `line` and mention `text`.
void expect_one_error(const std::string& document, int line, const std::string& text) {
    auto errors = errors_of(document);
    INFO("document:\n" << document << "\nerrors:\n" << describe(errors));
    REQUIRE(errors.size() == 1);
    CHECK(errors[0].line == line);
    CHECK(errors[0].file == "test.toml");
    CHECK_THAT(errors[0].message, Catch::Contains(text));
}

// A directory of its own under the system temp directory, removed afterwards.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        static int counter = 0;
        path = std::filesystem::temp_directory_path() /
               ("pgwarden-config-test-" + std::to_string(::getpid()) + "-" +
                std::to_string(++counter));
        std::filesystem::create_directories(path);
    }
    ~TempDir() {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
    std::string write(const std::string& name, const std::string& content) const {
        std::ofstream(path / name) << content;
        return (path / name).string();
    }
};

}  // namespace

TEST_CASE("an empty config is the transparent-proxy default", "[config]") {
    Config config = load_ok("");
    CHECK(config.source == "test.toml");
    CHECK(config.proxy.listen.to_string() == "127.0.0.1:6432");
    CHECK(config.proxy.upstream.to_string() == "127.0.0.1:5432");
    CHECK(config.proxy.threads == 0);
    CHECK(config.proxy.io_uring);
    CHECK(config.proxy.max_client_connections == 10000);
    CHECK(config.proxy.max_unauthenticated == 1000);
    CHECK(config.proxy.auth_timeout == 60s);
    CHECK(config.proxy.connect_timeout == 5s);
    CHECK(config.proxy.shutdown_timeout == 30s);
    CHECK(config.proxy.max_message_bytes == 64u << 20);
    CHECK(config.proxy.max_statement_bytes == 1u << 20);
    CHECK(config.admin.listen.to_string() == "127.0.0.1:9187");
    CHECK(config.admin.enabled);
    CHECK(config.admin.token.empty());
    CHECK(config.log.format == "text");
    CHECK(config.log.level == "info");
    CHECK(config.tls.mode == ClientTlsMode::kDisable);
    CHECK(config.upstream_tls.mode == UpstreamTlsMode::kDisable);
    CHECK(config.identity.sources == std::vector<std::string>{"comment:client",
                                                              "setting:pgwarden.client",
                                                              "application_name", "user"});
    CHECK(config.classify.write_functions == std::vector<std::string>{"nextval", "setval"});
    CHECK(config.classify.cache_entries == 10000);
    CHECK(config.transactions.nesting == NestingMode::kWarn);
    CHECK(config.transactions.idle_timeout == 0ms);
    CHECK(config.metrics.max_clients == 100);
    CHECK(config.throttles.empty());
    CHECK(config.rules.empty());
}

TEST_CASE("every key of every table is read", "[config]") {
    TempDir dir;
    std::string cert = dir.write("server.crt", "cert");
    std::string key = dir.write("server.key", "key");
    std::string ca = dir.write("ca.pem", "ca");
    Config config = load_ok(R"([proxy]
listen = "0.0.0.0:7432"
upstream = "[::1]:5433"
threads = 4
io_uring = false
max_client_connections = 500
max_unauthenticated = 50
auth_timeout = "10s"
connect_timeout = "250ms"
shutdown_timeout = "2m"
max_message_bytes = "16MB"
max_statement_bytes = 65536

[admin]
listen = "[::]:9188"
enabled = false
token = "s3cret-token"

[log]
format = "json"
level = "debug"

[tls]
mode = "require"
cert = ")" + cert + R"("
key = ")" + key + R"("

[upstream_tls]
mode = "verify-full"
ca = ")" + ca + R"("
server_name = "db.example.com"

[identity]
sources = ["comment:tenant", "setting:App.Tenant", "address", "database"]

[classify]
write_functions = ["nextval", "audit.log_event"]
cache_entries = 0

[transactions]
nesting = "savepoint"
idle_timeout = 90

[metrics]
max_clients = 20

[[throttle]]
name = "tenants"
match = { user = "app", application_name = ["web*", "api"], client = "tenant:*", address = ["10.0.0.0/8", "fd00::/8", "192.168.1.7"], database = "shop" }
statements = ["insert", "update", "write", "select"]
rate = 50
burst = 100
cost = "row"
bucket = "database"
action = "reject"
max_delay = "1.5s"
penalty = "30s"

[[rule]]
name = "no-audit-ddl"
match = { user = "web", database = ["shop", "crm"], application_name = "web*", client = "tenant:7", address = "::1", statements = ["ddl", "truncate"], tables = ["audit.*", "public.users"] }
action = "doom"
sqlstate = "P0001"
message = "not here"
nesting = "flatten"
)");
    CHECK(config.proxy.listen.host == "0.0.0.0");
    CHECK(config.proxy.listen.port == 7432);
    CHECK(config.proxy.upstream.host == "::1");
    CHECK(config.proxy.upstream.port == 5433);
    CHECK(config.proxy.threads == 4);
    CHECK_FALSE(config.proxy.io_uring);
    CHECK(config.proxy.max_client_connections == 500);
    CHECK(config.proxy.max_unauthenticated == 50);
    CHECK(config.proxy.auth_timeout == 10s);
    CHECK(config.proxy.connect_timeout == 250ms);
    CHECK(config.proxy.shutdown_timeout == 2min);
    CHECK(config.proxy.max_message_bytes == 16u << 20);
    CHECK(config.proxy.max_statement_bytes == 65536);
    CHECK(config.admin.listen.to_string() == "[::]:9188");
    CHECK_FALSE(config.admin.enabled);
    CHECK(config.admin.token == "s3cret-token");
    CHECK(config.log.format == "json");
    CHECK(config.log.level == "debug");
    CHECK(config.tls.mode == ClientTlsMode::kRequire);
    CHECK(config.tls.cert_file == cert);
    CHECK(config.tls.key_file == key);
    CHECK(config.upstream_tls.mode == UpstreamTlsMode::kVerifyFull);
    CHECK(config.upstream_tls.ca_file == ca);
    CHECK(config.upstream_tls.server_name == "db.example.com");
    // Setting names are case-insensitive in PostgreSQL; they are kept lower-cased.
    CHECK(config.identity.sources ==
          std::vector<std::string>{"comment:tenant", "setting:app.tenant", "address", "database"});
    CHECK(config.classify.write_functions ==
          std::vector<std::string>{"nextval", "audit.log_event"});
    CHECK(config.classify.cache_entries == 0);
    CHECK(config.transactions.nesting == NestingMode::kSavepoint);
    CHECK(config.transactions.idle_timeout == 90s);
    CHECK(config.metrics.max_clients == 20);

    REQUIRE(config.throttles.size() == 1);
    const ThrottleRule& throttle = config.throttles[0];
    CHECK(throttle.name == "tenants");
    CHECK(throttle.line == 47);
    CHECK(throttle.match.user == std::vector<std::string>{"app"});
    CHECK(throttle.match.application_name == std::vector<std::string>{"web*", "api"});
    CHECK(throttle.match.client == std::vector<std::string>{"tenant:*"});
    CHECK(throttle.match.address ==
          std::vector<std::string>{"10.0.0.0/8", "fd00::/8", "192.168.1.7"});
    CHECK(throttle.match.database == std::vector<std::string>{"shop"});
    CHECK(throttle.statements == std::vector<std::string>{"insert", "update", "write", "select"});
    CHECK(throttle.rate == 50);
    CHECK(throttle.burst == 100);
    CHECK(throttle.cost == ThrottleCost::kRow);
    CHECK(throttle.bucket == ThrottleBucket::kDatabase);
    CHECK(throttle.action == ThrottleAction::kReject);
    CHECK(throttle.max_delay == 1500ms);
    CHECK(throttle.penalty == 30s);

    REQUIRE(config.rules.size() == 1);
    const Rule& rule = config.rules[0];
    CHECK(rule.name == "no-audit-ddl");
    CHECK(rule.line == 59);
    CHECK(rule.match.user == std::vector<std::string>{"web"});
    CHECK(rule.match.database == std::vector<std::string>{"shop", "crm"});
    CHECK(rule.match.application_name == std::vector<std::string>{"web*"});
    CHECK(rule.match.client == std::vector<std::string>{"tenant:7"});
    CHECK(rule.match.address == std::vector<std::string>{"::1"});
    CHECK(rule.match.statements == std::vector<std::string>{"ddl", "truncate"});
    CHECK(rule.match.tables == std::vector<std::string>{"audit.*", "public.users"});
    CHECK(rule.action == RuleAction::kDoom);
    CHECK(rule.sqlstate == "P0001");
    CHECK(rule.message == "not here");
    CHECK(rule.nesting == NestingMode::kFlatten);
}

TEST_CASE("throttle and rule defaults", "[config]") {
    Config config = load_ok(R"([[throttle]]
name = "slow"
rate = 0.5

[[throttle]]
name = "fast"
rate = 20

[[rule]]
name = "shout"
action = "notice"
)");
    REQUIRE(config.throttles.size() == 2);
    const ThrottleRule& slow = config.throttles[0];
    CHECK(slow.match.user.empty());
    CHECK(slow.match.address.empty());
    CHECK(slow.statements.empty());
    CHECK(slow.rate == 0.5);
    CHECK(slow.burst == 1);  // a bucket smaller than one token could never admit anything
    CHECK(slow.cost == ThrottleCost::kStatement);
    CHECK(slow.bucket == ThrottleBucket::kClient);
    CHECK(slow.action == ThrottleAction::kDelay);
    CHECK(slow.max_delay == 1s);
    CHECK(slow.penalty == 0ms);
    CHECK(slow.line == 1);
    CHECK(config.throttles[1].burst == 20);
    CHECK(config.throttles[1].line == 5);

    REQUIRE(config.rules.size() == 1);
    const Rule& rule = config.rules[0];
    CHECK(rule.action == RuleAction::kNotice);
    CHECK(rule.sqlstate == "42501");
    CHECK(rule.message == "pgwarden: rule shout");
    CHECK_FALSE(rule.nesting.has_value());
    CHECK(rule.match.statements.empty());
    CHECK(rule.line == 9);
}

TEST_CASE("a match value may be one string or a list, with [x.match] tables too", "[config]") {
    Config config = load_ok(R"([[rule]]
name = "a"
action = "log"
[rule.match]
user = "alice"
statements = "write"
)");
    REQUIRE(config.rules.size() == 1);
    CHECK(config.rules[0].match.user == std::vector<std::string>{"alice"});
    CHECK(config.rules[0].match.statements == std::vector<std::string>{"write"});
}

TEST_CASE("durations", "[config]") {
    struct Case {
        const char* text;
        std::optional<Duration> expected;
    };
    const std::vector<Case> cases{
        {"250ms", 250ms},
        {"1s", 1s},
        {"1.5s", 1500ms},
        {"0.25s", 250ms},
        {"2m", 2min},
        {"2min", 2min},
        {"1h", 1h},
        {"1d", 24h},
        {"0", 0ms},
        {"0s", 0ms},
        {"30", 30s},
        {" 5s ", 5s},
        {"10 ms", 10ms},
        {"1.500s", 1500ms},
        {"0ms", 0ms},
        {"", std::nullopt},
        {"s", std::nullopt},
        {"-1s", std::nullopt},
        {"1.5ms", std::nullopt},
        {"1x", std::nullopt},
        {"1S", std::nullopt},
        {"1.s", std::nullopt},
        {".5s", std::nullopt},
        {"1s2", std::nullopt},
        {"99999999999999999999s", std::nullopt},
        {"1e3s", std::nullopt},
        {"9223372036854775807d", std::nullopt},
    };
    for (const Case& c : cases) {
        INFO("\"" << c.text << "\"");
        CHECK(parse_duration(c.text) == c.expected);
    }
}

TEST_CASE("durations in TOML: strings, integer and float seconds", "[config]") {
    Config config = load_ok(R"([[throttle]]
name = "t"
rate = 1
max_delay = 2
penalty = 0.75
[transactions]
idle_timeout = "5m"
)");
    CHECK(config.throttles[0].max_delay == 2s);
    CHECK(config.throttles[0].penalty == 750ms);
    CHECK(config.transactions.idle_timeout == 5min);
    expect_one_error("[transactions]\nidle_timeout = 0.0001\n", 2, "whole number of milliseconds");
    expect_one_error("[transactions]\nidle_timeout = true\n", 2, "must be a duration string");
    expect_one_error("[proxy]\nconnect_timeout = \"0ms\"\n", 2,
                     "'connect_timeout' in [proxy] must be more than 0");
}

TEST_CASE("sizes", "[config]") {
    struct Case {
        const char* text;
        std::optional<std::uint64_t> expected;
    };
    const std::vector<Case> cases{
        {"64kB", 64 * 1024},
        {"1MB", 1 << 20},
        {"1GB", 1ull << 30},
        {"2TB", 2ull << 40},
        {"1048576", 1048576},
        {"100B", 100},
        {"64KB", 64 * 1024},
        {"1.5MB", 1572864},
        {"512 kB", 512 * 1024},
        {"0", 0},
        {"", std::nullopt},
        {"MB", std::nullopt},
        {"1.5B", std::nullopt},
        {"-1MB", std::nullopt},
        {"1PB", std::nullopt},
        {"1 M B", std::nullopt},
        {"99999999999GB", std::nullopt},
    };
    for (const Case& c : cases) {
        INFO("\"" << c.text << "\"");
        CHECK(parse_size(c.text) == c.expected);
    }
}

TEST_CASE("sizes in TOML and their limits", "[config]") {
    Config config = load_ok("[proxy]\nmax_message_bytes = 2048\nmax_statement_bytes = \"1GB\"\n");
    CHECK(config.proxy.max_message_bytes == 2048);
    CHECK(config.proxy.max_statement_bytes == 1ull << 30);
    expect_one_error("[proxy]\nmax_message_bytes = \"2GB\"\n", 2, "must be at most 1GB, not 2GB");
    expect_one_error("[proxy]\n\nmax_message_bytes = 12\n", 3,
                     "must be at least 1kB, not 12 bytes");
    expect_one_error("[proxy]\nmax_statement_bytes = \"lots\"\n", 2, "\"lots\" is not a size");
    expect_one_error("[proxy]\nmax_statement_bytes = -5\n", 2, "must not be negative");
    expect_one_error("[proxy]\nmax_statement_bytes = 1.5\n", 2, "must be a size string");
}

TEST_CASE("endpoints", "[config]") {
    struct Case {
        const char* text;
        const char* host;  // nullptr: refused
        std::uint16_t port;
    };
    const std::vector<Case> cases{
        {"127.0.0.1:6432", "127.0.0.1", 6432},
        {"localhost:5432", "localhost", 5432},
        {"db-1.internal.example.com:1", "db-1.internal.example.com", 1},
        {"db.example.com.:65535", "db.example.com.", 65535},
        {"[::1]:6432", "::1", 6432},
        {"[fd00::10:2]:5432", "fd00::10:2", 5432},
        {"0.0.0.0:06432", "0.0.0.0", 6432},
        {"localhost", nullptr, 0},
        {"localhost:", nullptr, 0},
        {"localhost:0", nullptr, 0},
        {"localhost:65536", nullptr, 0},
        {"localhost:99999999", nullptr, 0},
        {"localhost:-1", nullptr, 0},
        {"localhost:+80", nullptr, 0},
        {"localhost:http", nullptr, 0},
        {":6432", nullptr, 0},
        {"::1:6432", nullptr, 0},
        {"[::1]", nullptr, 0},
        {"[::1]6432", nullptr, 0},
        {"[::1:6432", nullptr, 0},
        {"[localhost]:6432", nullptr, 0},
        {"[]:6432", nullptr, 0},
        {"300.1.1.1:6432", nullptr, 0},
        {"bad host:6432", nullptr, 0},
        {"-lead.example.com:6432", nullptr, 0},
        {"a..b:6432", nullptr, 0},
        {"", nullptr, 0},
    };
    for (const Case& c : cases) {
        INFO("\"" << c.text << "\"");
        auto endpoint = parse_endpoint(c.text);
        if (c.host == nullptr) {
            CHECK_FALSE(endpoint.has_value());
        } else {
            REQUIRE(endpoint.has_value());
            CHECK(endpoint->host == c.host);
            CHECK(endpoint->port == c.port);
        }
    }
    CHECK(Endpoint{"::1", 6432}.to_string() == "[::1]:6432");
    CHECK(Endpoint{"db.example.com", 5432}.to_string() == "db.example.com:5432");
    CHECK(parse_endpoint(Endpoint{"fe80::1", 80}.to_string())->host == "fe80::1");
}

TEST_CASE("client addresses: IPs and CIDR blocks, v4 and v6", "[config]") {
    for (const char* good : {"10.0.0.0/8", "192.168.1.7", "192.168.1.7/32", "0.0.0.0/0", "::1",
                             "::/0", "fd00::/8", "2001:db8::/32", "2001:db8::1/128"}) {
        INFO(good);
        Config config = load_ok(
            std::string("[[rule]]\nname = \"r\"\naction = \"log\"\nmatch = { address = \"") + good +
            "\" }\n");
        CHECK(config.rules[0].match.address == std::vector<std::string>{good});
    }
    struct Bad {
        const char* text;
        const char* problem;
    };
    for (const Bad& bad : std::vector<Bad>{{"10.0.0.0/33", "prefix length over 32"},
                                           {"::/129", "prefix length over 128"},
                                           {"10.1.0.0/8", "bits set right of the /8 mask"},
                                           {"fd00::1/8", "bits set right of the /8 mask"},
                                           {"10.0.0.0/", "malformed prefix length"},
                                           {"10.0.0.0/x", "malformed prefix length"},
                                           {"10.0.0/8", "is not an IP address or CIDR block"},
                                           {"localhost", "is not an IP address or CIDR block"},
                                           {"fe80::1%eth0", "is not an IP address or CIDR block"},
                                           {"10.0.0.*", "is not an IP address or CIDR block"}}) {
        expect_one_error(
            std::string(
                "[[rule]]\nname = \"r\"\naction = \"log\"\nmatch = { address = [\"::1\", \"") +
                bad.text + "\"] }\n",
            4, bad.problem);
    }
}

TEST_CASE("a TOML syntax error is reported with its line", "[config]") {
    expect_one_error("[proxy]\nlisten = \"127.0.0.1:6432\"\nthreads = \n", 3, "TOML syntax error");
    expect_one_error("[proxy]\nthreads = 1\nthreads = 2\n", 3, "TOML syntax error");
    expect_one_error("[[throttle]]\nname = \"x\"\nmatch = { user = \"a\",\n  client = \"b\" }\n", 3,
                     "TOML syntax error");
}

TEST_CASE("unknown keys and tables are errors, with a suggestion for typos", "[config]") {
    expect_one_error("[proxy]\nlistne = \"127.0.0.1:6432\"\n", 2,
                     "unknown key 'listne' in [proxy] (did you mean 'listen'?)");
    expect_one_error("[admin]\nenabled = true\nfrobnicate = 1\n", 3,
                     "unknown key 'frobnicate' in [admin]");
    CHECK_FALSE(has_error(errors_of("[admin]\nfrobnicate = 1\n"), 2, "did you mean"));
    expect_one_error("\n[prxy]\nlisten = \"x\"\n", 2,
                     "unknown table [prxy] (did you mean [proxy]?)");
    expect_one_error("[[throttles]]\nname = \"a\"\n", 1,
                     "unknown table [[throttles]] (did you mean [[throttle]]?)");
    expect_one_error("listen = \"127.0.0.1:6432\"\n", 1, "unknown key 'listen' at the top level");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 1\nmatch = { usr = \"x\" }\n", 4,
                     "unknown key 'usr' in the match of [[throttle]] 'a' (did you mean 'user'?)");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\nsqlstat = \"42501\"\n", 4,
                     "unknown key 'sqlstat' in [[rule]] 'r' (did you mean 'sqlstate'?)");
    // A dotted key makes a sub-table that nothing reads.
    expect_one_error("[log]\nlevel.x = 1\n", 2, "'level' in [log] must be a string, not a table");
}

TEST_CASE("wrong types name the expected type", "[config]") {
    expect_one_error("[proxy]\nthreads = \"4\"\n", 2,
                     "'threads' in [proxy] must be an integer, not a string");
    expect_one_error("[proxy]\nio_uring = \"yes\"\n", 2,
                     "'io_uring' in [proxy] must be true or false, not a string");
    expect_one_error("[proxy]\nlisten = 6432\n", 2,
                     "'listen' in [proxy] must be a string, not an integer");
    expect_one_error("[admin]\nenabled = \"yes\"\n", 2,
                     "'enabled' in [admin] must be true or false, not a string");
    expect_one_error("[identity]\nsources = 5\n", 2,
                     "must be a string or an array of strings, not an integer");
    expect_one_error("[identity]\nsources = [\n  \"user\",\n  5,\n]\n", 4,
                     "every element must be a string, not an integer");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = \"fast\"\n", 3,
                     "'rate' in [[throttle]] 'a' must be a number, not a string");
    expect_one_error("[[rule]]\nname = \"a\"\naction = \"log\"\nmatch = \"user\"\n", 4,
                     "'match' in [[rule]] 'a' must be a table");
    expect_one_error("proxy = 1\n", 1, "[proxy] must be a table, not an integer");
    expect_one_error("[[proxy]]\nthreads = 1\n", 1, "[proxy] must be a table, not an array");
    expect_one_error("[throttle]\nname = \"a\"\n", 1,
                     "'throttle' must be an array of tables, written [[throttle]]");
    expect_one_error("rule = [1]\n", 1, "'rule' must be an array of tables");
    expect_one_error("[log]\nlevel = 2023-01-01\n", 2, "must be a string, not a date");
}

TEST_CASE("values out of range or not among the choices", "[config]") {
    expect_one_error("[proxy]\nthreads = 5000\n", 2,
                     "'threads' in [proxy] must be at most 1024, not 5000");
    expect_one_error("[proxy]\nmax_client_connections = 0\n", 2, "must be at least 1, not 0");
    expect_one_error("[metrics]\nmax_clients = -1\n", 2, "must be at least 0, not -1");
    expect_one_error("[proxy]\nupstream = \"db:0\"\n", 2,
                     "'upstream' in [proxy]: \"db:0\" is not \"host:port\"");
    expect_one_error("[proxy]\nauth_timeout = \"soon\"\n", 2, "\"soon\" is not a duration");
    expect_one_error("[proxy]\nauth_timeout = -3\n", 2, "must not be negative");
    expect_one_error("[log]\nformat = \"xml\"\n", 2,
                     "'format' in [log] must be one of \"text\", \"json\"; not \"xml\"");
    expect_one_error("[log]\nlevel = \"warning\"\n", 2,
                     "must be one of \"debug\", \"info\", \"warn\", \"error\"");
    expect_one_error("[transactions]\nnesting = \"nest\"\n", 2,
                     "'nesting' in [transactions] must be one of");
    expect_one_error("[upstream_tls]\nmode = \"verify-ca\"\n", 2,
                     "\"verify-full\"; not \"verify-ca\"");
    expect_one_error("[upstream_tls]\nserver_name = \"not a host\"\n", 2, "is not a host name");
    expect_one_error("[tls]\nmode = \"prefer\"\n", 2,
                     "must be one of \"disable\", \"allow\", \"require\"");
    expect_one_error("[admin]\ntoken = \"two words\"\n", 2, "printable ASCII without spaces");
    expect_one_error("[classify]\nwrite_functions = [\"next val()\"]\n", 2,
                     "is not a function name");
    expect_one_error("[classify]\ncache_entries = -1\n", 2, "must be at least 0");
}

TEST_CASE("identity sources", "[config]") {
    expect_one_error("[identity]\nsources = []\n", 2, "empty list; name at least one source");
    expect_one_error("[identity]\nsources = [\"user\", \"usr\"]\n", 2,
                     "unknown identity source \"usr\"");
    expect_one_error("[identity]\nsources = [\"comment:\"]\n", 2,
                     "needs a tag name after \"comment:\"");
    expect_one_error("[identity]\nsources = [\"setting:\"]\n", 2, "needs a setting name");
    expect_one_error("[identity]\nsources = [\"comment:a b\"]\n", 2, "needs a tag name");
    expect_one_error("[identity]\nsources = [\"\"]\n", 2, "has an empty string");
    Config config = load_ok("[identity]\nsources = \"user\"\n[classify]\nwrite_functions = []\n");
    CHECK(config.identity.sources == std::vector<std::string>{"user"});
    CHECK(config.classify.write_functions.empty());
}

TEST_CASE("client TLS needs an existing certificate and key", "[config]") {
    TempDir dir;
    std::string cert = dir.write("c.pem", "cert");
    std::string key = dir.write("k.pem", "key");
    for (const char* mode : {"allow", "require"}) {
        INFO(mode);
        auto errors = errors_of(std::string("[tls]\nmode = \"") + mode + "\"\n");
        INFO(describe(errors));
        CHECK(errors.size() == 2);
        CHECK(has_error(errors, 2, "mode = \"" + std::string(mode) + "\" needs 'cert'"));
        CHECK(has_error(errors, 2, "needs 'key'"));
    }
    expect_one_error("[tls]\nmode = \"require\"\ncert = \"" + cert + "\"\nkey = \"" +
                         (dir.path / "nope.pem").string() + "\"\n",
                     4, "'key' in [tls]: no such file");
    expect_one_error(
        "[tls]\nmode = \"allow\"\ncert = \"" + dir.path.string() + "\"\nkey = \"" + key + "\"\n", 3,
        "is a directory");
    // Disabled TLS does not look at the files.
    Config config = load_ok("[tls]\nmode = \"disable\"\ncert = \"/no/such/file\"\n");
    CHECK(config.tls.cert_file == "/no/such/file");
}

TEST_CASE("the upstream CA file must exist for verify-full", "[config]") {
    expect_one_error("[upstream_tls]\nmode = \"verify-full\"\nca = \"/no/such/ca.pem\"\n", 3,
                     "'ca' in [upstream_tls]: no such file");
    Config config = load_ok("[upstream_tls]\nmode = \"verify-full\"\n");
    CHECK(config.upstream_tls.ca_file.empty());  // the system's bundle
    CHECK(load("[upstream_tls]\nmode = \"require\"\nca = \"/no/such/ca.pem\"\n").errors.empty());
}

TEST_CASE("throttle mistakes", "[config]") {
    expect_one_error("[[throttle]]\nrate = 5\n", 1, "[[throttle]] #1 needs 'name'");
    expect_one_error("[[throttle]]\nname = \"a\"\n", 1, "[[throttle]] 'a' needs 'rate'");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 0\n", 3,
                     "'rate' in [[throttle]] 'a' must be more than 0");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = -2.5\n", 3, "must be more than 0");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = inf\n", 3, "must be a finite number");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = nan\n", 3, "must be a finite number");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nburst = 0.5\n", 4,
                     "'burst' in [[throttle]] 'a' must be at least 1");
    expect_one_error("[[throttle]]\nname = \"\"\nrate = 5\n", 2, "must be a non-empty name");
    expect_one_error(
        "[[throttle]]\nname = \"a\"\nrate = 5\nstatements = [\"insert\", \"inserts\"]\n", 4,
        "unknown statement kind \"inserts\" (did you mean \"insert\"?)");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nstatements = [\"frob\"]\n", 4,
                     "kinds are select insert update");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nstatements = [\"commit\"]\n", 4,
                     "COMMIT and ROLLBACK are never throttled");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nstatements = []\n", 4,
                     "leave 'statements' out to throttle every write");
    expect_one_error(
        "[[throttle]]\nname = \"a\"\nrate = 5\nmatch = { statements = [\"insert\"] }\n", 4,
        "'statements' of [[throttle]] 'a' belongs beside match");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nmatch = { tables = [\"x.*\"] }\n", 4,
                     "cannot name tables");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nmatch = { user = [] }\n", 4,
                     "'user' in the match of [[throttle]] 'a' is an empty list; leave the key out");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nmatch = { client = \"\" }\n", 4,
                     "has an empty string");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\ncost = \"rows\"\n", 4,
                     "must be one of \"statement\", \"row\"");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nbucket = \"tenant\"\n", 4,
                     "\"client\", \"user\", \"database\", \"rule\"");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\naction = \"drop\"\n", 4,
                     "\"delay\", \"reject\"");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\nmax_delay = \"forever\"\n", 4,
                     "is not a duration");
    expect_one_error("[[throttle]]\nname = \"a\"\nrate = 5\npenalty = -1\n", 4,
                     "must not be negative");
}

TEST_CASE("names are unique within throttles and within rules", "[config]") {
    expect_one_error(
        "[[throttle]]\nname = \"a\"\nrate = 1\n\n[[throttle]]\nname = \"a\"\nrate = 2\n", 6,
        "duplicate [[throttle]] name 'a' (first used on line 2)");
    expect_one_error(
        "[[rule]]\nname = \"r\"\naction = \"log\"\n[[rule]]\nname = \"r\"\naction = \"log\"\n", 5,
        "duplicate [[rule]] name 'r' (first used on line 2)");
    Config config = load_ok(
        "[[throttle]]\nname = \"same\"\nrate = 1\n[[rule]]\nname = \"same\"\naction = \"log\"\n");
    CHECK(config.throttles[0].name == config.rules[0].name);
}

TEST_CASE("rule mistakes", "[config]") {
    expect_one_error("[[rule]]\naction = \"log\"\n", 1, "[[rule]] #1 needs 'name'");
    expect_one_error("[[rule]]\nname = \"r\"\n", 1, "[[rule]] 'r' needs 'action'");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"block\"\n", 3,
                     "\"reject\", \"doom\", \"notice\", \"log\"");
    for (const char* bad : {"4250", "425011", "42a01", "42_01", ""}) {
        INFO(bad);
        expect_one_error(std::string("[[rule]]\nname = \"r\"\naction = \"reject\"\nsqlstate = \"") +
                             bad + "\"\n",
                         4, "is not a SQLSTATE");
    }
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"reject\"\nsqlstate = \"01000\"\n", 4,
                     "a rejection needs an error class");
    CHECK(load_ok("[[rule]]\nname = \"r\"\naction = \"notice\"\nsqlstate = \"01000\"\n")
              .rules[0]
              .sqlstate == "01000");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\nmessage = \"\"\n", 4,
                     "'message' in [[rule]] 'r' must not be empty");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\nnesting = \"deep\"\n", 4,
                     "'nesting' in [[rule]] 'r' must be one of");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\nstatements = [\"ddl\"]\n", 4,
                     "'statements' in [[rule]] 'r' belongs inside match");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\ntables = [\"a.b\"]\n", 4,
                     "belongs inside match");
    expect_one_error(
        "[[rule]]\nname = \"r\"\naction = \"log\"\nmatch = { statements = [\"selects\"] }\n", 4,
        "unknown statement kind \"selects\" (did you mean \"select\"?)");
    expect_one_error("[[rule]]\nname = \"r\"\naction = \"log\"\nmatch = { tables = [] }\n", 4,
                     "is an empty list");
}

TEST_CASE("the admin listener cannot share the proxy's address", "[config]") {
    expect_one_error("[proxy]\nlisten = \"127.0.0.1:7000\"\n[admin]\nlisten = \"127.0.0.1:7000\"\n",
                     4, "[admin] listen and [proxy] listen are both 127.0.0.1:7000");
    CHECK(load("[proxy]\nlisten = \"127.0.0.1:7000\"\n[admin]\nlisten = "
               "\"127.0.0.1:7000\"\nenabled = false\n")
              .errors.empty());
}

TEST_CASE("every problem is reported, in line order", "[config]") {
    auto errors = errors_of(R"([proxy]
listen = "nowhere"
threads = -1
colour = "blue"

[log]
level = "loud"

[[throttle]]
name = "t"
rate = 0
match = { address = "10.0.0.0/40" }

[[rule]]
name = "t"
action = "reject"
sqlstate = "x"
)");
    INFO(describe(errors));
    REQUIRE(errors.size() == 7);
    CHECK(has_error(errors, 2, "'listen' in [proxy]"));
    CHECK(has_error(errors, 3, "'threads' in [proxy] must be at least 0"));
    CHECK(has_error(errors, 4, "unknown key 'colour' in [proxy]"));
    CHECK(has_error(errors, 7, "'level' in [log]"));
    CHECK(has_error(errors, 11, "'rate' in [[throttle]] 't'"));
    CHECK(has_error(errors, 12, "prefix length over 32"));
    CHECK(has_error(errors, 17, "is not a SQLSTATE"));
    for (std::size_t i = 1; i < errors.size(); ++i)
        CHECK(errors[i - 1].line <= errors[i].line);
}

TEST_CASE("ConfigError and enum names print as documented", "[config]") {
    CHECK(ConfigError{"pgwarden.toml", 12, "unknown key 'x' in [proxy]"}.to_string() ==
          "pgwarden.toml:12: unknown key 'x' in [proxy]");
    CHECK(ConfigError{"pgwarden.toml", 0, "cannot read the config file"}.to_string() ==
          "pgwarden.toml: cannot read the config file");
    CHECK(to_string(NestingMode::kWarn) == std::string("warn"));
    CHECK(to_string(NestingMode::kReject) == std::string("reject"));
    CHECK(to_string(NestingMode::kFlatten) == std::string("flatten"));
    CHECK(to_string(NestingMode::kSavepoint) == std::string("savepoint"));
    CHECK(to_string(RuleAction::kReject) == std::string("reject"));
    CHECK(to_string(RuleAction::kDoom) == std::string("doom"));
    CHECK(to_string(RuleAction::kNotice) == std::string("notice"));
    CHECK(to_string(RuleAction::kLog) == std::string("log"));
    CHECK(to_string(UpstreamTlsMode::kVerifyFull) == std::string("verify-full"));
    CHECK(to_string(ClientTlsMode::kAllow) == std::string("allow"));
    CHECK(to_string(ThrottleCost::kRow) == std::string("row"));
    CHECK(to_string(ThrottleBucket::kRule) == std::string("rule"));
    CHECK(to_string(ThrottleAction::kDelay) == std::string("delay"));
}

TEST_CASE("loading a file: its name in errors, relative TLS paths from its directory", "[config]") {
    TempDir dir;
    auto missing = load_config_file((dir.path / "absent.toml").string());
    REQUIRE(missing.errors.size() == 1);
    CHECK_FALSE(missing.config.has_value());
    CHECK(missing.errors[0].to_string() ==
          (dir.path / "absent.toml").string() + ": cannot read the config file");

    std::string bad = dir.write("bad.toml", "[proxy]\n\nthreads = \"x\"\n");
    auto result = load_config_file(bad);
    REQUIRE(result.errors.size() == 1);
    CHECK(result.errors[0].to_string() ==
          bad + ":3: 'threads' in [proxy] must be an integer, not a string");

    std::filesystem::create_directories(dir.path / "tls");
    dir.write("tls/server.crt", "cert");
    dir.write("tls/server.key", "key");
    std::string good = dir.write(
        "good.toml",
        "[tls]\nmode = \"require\"\ncert = \"tls/server.crt\"\nkey = \"tls/server.key\"\n");
    auto loaded = load_config_file(good);
    INFO(describe(loaded.errors));
    REQUIRE(loaded.config.has_value());
    CHECK(loaded.config->source == good);
    CHECK(loaded.config->tls.cert_file == (dir.path / "tls/server.crt").string());
    CHECK(loaded.config->tls.key_file == (dir.path / "tls/server.key").string());
}

#ifdef PGWARDEN_SOURCE_DIR
TEST_CASE("the shipped configs/pgwarden.toml loads and is a transparent proxy", "[config]") {
    const std::string path = std::string(PGWARDEN_SOURCE_DIR) + "/configs/pgwarden.toml";
    LoadResult result = load_config_file(path);
    INFO(describe(result.errors));
    REQUIRE(result.config.has_value());
    CHECK(result.config->throttles.empty());
    CHECK(result.config->rules.empty());
    CHECK(result.config->proxy.listen.to_string() == "127.0.0.1:6432");
    CHECK(result.config->proxy.upstream.to_string() == "127.0.0.1:5432");
    CHECK(result.config->admin.listen.to_string() == "127.0.0.1:9187");
}

TEST_CASE("the commented-out examples of configs/pgwarden.toml are valid", "[config]") {
    std::ifstream in(std::string(PGWARDEN_SOURCE_DIR) + "/configs/pgwarden.toml");
    REQUIRE(in.is_open());
    // Uncomment table headers and "key = value" lines, leaving prose comments alone.
    const std::regex commented_setting(R"(^# (\[\[|[a-z_]+ = ))");
    std::string text, line;
    while (std::getline(in, line))
        text += std::regex_replace(line, commented_setting, "$1") + "\n";
    Config config = load_ok(text);
    CHECK(config.throttles.size() == 3);
    CHECK(config.rules.size() == 4);
    for (const ThrottleRule& throttle : config.throttles)
        CHECK(throttle.rate > 0);
}
#endif
