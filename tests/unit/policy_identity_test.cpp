// Tests for ClientIdentity: startup options, SET/SET LOCAL/RESET tracking through
// transactions and savepoints, and resolving the client name from identity sources.
// Every expected setting value below was observed on PostgreSQL 15 with the same statements.
#include <catch2/catch.hpp>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "policy/classifier.hpp"
#include "policy/config.hpp"
#include "policy/identity.hpp"

namespace {

using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;
using pgwarden::policy::ClientIdentity;
using pgwarden::policy::IdentityConfig;
using pgwarden::policy::parse_startup_options;
using pgwarden::policy::StatementInfo;
using pgwarden::policy::StatementKind;
using Parameters = std::vector<std::pair<std::string, std::string>>;

StatementInfo classify_one(std::string_view sql) {
    static Classifier classifier{ClassifyConfig{}};
    auto result = classifier.classify(sql);
    REQUIRE(result->statements.size() == 1);
    return result->statements.front();
}

// Drives a ClientIdentity the way the server executes statements sent one Query each (as
// psql sends the lines of a script), including an aborted block that ignores all but its end.
class Session {
public:
    explicit Session(Parameters startup = {{"user", "app"}}) : identity_(startup, "127.0.0.1") {}

    void run(std::string_view sql) {
        StatementInfo s = classify_one(sql);
        const bool ends_abort = s.kind == StatementKind::kCommit || s.kind == StatementKind::kRollback ||
                                s.kind == StatementKind::kRollbackTo;
        if (failed_ && !ends_abort) return;  // 25P02: the server runs nothing else in an aborted block
        switch (s.kind) {
            case StatementKind::kBegin:
                if (!in_block_) identity_.begin_transaction();
                in_block_ = true;
                break;
            case StatementKind::kCommit:
                if (failed_) identity_.rollback_transaction();
                else identity_.commit_transaction();
                end_block(s.chain);
                break;
            case StatementKind::kRollback:
                identity_.rollback_transaction();
                end_block(s.chain);
                break;
            case StatementKind::kSavepoint: identity_.savepoint(s.savepoint); break;
            case StatementKind::kRelease: identity_.release_savepoint(s.savepoint); break;
            case StatementKind::kRollbackTo:
                identity_.rollback_to_savepoint(s.savepoint);
                failed_ = false;
                break;
            case StatementKind::kSet: identity_.apply_set(s, in_block_); break;
            default: break;
        }
    }
    // A statement fails inside the block (SELECT 1/0).
    void fail() { failed_ = in_block_; }

    std::string value(std::string_view name = "pgw.c") const { return std::string(identity_.setting(name)); }
    const ClientIdentity& identity() const { return identity_; }

private:
    void end_block(bool chain) {
        in_block_ = chain;
        failed_ = false;
        if (chain) identity_.begin_transaction();
    }

    ClientIdentity identity_;
    bool in_block_ = false;
    bool failed_ = false;
};

}  // namespace

TEST_CASE("identity: startup options in the forms libpq and PGOPTIONS use", "[identity]") {
    CHECK(parse_startup_options("-c pgw.c=a") == Parameters{{"pgw.c", "a"}});
    CHECK(parse_startup_options("-cpgw.c=a") == Parameters{{"pgw.c", "a"}});
    CHECK(parse_startup_options("--pgw.c=a") == Parameters{{"pgw.c", "a"}});
    CHECK(parse_startup_options("  -c\tpgw.a=1 \n --pgw.b=2  -cpgw.c=3 ") ==
          Parameters{{"pgw.a", "1"}, {"pgw.b", "2"}, {"pgw.c", "3"}});
    CHECK(parse_startup_options("").empty());
    CHECK(parse_startup_options("   ").empty());
}

TEST_CASE("identity: startup option escapes, names and values", "[identity]") {
    // libpq escapes spaces and backslashes with a backslash; pg_split_opts undoes it.
    CHECK(parse_startup_options(R"(-c pgw.c=a\ b\\c)") == Parameters{{"pgw.c", R"(a b\c)"}});
    // Names are case-insensitive and '-' means '_' (ParseLongOption); values are kept as given.
    CHECK(parse_startup_options("-c PGW-X.Client=Tenant-7") == Parameters{{"pgw_x.client", "Tenant-7"}});
    CHECK(parse_startup_options("-c pgw.c=x=y") == Parameters{{"pgw.c", "x=y"}});
    CHECK(parse_startup_options("-c pgw.c=") == Parameters{{"pgw.c", ""}});
}

