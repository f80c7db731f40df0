// Tests for the `match` tables of [[rule]] and [[throttle]]: '*' globs, CIDR blocks
// (IPv4, IPv6, IPv4-mapped clients), statement kind sets with "write", and table patterns.
#include <catch2/catch.hpp>

#include <arpa/inet.h>

#include <array>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/identity.hpp"
#include "policy/match.hpp"

namespace {

using pgwarden::policy::Cidr;
using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;
using pgwarden::policy::ClientIdentity;
using pgwarden::policy::glob_match;
using pgwarden::policy::kStatementKindCount;
using pgwarden::policy::KindSet;
using pgwarden::policy::Match;
using pgwarden::policy::Matcher;
using pgwarden::policy::StatementInfo;
using pgwarden::policy::StatementKind;
using pgwarden::policy::table_matches;

StatementInfo classify_one(std::string_view sql) {
    static Classifier classifier{ClassifyConfig{}};
    auto result = classifier.classify(sql);
    REQUIRE(result->statements.size() == 1);
    return result->statements.front();
}

// The obvious exponential definition, to check the backtracking matcher against.
bool reference_glob(std::string_view pattern, std::string_view text) {
    if (pattern.empty()) return text.empty();
    if (pattern.front() == '*')
        return reference_glob(pattern.substr(1), text) ||
               (!text.empty() && reference_glob(pattern, text.substr(1)));
    return !text.empty() && pattern.front() == text.front() &&
           reference_glob(pattern.substr(1), text.substr(1));
}

bool cidr_contains(std::string_view network, std::string_view address) {
    auto cidr = Cidr::parse(network);
    REQUIRE(cidr.has_value());
    return cidr->contains(address);
}

std::string v4_text(std::uint32_t address) {
    std::uint32_t network_order = htonl(address);
    char text[INET_ADDRSTRLEN];
    REQUIRE(inet_ntop(AF_INET, &network_order, text, sizeof text) != nullptr);
    return text;
}

std::string v6_text(const std::array<std::uint8_t, 16>& bytes) {
    char text[INET6_ADDRSTRLEN];
    REQUIRE(inet_ntop(AF_INET6, bytes.data(), text, sizeof text) != nullptr);
    return text;
}

bool same_leading_bits(const std::array<std::uint8_t, 16>& a, const std::array<std::uint8_t, 16>& b,
                       int bits) {
    for (int bit = 0; bit < bits; ++bit) {
        unsigned mask = 0x80u >> (bit % 8);
        if ((a[std::size_t(bit / 8)] & mask) != (b[std::size_t(bit / 8)] & mask)) return false;
    }
    return true;
}

ClientIdentity client(std::string user, std::string database, std::string application_name,
                      std::string address) {
    return ClientIdentity({{"user", std::move(user)},
                           {"database", std::move(database)},
                           {"application_name", std::move(application_name)}},
                          std::move(address));
}

}  // namespace

TEST_CASE("match: glob_match", "[match]") {
    CHECK(glob_match("", ""));
    CHECK_FALSE(glob_match("", "a"));
    CHECK(glob_match("*", ""));
    CHECK(glob_match("*", "anything at all"));
    CHECK(glob_match("**", "x"));
    CHECK(glob_match("web", "web"));
    CHECK_FALSE(glob_match("web", "web1"));
    CHECK_FALSE(glob_match("web1", "web"));
    CHECK(glob_match("web*", "web"));
    CHECK(glob_match("web*", "web-frontend-7"));
    CHECK_FALSE(glob_match("web*", "my-web"));
    CHECK(glob_match("*web", "my-web"));
    CHECK(glob_match("*:*", "tenant:42"));
    CHECK_FALSE(glob_match("*:*", "tenant42"));
    CHECK(glob_match("tenant:*", "tenant:"));
    CHECK(glob_match("a*b*c", "aXbYc"));
    CHECK(glob_match("a*b*c", "abc"));
    CHECK_FALSE(glob_match("a*b*c", "acb"));
    // The matcher must back up after a false start.
    CHECK(glob_match("*ab", "aab"));
    CHECK(glob_match("a*b", "abXb"));
    CHECK_FALSE(glob_match("a*b", "abXbc"));
    CHECK(glob_match("*aab", "aaaab"));
    // Only '*' is special, and case matters (PostgreSQL role and database names do).
    CHECK_FALSE(glob_match("?", "a"));
    CHECK(glob_match("?", "?"));
    CHECK_FALSE(glob_match("[ab]", "a"));
    CHECK(glob_match("[ab]", "[ab]"));
    CHECK(glob_match(R"(a\*)", R"(a\xyz)"));
    CHECK_FALSE(glob_match("Web*", "web-1"));
}