TEST_CASE("identity: startup options that set nothing are skipped", "[identity]") {
    CHECK(parse_startup_options("-c noequals").empty());
    CHECK(parse_startup_options("-c =value").empty());
    CHECK(parse_startup_options("-c").empty());
    CHECK(parse_startup_options("--").empty());
    CHECK(parse_startup_options("-d 5 -B 100 -c pgw.c=a plain") == Parameters{{"pgw.c", "a"}});
}

TEST_CASE("identity: startup parameters", "[identity]") {
    ClientIdentity identity({{"user", "alice"}, {"database", "shop"}, {"application_name", "web-1"},
                             {"client_encoding", "UTF8"}, {"options", "-c pgw.c=opt"}},
                            "10.1.2.3");
    CHECK(identity.user() == "alice");
    CHECK(identity.database() == "shop");
    CHECK(identity.application_name() == "web-1");
    CHECK(identity.address() == "10.1.2.3");
    CHECK(identity.setting("pgw.c") == "opt");
    // Any other parameter is a setting too, with the name case-folded.
    CHECK(identity.setting("client_encoding") == "UTF8");
    CHECK(identity.setting("application_name") == "web-1");
    // Protocol fields are not settings.
    CHECK(identity.setting("user").empty());
    CHECK(identity.setting("database").empty());
    CHECK(identity.setting("options").empty());
    CHECK(identity.setting("pgw.unset").empty());

    ClientIdentity upper({{"user", "bob"}, {"PGW.Client", "x"}}, "");
    CHECK(upper.setting("pgw.client") == "x");
}

TEST_CASE("identity: the database defaults to the user name", "[identity]") {
    CHECK(ClientIdentity({{"user", "alice"}}, "").database() == "alice");
    CHECK(ClientIdentity({{"user", "alice"}, {"database", ""}}, "").database() == "alice");
}

TEST_CASE("identity: a startup parameter overrides the same setting in options", "[identity]") {
    // The server applies `options` first and the other parameters after, whatever their order.
    ClientIdentity options_last({{"user", "u"}, {"pgw.c", "direct"}, {"options", "-c pgw.c=opt"}}, "");
    ClientIdentity options_first({{"user", "u"}, {"options", "-c pgw.c=opt"}, {"pgw.c", "direct"}}, "");
    CHECK(options_last.setting("pgw.c") == "direct");
    CHECK(options_first.setting("pgw.c") == "direct");
    // Within options, the last assignment wins.
    ClientIdentity twice({{"user", "u"}, {"options", "--pgw.c=a -cpgw.c=b"}}, "");
    CHECK(twice.setting("pgw.c") == "b");
}

TEST_CASE("identity: SET outside a block lasts; SET LOCAL there does nothing", "[identity]") {
    Session s;
    s.run("SET pgw.c = 'one'");
    CHECK(s.value() == "one");
    s.run("SET LOCAL pgw.c = 'two'");  // WARNING: SET LOCAL can only be used in transaction blocks
    CHECK(s.value() == "one");
    s.run("SET pgw.c TO 'three'");
    CHECK(s.value() == "three");
    s.run("SET PGW.C = 'four'");
    CHECK(s.value() == "four");
}

TEST_CASE("identity: SET in a block is kept by COMMIT and undone by ROLLBACK", "[identity]") {
    Session s;
    s.run("SET pgw.c = 'before'");
    s.run("BEGIN");
    s.run("SET pgw.c = 'kept'");
    CHECK(s.value() == "kept");
    s.run("COMMIT");
    CHECK(s.value() == "kept");

    s.run("START TRANSACTION");
    s.run("SET pgw.c = 'undone'");
    CHECK(s.value() == "undone");
    s.run("ROLLBACK");
    CHECK(s.value() == "kept");

    // An error aborts the block: even COMMIT then rolls back.
    s.run("BEGIN");
    s.run("SET pgw.c = 'lost'");
    s.fail();
    s.run("COMMIT");
    CHECK(s.value() == "kept");
}

TEST_CASE("identity: SET LOCAL lasts until the block ends", "[identity]") {
    Session s;
    s.run("SET pgw.c = 'session'");
    s.run("BEGIN");
    s.run("SET LOCAL pgw.c = 'local'");
    CHECK(s.value() == "local");
    s.run("COMMIT");
    CHECK(s.value() == "session");

    s.run("BEGIN");
    s.run("SET LOCAL pgw.c = 'local'");
    s.run("ROLLBACK");
    CHECK(s.value() == "session");
}

TEST_CASE("identity: SET and SET LOCAL in one block", "[identity]") {
    Session s({{"user", "u"}, {"options", "-c pgw.c=start"}});
    // SET then SET LOCAL: the local value until the end, then SET's.
    s.run("BEGIN");
    s.run("SET pgw.c = 's'");
    s.run("SET LOCAL pgw.c = 'l'");
    CHECK(s.value() == "l");
    s.run("COMMIT");
    CHECK(s.value() == "s");
    // SET LOCAL then SET: SET replaces both and is committed.
    s.run("BEGIN");
    s.run("SET LOCAL pgw.c = 'l'");
    s.run("SET pgw.c = 's2'");
    CHECK(s.value() == "s2");
    s.run("COMMIT");
    CHECK(s.value() == "s2");
    // SET LOCAL ... TO DEFAULT: the startup value, for this block only.
    s.run("BEGIN");
    s.run("SET LOCAL pgw.c TO DEFAULT");
    CHECK(s.value() == "start");
    s.run("COMMIT");
    CHECK(s.value() == "s2");
}

TEST_CASE("identity: savepoints undo and keep settings as the server does", "[identity]") {
    Session s;
    s.run("BEGIN");
    s.run("SET LOCAL pgw.c = 'l1'");
    s.run("SAVEPOINT a");
    s.run("SET pgw.c = 's2'");
    CHECK(s.value() == "s2");
    s.run("ROLLBACK TO a");
    CHECK(s.value() == "l1");
    s.run("SET pgw.c = 's3'");
    s.run("RELEASE a");
    CHECK(s.value() == "s3");
    s.run("COMMIT");
    CHECK(s.value() == "s3");

    // SET LOCAL inside a released savepoint lasts until the end of the whole block.
    s.run("BEGIN");
    s.run("SET pgw.c = 's4'");
    s.run("SAVEPOINT b");
    s.run("SET LOCAL pgw.c = 'l5'");
    s.run("RELEASE b");
    CHECK(s.value() == "l5");
    s.run("COMMIT");
    CHECK(s.value() == "s4");
}

TEST_CASE("identity: ROLLBACK TO keeps its savepoint; names repeat", "[identity]") {
    Session s;
    s.run("SET pgw.c = 's4'");
    s.run("BEGIN");
    s.run("SET pgw.c = 's6'");
    s.run("SAVEPOINT x");
    s.run("SET pgw.c = 'between'");
    s.run("SAVEPOINT x");
    s.run("SET pgw.c = 's7'");
    s.run("ROLLBACK TO x");  // the newer x
    CHECK(s.value() == "between");
    s.run("SET pgw.c = 's8'");
    s.run("ROLLBACK TO SAVEPOINT x");  // still the newer x: ROLLBACK TO does not destroy it
    CHECK(s.value() == "between");
    s.run("RELEASE x");  // releases the newer x; the older one remains
    CHECK(s.value() == "between");
    s.run("ROLLBACK TO x");
    CHECK(s.value() == "s6");
    s.run("ROLLBACK");
    CHECK(s.value() == "s4");
}

TEST_CASE("identity: RELEASE destroys later savepoints too", "[identity]") {
    Session s;
    s.run("BEGIN");
    s.run("SAVEPOINT outer_sp");
    s.run("SET pgw.c = 'a'");
    s.run("SAVEPOINT inner_sp");
    s.run("SET pgw.c = 'b'");
    s.run("RELEASE outer_sp");
    // inner_sp no longer exists: ROLLBACK TO it fails, undoing nothing and aborting the block.
    s.run("ROLLBACK TO inner_sp");
    s.fail();
    CHECK(s.value() == "b");
    s.run("COMMIT");
    CHECK(s.value().empty());
}