TEST_CASE("match: glob_match agrees with the plain definition", "[match]") {
    std::mt19937 random(20240601);
    auto word = [&](std::string_view alphabet, std::size_t max) {
        std::string out(random() % (max + 1), ' ');
        for (auto& c : out) c = alphabet[random() % alphabet.size()];
        return out;
    };
    for (int i = 0; i < 20000; ++i) {
        std::string pattern = word("ab*", 6);
        std::string text = word("ab", 8);
        INFO(pattern << " ~ " << text);
        REQUIRE(glob_match(pattern, text) == reference_glob(pattern, text));
    }
}

TEST_CASE("match: CIDR blocks parse", "[match]") {
    for (const char* good : {"10.0.0.0/8", "0.0.0.0/0", "192.168.1.7", "192.168.1.7/32", "::1", "::1/128",
                             "::/0", "fd00::/8", "::ffff:10.0.0.0/104", "2001:db8::/32"}) {
        INFO(good);
        CHECK(Cidr::parse(good).has_value());
    }
    for (const char* bad : {"", "/8", "10.0.0.0/", "10.0.0.0/33", "::/129", "10.0.0.0/8x", "10.0.0.0/x",
                            "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/ 8", "10.0.0.0/99999999999",
                            "10.0.0.256/8", "10.0.0/8", "host.example.com", "fd00::/8/8", "[::1]/128"}) {
        INFO(bad);
        CHECK_FALSE(Cidr::parse(bad).has_value());
    }
}

TEST_CASE("match: IPv4 prefixes", "[match]") {
    CHECK(cidr_contains("10.0.0.0/8", "10.0.0.0"));
    CHECK(cidr_contains("10.0.0.0/8", "10.255.255.255"));
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "11.0.0.0"));
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "9.255.255.255"));
    CHECK(cidr_contains("172.16.0.0/12", "172.31.255.255"));
    CHECK_FALSE(cidr_contains("172.16.0.0/12", "172.32.0.0"));
    CHECK_FALSE(cidr_contains("172.16.0.0/12", "172.15.255.255"));
    CHECK(cidr_contains("192.168.1.128/25", "192.168.1.200"));
    CHECK_FALSE(cidr_contains("192.168.1.128/25", "192.168.1.127"));
    CHECK(cidr_contains("192.168.1.6/31", "192.168.1.7"));
    CHECK_FALSE(cidr_contains("192.168.1.6/31", "192.168.1.8"));
    CHECK(cidr_contains("192.168.1.7", "192.168.1.7"));
    CHECK_FALSE(cidr_contains("192.168.1.7", "192.168.1.6"));
    CHECK(cidr_contains("0.0.0.0/0", "203.0.113.9"));
    CHECK(cidr_contains("128.0.0.0/1", "255.0.0.1"));
    CHECK_FALSE(cidr_contains("128.0.0.0/1", "127.255.255.255"));
}

TEST_CASE("match: IPv4 prefix math agrees with masking, at every length", "[match]") {
    std::mt19937 random(7);
    for (int prefix = 0; prefix <= 32; ++prefix) {
        std::uint32_t mask = prefix == 0 ? 0 : ~std::uint32_t(0) << (32 - prefix);
        for (int i = 0; i < 200; ++i) {
            std::uint32_t network = std::uint32_t(random()) & mask;
            // Half the addresses share the prefix, half differ in one random bit of it.
            std::uint32_t address = network | (std::uint32_t(random()) & ~mask);
            if (i % 2 == 1 && prefix > 0) address ^= std::uint32_t(1) << (31 - int(random() % unsigned(prefix)));
            std::string block = v4_text(network) + "/" + std::to_string(prefix);
            INFO(block << " contains " << v4_text(address));
            REQUIRE(cidr_contains(block, v4_text(address)) == ((address & mask) == network));
        }
    }
}