TEST_CASE("identity: ROLLBACK TO recovers an aborted block", "[identity]") {
    Session s;
    s.run("SET pgw.c = 's2'");
    s.run("BEGIN");
    s.run("SAVEPOINT a");
    s.run("SET pgw.c = 'u'");
    s.fail();
    s.run("ROLLBACK TO a");
    CHECK(s.value() == "s2");
    s.run("SET LOCAL pgw.c = 'v'");
    CHECK(s.value() == "v");
    s.run("COMMIT");
    CHECK(s.value() == "s2");
}

TEST_CASE("identity: a savepoint from an earlier block is gone", "[identity]") {
    Session s;
    s.run("BEGIN");
    s.run("SAVEPOINT a");
    s.run("COMMIT");
    s.run("BEGIN");
    s.run("SET pgw.c = 'x'");
    s.run("ROLLBACK TO a");  // no such savepoint in this block: an error, nothing undone
    s.fail();
    CHECK(s.value() == "x");
    s.run("COMMIT");
    CHECK(s.value().empty());
}

TEST_CASE("identity: COMMIT AND CHAIN starts the next block at once", "[identity]") {
    Session s;
    s.run("BEGIN");
    s.run("SET pgw.c = 'm'");
    s.run("COMMIT AND CHAIN");
    s.run("SET pgw.c = 'n'");
    CHECK(s.value() == "n");
    s.run("ROLLBACK");
    CHECK(s.value() == "m");
}

TEST_CASE("identity: RESET returns to the startup value", "[identity]") {
    Session s({{"user", "u"}, {"options", "-c pgw.c=start"}});
    CHECK(s.value() == "start");
    s.run("SET pgw.c = 's1'");
    s.run("RESET pgw.c");
    CHECK(s.value() == "start");
    s.run("SET pgw.c = 's2'");
    s.run("SET pgw.c TO DEFAULT");
    CHECK(s.value() == "start");

    // RESET in a savepoint that is rolled back is undone like any SET.
    s.run("SET pgw.c = 's2'");
    s.run("BEGIN");
    s.run("SAVEPOINT a");
    s.run("RESET pgw.c");
    CHECK(s.value() == "start");
    s.run("ROLLBACK TO SAVEPOINT a");
    CHECK(s.value() == "s2");
    s.run("COMMIT");
    CHECK(s.value() == "s2");
}

TEST_CASE("identity: RESET of a setting with no startup value empties it", "[identity]") {
    Session s({{"user", "u"}, {"options", "-c pgw.other=o"}});
    s.run("SET pgw.c = 'x'");
    s.run("RESET pgw.c");
    CHECK(s.value().empty());
    CHECK(s.value("pgw.other") == "o");
}

TEST_CASE("identity: RESET ALL and DISCARD ALL", "[identity]") {
    Session s({{"user", "u"}, {"options", "-c pgw.c=start"}, {"pgw.direct", "d"}});
    s.run("SET pgw.c = 'z'");
    s.run("SET pgw.direct = 'e'");
    s.run("SET pgw.extra = 'x'");
    s.run("RESET ALL");
    CHECK(s.value() == "start");
    CHECK(s.value("pgw.direct") == "d");
    CHECK(s.value("pgw.extra").empty());

    // RESET ALL overrides SET LOCAL, and is undone by ROLLBACK.
    s.run("SET pgw.c = 's'");
    s.run("BEGIN");
    s.run("SET LOCAL pgw.c = 'l'");
    s.run("RESET ALL");
    CHECK(s.value() == "start");
    s.run("SET pgw.c = 'q'");
    s.run("ROLLBACK");
    CHECK(s.value() == "s");

    s.run("DISCARD ALL");
    CHECK(s.value() == "start");
}

TEST_CASE("identity: resolve takes the first source with a value", "[identity]") {
    IdentityConfig config;  // comment:client, setting:pgwarden.client, application_name, user
    Session s({{"user", "alice"}, {"application_name", "web"}});
    const ClientIdentity& identity = s.identity();
    StatementInfo plain = classify_one("SELECT 1");
    StatementInfo tagged = classify_one("SELECT 1 /* client='tenant%3A42',route='%2Fhome' */");
    StatementInfo other_tag = classify_one("/* route='x' */ SELECT 1");

    CHECK(identity.resolve(config, &plain) == "web");
    CHECK(identity.resolve(config, &tagged) == "tenant:42");
    CHECK(identity.resolve(config, &other_tag) == "web");
    CHECK(identity.resolve(config, nullptr) == "web");

    s.run("SET pgwarden.client = 'from-set'");
    CHECK(identity.resolve(config, &plain) == "from-set");
    CHECK(identity.resolve(config, &tagged) == "tenant:42");  // per statement, the comment wins

    // An emptied setting has no value: the next source names the client.
    s.run("RESET pgwarden.client");
    CHECK(identity.resolve(config, &plain) == "web");
    s.run("SET pgwarden.client = ''");
    CHECK(identity.resolve(config, &plain) == "web");

    ClientIdentity no_app({{"user", "bob"}}, "");
    CHECK(no_app.resolve(config, &plain) == "bob");
}

TEST_CASE("identity: resolve follows SET LOCAL and rollbacks", "[identity]") {
    IdentityConfig config;
    Session s({{"user", "alice"}, {"options", "-c pgwarden.client=tenant:1"}});
    const ClientIdentity& identity = s.identity();
    CHECK(identity.resolve(config, nullptr) == "tenant:1");
    s.run("BEGIN");
    s.run("SET LOCAL pgwarden.client = 'tenant:2'");
    CHECK(identity.resolve(config, nullptr) == "tenant:2");
    s.run("ROLLBACK");
    CHECK(identity.resolve(config, nullptr) == "tenant:1");
}

TEST_CASE("identity: version() moves with every change resolve() could see", "[identity]") {
    // The interceptor keeps the name of untagged statements while version() stays the
    // same: a change that kept it would leave a stale client name.
    IdentityConfig config;
    config.sources = {"setting:pgwarden.client", "application_name", "user"};
    Session s(Parameters{{"user", "alice"}});
    const ClientIdentity& identity = s.identity();
    auto step = [&](std::string_view sql, std::string_view expected) {
        const auto before = identity.version();
        s.run(sql);
        CHECK(identity.version() != before);
        CHECK(identity.resolve(config, nullptr) == expected);
    };
    CHECK(identity.resolve(config, nullptr) == "alice");
    step("SET pgwarden.client = 'a'", "a");
    step("BEGIN", "a");
    step("SET pgwarden.client = 'b'", "b");
    step("SAVEPOINT s", "b");
    step("SET LOCAL pgwarden.client = 'c'", "c");
    step("ROLLBACK TO SAVEPOINT s", "b");
    step("SET LOCAL pgwarden.client = 'd'", "d");
    step("RELEASE SAVEPOINT s", "d");
    step("ROLLBACK", "a");
    step("RESET pgwarden.client", "alice");

    ClientIdentity other({{"user", "bob"}}, "");
    const auto before = other.version();
    other.set_application_name("worker");
    CHECK(other.version() != before);
    CHECK(other.resolve(config, nullptr) == "worker");
    // A copy is the same state: it shares the version until one of them changes.
    ClientIdentity copy = other;
    CHECK(copy.version() == other.version());
    copy.set_application_name("batch");
    CHECK(copy.version() != other.version());
}

TEST_CASE("identity: every kind of source", "[identity]") {
    ClientIdentity identity({{"user", "alice"}, {"database", "shop"}, {"application_name", "web"}}, "::1");
    StatementInfo statement;
    statement.tags = {{"app", "billing"}};
    auto resolve = [&](std::vector<std::string> sources) {
        IdentityConfig config;
        config.sources = std::move(sources);
        return identity.resolve(config, &statement);
    };
    CHECK(resolve({"database"}) == "shop");
    CHECK(resolve({"address"}) == "::1");
    CHECK(resolve({"user", "database"}) == "alice");
    CHECK(resolve({"comment:app", "user"}) == "billing");
    CHECK(resolve({"comment:client", "setting:pgw.none", "database"}) == "shop");
    // No source has a value.
    CHECK(resolve({"comment:client", "setting:pgw.none"}) == "unknown");
    CHECK(resolve({}) == "unknown");
}

TEST_CASE("identity: set_application_name follows the server's ParameterStatus", "[identity]") {
    ClientIdentity identity({{"user", "alice"}, {"application_name", "web"}}, "");
    identity.set_application_name("worker");
    CHECK(identity.application_name() == "worker");
    IdentityConfig config;
    CHECK(identity.resolve(config, nullptr) == "worker");
}