TEST_CASE("match: IPv6 prefixes", "[match]") {
    CHECK(cidr_contains("::1", "::1"));
    CHECK(cidr_contains("::1/128", "0:0:0:0:0:0:0:1"));
    CHECK_FALSE(cidr_contains("::1/128", "::2"));
    CHECK(cidr_contains("fd00::/8", "fdff:1234::5"));
    CHECK_FALSE(cidr_contains("fd00::/8", "fc00::1"));
    CHECK(cidr_contains("2001:db8::/32", "2001:db8:ffff::1"));
    CHECK_FALSE(cidr_contains("2001:db8::/32", "2001:db9::1"));
    CHECK(cidr_contains("2001:db8:0:1::/63", "2001:db8:0:0:ffff::"));
    CHECK_FALSE(cidr_contains("2001:db8:0:1::/63", "2001:db8:0:2::"));
    CHECK(cidr_contains("::/0", "2001:db8::1"));
}

TEST_CASE("match: IPv6 prefix math agrees with masking, at every length", "[match]") {
    std::mt19937 random(11);
    for (int prefix = 0; prefix <= 128; ++prefix) {
        for (int i = 0; i < 40; ++i) {
            std::array<std::uint8_t, 16> network{}, address{};
            for (auto& b : address) b = std::uint8_t(random());
            for (int bit = 0; bit < prefix; ++bit)
                if (address[std::size_t(bit / 8)] & (0x80u >> (bit % 8)))
                    network[std::size_t(bit / 8)] |= std::uint8_t(0x80u >> (bit % 8));
            if (i % 2 == 1 && prefix > 0) {
                int bit = int(random() % unsigned(prefix));
                address[std::size_t(bit / 8)] ^= std::uint8_t(0x80u >> (bit % 8));
            }
            // Avoid the mapped range, which stands for IPv4 clients.
            network[0] |= 0x20;
            address[0] |= 0x20;
            std::string block = v6_text(network) + "/" + std::to_string(prefix);
            INFO(block << " contains " << v6_text(address));
            REQUIRE(cidr_contains(block, v6_text(address)) == same_leading_bits(network, address, prefix));
        }
    }
}

TEST_CASE("match: families do not mix, except IPv4 clients on an IPv6 socket", "[match]") {
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "::1"));
    CHECK_FALSE(cidr_contains("::/0", "10.1.2.3"));
    CHECK_FALSE(cidr_contains("0.0.0.0/0", "2001:db8::1"));
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    CHECK(cidr_contains("10.0.0.0/8", "::ffff:10.1.2.3"));
    CHECK(cidr_contains("10.0.0.0/8", "::FFFF:a01:203"));
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "::ffff:11.1.2.3"));
    CHECK(cidr_contains("127.0.0.1", "::ffff:127.0.0.1"));
    // Only the mapped prefix is an IPv4 client: the older IPv4-compatible form is not.
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "::10.1.2.3"));
    CHECK_FALSE(cidr_contains("10.0.0.0/8", "0:0:0:0:0:fffe:a01:203"));
    // An IPv6 block written over the mapped range compares as IPv6.
    CHECK(cidr_contains("::ffff:10.0.0.0/104", "::ffff:10.1.2.3"));
    CHECK_FALSE(cidr_contains("::ffff:10.0.0.0/104", "::ffff:11.1.2.3"));
}

TEST_CASE("match: addresses that are not addresses match nothing", "[match]") {
    for (const char* address : {"", "unknown", "10.0.0.256", "10.1.2", "localhost", "::ffff:10.1.2.3.4"}) {
        INFO(address);
        CHECK_FALSE(cidr_contains("0.0.0.0/0", address));
        CHECK_FALSE(cidr_contains("::/0", address));
    }
}

TEST_CASE("match: a link-local client's zone does not hide its address", "[match]") {
    // Asio prints link-local peers with their zone ("fe80::1%eth0", "fe80::1%2");
    // PostgreSQL's pg_hba compares the address bits only.
    CHECK(cidr_contains("fe80::/10", "fe80::1%eth0"));
    CHECK(cidr_contains("fe80::/10", "fe80::1%2"));
    CHECK(cidr_contains("::/0", "fe80::abcd%lo"));
    CHECK_FALSE(cidr_contains("fd00::/8", "fe80::1%eth0"));
    CHECK_FALSE(cidr_contains("fe80::/10", "%eth0"));
}

TEST_CASE("match: KindSet names kinds and \"write\"", "[match]") {
    CHECK(KindSet().empty());
    CHECK(KindSet(std::vector<std::string>{}).empty());
    CHECK_FALSE(KindSet({"write"}).empty());
    CHECK_FALSE(KindSet({"select"}).empty());

    KindSet ddl({"ddl", "truncate"});
    CHECK(ddl.contains(StatementKind::kDdl));
    CHECK(ddl.contains(StatementKind::kTruncate));
    CHECK_FALSE(ddl.contains(StatementKind::kInsert));
    CHECK(ddl.matches(classify_one("CREATE TABLE t (a int)")));
    CHECK(ddl.matches(classify_one("TRUNCATE t")));
    CHECK_FALSE(ddl.matches(classify_one("INSERT INTO t VALUES (1)")));
    CHECK_FALSE(ddl.matches(classify_one("SELECT 1")));

    KindSet writes({"write"});
    for (const char* sql : {"INSERT INTO t VALUES (1)", "UPDATE t SET a = 1", "DELETE FROM t", "TRUNCATE t",
                            "CREATE INDEX ON t (a)", "SELECT nextval('s')", "SELECT * INTO n FROM t",
                            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DO $$ BEGIN END $$",
                            "COPY t FROM STDIN", "THIS IS NOT SQL"}) {
        INFO(sql);
        CHECK(writes.matches(classify_one(sql)));
    }
    for (const char* sql : {"SELECT 1", "SELECT * FROM t FOR UPDATE", "BEGIN", "COMMIT", "SET a.b = 1",
                            "SHOW a.b", "COPY t TO STDOUT", "EXPLAIN SELECT 1"}) {
        INFO(sql);
        CHECK_FALSE(writes.matches(classify_one(sql)));
    }
    // "write" does not name the kinds themselves: SELECT nextval is a write of kind select.
    CHECK_FALSE(writes.contains(StatementKind::kInsert));

    KindSet select_or_write({"select", "write"});
    CHECK(select_or_write.matches(classify_one("SELECT 1")));
    CHECK(select_or_write.matches(classify_one("DELETE FROM t")));
    CHECK_FALSE(select_or_write.matches(classify_one("BEGIN")));
}

TEST_CASE("match: every kind name selects exactly its kind", "[match]") {
    for (std::size_t i = 0; i < kStatementKindCount; ++i) {
        auto kind = static_cast<StatementKind>(i);
        KindSet set({pgwarden::policy::to_string(kind)});
        INFO(pgwarden::policy::to_string(kind));
        CHECK_FALSE(set.empty());
        for (std::size_t j = 0; j < kStatementKindCount; ++j)
            CHECK(set.contains(static_cast<StatementKind>(j)) == (i == j));
        StatementInfo statement;
        statement.kind = kind;
        statement.is_write = false;
        CHECK(set.matches(statement));
    }
}

TEST_CASE("match: table patterns", "[match]") {
    CHECK(table_matches("orders", "orders"));
    CHECK_FALSE(table_matches("orders", "orders2"));
    CHECK(table_matches("audit.*", "audit.log"));
    CHECK_FALSE(table_matches("audit.*", "auditing.log"));
    CHECK_FALSE(table_matches("audit.*", "log"));
    // Unqualified names are in schema public.
    CHECK(table_matches("public.orders", "orders"));
    CHECK(table_matches("public.*", "orders"));
    CHECK(table_matches("*.orders", "orders"));
    CHECK_FALSE(table_matches("shop.orders", "orders"));
    // An unqualified pattern names the table in any schema.
    CHECK(table_matches("orders", "shop.orders"));
    CHECK(table_matches("ord*", "shop.orders"));
    CHECK_FALSE(table_matches("orders", "orders.items"));
    CHECK(table_matches("*.secrets", "vault.secrets"));
    CHECK_FALSE(table_matches("*.secrets", "vault.secrets_log"));
    CHECK(table_matches("*", "anything"));
    CHECK(table_matches("*", "s.anything"));
    CHECK(table_matches("*.*", "t"));
    // "public." is put in front of names of any length (longer than the stack buffer too).
    const std::string long_name(200, 'x');
    CHECK(table_matches("public.x*", long_name));
    CHECK(table_matches("*." + long_name, long_name));
    CHECK_FALSE(table_matches("public.y*", long_name));
    // A compiled pattern is reused for many names.
    const pgwarden::policy::TablePattern audit("*.audit_0");
    CHECK(audit.matches("audit_0"));
    CHECK(audit.matches("s.audit_0"));
    CHECK_FALSE(audit.matches("pgbench_accounts"));
    CHECK_FALSE(audit.matches("s.audit_01"));
    // Quoted names keep their case; patterns compare exactly.
    CHECK(table_matches("Mixed.Case", "Mixed.Case"));
    CHECK_FALSE(table_matches("mixed.case", "Mixed.Case"));
}

TEST_CASE("match: an empty match matches every client and statement", "[match]") {
    Matcher matcher{Match{}};
    CHECK(matcher.matches_client(client("u", "d", "", ""), ""));
    CHECK(matcher.matches_client(client("alice", "shop", "web", "10.0.0.1"), "tenant:1"));
    CHECK(matcher.matches_statement(classify_one("SELECT 1")));
    CHECK(matcher.matches_statement(classify_one("DROP TABLE t")));
    CHECK(Matcher().matches_client(client("u", "d", "", ""), "x"));
}

TEST_CASE("match: each client field narrows the match", "[match]") {
    const ClientIdentity alice = client("alice", "shop", "web-1", "10.1.2.3");
    auto matches = [&](Match m, std::string_view name = "tenant:42") {
        return Matcher(m).matches_client(alice, name);
    };
    CHECK(matches({.user = {"alice"}}));
    CHECK(matches({.user = {"bob", "al*"}}));
    CHECK_FALSE(matches({.user = {"bob"}}));
    CHECK(matches({.database = {"shop"}}));
    CHECK_FALSE(matches({.database = {"shop2"}}));
    CHECK(matches({.application_name = {"web*"}}));
    CHECK_FALSE(matches({.application_name = {"worker*"}}));
    CHECK(matches({.client = {"tenant:*"}}));
    CHECK_FALSE(matches({.client = {"tenant:7"}}));
    CHECK_FALSE(matches({.client = {"tenant:*"}}, "unknown"));
    CHECK(matches({.address = {"10.0.0.0/8"}}));
    CHECK(matches({.address = {"192.168.0.0/16", "10.1.2.3"}}));
    CHECK_FALSE(matches({.address = {"192.168.0.0/16"}}));
    // Every field given must match.
    CHECK(matches({.user = {"alice"}, .database = {"shop"}, .application_name = {"web*"}, .client = {"tenant:*"},
                   .address = {"10.0.0.0/8"}}));
    CHECK_FALSE(matches({.user = {"alice"}, .database = {"shop"}, .application_name = {"web*"},
                         .client = {"tenant:*"}, .address = {"172.16.0.0/12"}}));
    CHECK_FALSE(matches({.user = {"bob"}, .database = {"shop"}}));
}

TEST_CASE("match: addresses of clients on a dual-stack listener", "[match]") {
    Matcher private_v4({.address = {"10.0.0.0/8"}});
    CHECK(private_v4.matches_client(client("u", "d", "", "::ffff:10.9.8.7"), ""));
    CHECK_FALSE(private_v4.matches_client(client("u", "d", "", "::1"), ""));
    CHECK_FALSE(private_v4.matches_client(client("u", "d", "", "unknown"), ""));
    Matcher loopback({.address = {"127.0.0.1", "::1"}});
    CHECK(loopback.matches_client(client("u", "d", "", "::1"), ""));
    CHECK(loopback.matches_client(client("u", "d", "", "127.0.0.1"), ""));
    CHECK_FALSE(loopback.matches_client(client("u", "d", "", "127.0.0.2"), ""));
}

TEST_CASE("match: statement kinds and tables", "[match]") {
    Matcher ddl_on_audit({.statements = {"ddl", "truncate"}, .tables = {"audit.*"}});
    CHECK(ddl_on_audit.matches_statement(classify_one("TRUNCATE audit.log")));
    CHECK(ddl_on_audit.matches_statement(classify_one("ALTER TABLE audit.log ADD COLUMN x int")));
    CHECK_FALSE(ddl_on_audit.matches_statement(classify_one("TRUNCATE public.log")));
    CHECK_FALSE(ddl_on_audit.matches_statement(classify_one("DELETE FROM audit.log")));
    // Any one of the statement's tables is enough.
    CHECK(ddl_on_audit.matches_statement(classify_one("TRUNCATE public.a, audit.b")));

    Matcher tables_only({.tables = {"orders", "*.secrets"}});
    CHECK(tables_only.matches_statement(classify_one("SELECT * FROM shop.orders")));
    CHECK(tables_only.matches_statement(classify_one("UPDATE vault.secrets SET v = 1")));
    CHECK(tables_only.matches_statement(classify_one("SELECT * FROM x JOIN secrets ON true")));
    CHECK_FALSE(tables_only.matches_statement(classify_one("SELECT * FROM customers")));
    // A statement that names no table cannot match a table pattern.
    CHECK_FALSE(tables_only.matches_statement(classify_one("SELECT 1")));
    CHECK_FALSE(tables_only.matches_statement(classify_one("BEGIN")));

    Matcher writes({.statements = {"write"}});
    CHECK(writes.matches_statement(classify_one("INSERT INTO t VALUES (1)")));
    CHECK_FALSE(writes.matches_statement(classify_one("SELECT * FROM t")));
}

TEST_CASE("match: compiled globs agree with glob_match", "[match]") {
    const std::vector<std::string> patterns = {"",      "*",     "**",    "web",  "web*",  "*web", "*:*",
                                               "a*b*c", "tenant:*", "*ab", "a*b", "*aab", "w*b*"};
    const std::vector<std::string> texts = {"",        "web",  "web1", "my-web", "tenant:42", "tenant",
                                            "aXbYc",   "abc",  "acb",  "aab",    "aaaab",     "abXbc", "wb"};
    for (const auto& p : patterns) {
        const pgwarden::policy::Glob glob(p);
        const pgwarden::policy::Glob copied = glob;  // copies keep working
        for (const auto& t : texts) {
            INFO(p << " ~ " << t);
            CHECK(glob.matches(t) == glob_match(p, t));
            CHECK(copied.matches(t) == glob_match(p, t));
        }
    }
}

TEST_CASE("match: a glob over two joined pieces agrees with the joined text", "[match]") {
    // matches_joined("public.", name) stands for matching "public.<name>": every shape of
    // pattern, cut at every place of every text.
    const std::vector<std::string> patterns = {"",         "*",        "public.orders", "public.*", "*.orders",
                                               "pub*",     "*ders",    "public.ord*",   "*c.orders", "p*c.*s",
                                               "orders",   "*.audit_0", "nosuch_0.*",   "public.orders.x"};
    const std::vector<std::string> texts = {"", "public.orders", "public.", "orders", "public.ordersx",
                                            "x.orders", "public.audit_0", "pub"};
    for (const auto& p : patterns) {
        const pgwarden::policy::Glob glob(p);
        for (const auto& t : texts) {
            for (std::size_t cut = 0; cut <= t.size(); ++cut) {
                INFO(p << " ~ " << t << " cut at " << cut);
                CHECK(glob.matches_joined(std::string_view(t).substr(0, cut), std::string_view(t).substr(cut)) ==
                      glob_match(p, t));
            }
        }
    }
}
