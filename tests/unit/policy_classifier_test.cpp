// Tests for the statement classifier: kinds, write detection, splitting, SET tracking,
// sqlcommenter tags and the LRU cache, against PostgreSQL's own parser (libpg_query).
#include <catch2/catch.hpp>

#include <set>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "policy/classifier.hpp"

namespace {

using pgwarden::policy::Classification;
using pgwarden::policy::Classifier;
using pgwarden::policy::ClassifyConfig;
using pgwarden::policy::StatementInfo;
using pgwarden::policy::StatementKind;
using pgwarden::policy::statement_shape;
using K = StatementKind;

struct Case {
    std::string sql;
    StatementKind kind;
    bool write;
    std::vector<std::string> tables = {};
};

// One statement each; `tables` is checked exactly.
const std::vector<Case>& corpus() {
    // One case a line reads better than clang-format's layout.
    // clang-format off
    static const std::vector<Case> cases = {
        // Reads.
        {"SELECT 1", K::kSelect, false},
        {"select * from accounts where id = 7", K::kSelect, false, {"accounts"}},
        {"VALUES (1), (2)", K::kSelect, false},
        {"TABLE public.accounts", K::kSelect, false, {"public.accounts"}},
        {"SELECT a.x FROM s1.a JOIN b ON a.id = b.id", K::kSelect, false, {"s1.a", "b"}},
        {"SELECT * FROM t WHERE x IN (SELECT y FROM u)", K::kSelect, false, {"t", "u"}},
        {"SELECT currval('s')", K::kSelect, false},
        {"WITH c AS (SELECT * FROM base) SELECT * FROM c JOIN other ON true", K::kSelect, false,
         {"base", "other"}},
        {"WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
         "SELECT * FROM r", K::kSelect, false},
        // SELECT ... INTO creates a table.
        {"SELECT * INTO newtab FROM t", K::kSelect, true, {"newtab", "t"}},
        {"SELECT 1 AS a INTO TEMP t2 UNION SELECT 2", K::kSelect, true, {"t2"}},
        // Data-modifying WITH, at any depth.
        {"WITH d AS (DELETE FROM q RETURNING *) SELECT * FROM d", K::kSelect, true, {"q"}},
        {"WITH a AS (WITH b AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM b) "
         "SELECT * FROM a", K::kSelect, true, {"t"}},
        {"SELECT * FROM (WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x) s",
         K::kSelect, true, {"t"}},
        {"INSERT INTO log WITH d AS (DELETE FROM q RETURNING *) SELECT * FROM d", K::kInsert, true,
         {"log", "q"}},
        // Write functions, wherever they are called.
        {"SELECT nextval('seq')", K::kSelect, true},
        {"SELECT pg_catalog.nextval('seq')", K::kSelect, true},
        {"SELECT NEXTVAL('seq')", K::kSelect, true},
        {"SELECT * FROM nextval('seq')", K::kSelect, true},
        {"SELECT setval('seq', 10, false)", K::kSelect, true},
        {"SELECT * FROM t WHERE id IN (SELECT setval('s', 1))", K::kSelect, true, {"t"}},
        {"SELECT x FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.v = (SELECT nextval('s')))",
         K::kSelect, true, {"t", "u"}},
        {"SELECT 'nextval(1)', \"nextval\" FROM t", K::kSelect, false, {"t"}},
        // DML.
        {"INSERT INTO t (a) VALUES (1)", K::kInsert, true, {"t"}},
        {"INSERT INTO s.t SELECT * FROM u ON CONFLICT (id) DO UPDATE SET a = excluded.a",
         K::kInsert, true, {"s.t", "u"}},
        {"UPDATE t SET a = a + 1 WHERE id = 2", K::kUpdate, true, {"t"}},
        {"DELETE FROM t USING u WHERE t.id = u.id", K::kDelete, true, {"t", "u"}},
        {"MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v "
         "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)", K::kMerge, true, {"t", "s"}},
        // COPY.
        {"COPY t FROM STDIN", K::kCopyIn, true, {"t"}},
        {"COPY s.t (a, b) FROM '/tmp/x.csv' WITH (FORMAT csv)", K::kCopyIn, true, {"s.t"}},
        {"COPY t TO STDOUT", K::kCopyOut, false, {"t"}},
        {"COPY (SELECT * FROM t JOIN u USING (id)) TO STDOUT", K::kCopyOut, false, {"t", "u"}},
        {"COPY (DELETE FROM t RETURNING *) TO STDOUT", K::kCopyOut, true, {"t"}},
        // DDL.
        {"CREATE TABLE s.t (id int PRIMARY KEY)", K::kDdl, true, {"s.t"}},
        {"CREATE TEMP TABLE scratch (id int)", K::kDdl, true, {"scratch"}},
        {"ALTER TABLE t ADD COLUMN c text", K::kDdl, true, {"t"}},
        {"DROP TABLE a, s.b", K::kDdl, true, {"a", "s.b"}},
        {"DROP FUNCTION f(int)", K::kDdl, true},
        {"CREATE INDEX CONCURRENTLY i ON t (a)", K::kDdl, true, {"t"}},
        {"GRANT SELECT ON t TO bob", K::kDdl, true, {"t"}},
        {"REVOKE ALL ON t FROM bob", K::kDdl, true, {"t"}},
        {"COMMENT ON TABLE t IS 'x'", K::kDdl, true},
        {"CREATE TABLE t2 AS SELECT * FROM t", K::kDdl, true, {"t2", "t"}},
        {"CREATE MATERIALIZED VIEW mv AS SELECT 1", K::kDdl, true, {"mv"}},
        {"REFRESH MATERIALIZED VIEW mv", K::kDdl, true, {"mv"}},
        {"CREATE VIEW v AS SELECT * FROM t", K::kDdl, true, {"v", "t"}},
        {"CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; SELECT 2 $$", K::kDdl, true},
        {"CREATE SCHEMA app", K::kDdl, true},
        {"CREATE ROLE bob LOGIN", K::kDdl, true},
        {"ALTER SYSTEM SET work_mem = '64MB'", K::kDdl, true},
        {"CREATE SEQUENCE s.seq", K::kDdl, true, {"s.seq"}},
        {"TRUNCATE a, s.b RESTART IDENTITY", K::kTruncate, true, {"a", "s.b"}},
        // Transaction control.
        {"BEGIN", K::kBegin, false},
        {"BEGIN ISOLATION LEVEL REPEATABLE READ", K::kBegin, false},
        {"START TRANSACTION READ ONLY", K::kBegin, false},
        {"COMMIT", K::kCommit, false},
        {"END", K::kCommit, false},
        {"ROLLBACK", K::kRollback, false},
        {"ABORT", K::kRollback, false},
        {"SAVEPOINT sp1", K::kSavepoint, false},
        {"RELEASE SAVEPOINT sp1", K::kRelease, false},
        {"ROLLBACK TO SAVEPOINT sp1", K::kRollbackTo, false},
        {"PREPARE TRANSACTION 'g1'", K::kPrepareTransaction, false},
        {"COMMIT PREPARED 'g1'", K::kCommitPrepared, false},
        {"ROLLBACK PREPARED 'g1'", K::kCommitPrepared, false},
        // Session.
        {"SET application_name = 'web'", K::kSet, false},
        {"RESET ALL", K::kSet, false},
        {"DISCARD ALL", K::kSet, false},
        {"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", K::kSet, false},
        {"SHOW search_path", K::kShow, false},
        {"SHOW ALL", K::kShow, false},
        // Procedures and anonymous blocks.
        {"CALL app.proc(1, 'x')", K::kCall, true},
        {"DO $$ BEGIN PERFORM 1; END $$", K::kDo, true},
        // EXPLAIN writes only when ANALYZE runs a write.
        {"EXPLAIN SELECT * FROM t", K::kExplain, false, {"t"}},
        {"EXPLAIN ANALYZE SELECT * FROM t", K::kExplain, false, {"t"}},
        {"EXPLAIN INSERT INTO t VALUES (1)", K::kExplain, false, {"t"}},
        {"EXPLAIN SELECT nextval('s')", K::kExplain, false},
        {"EXPLAIN ANALYZE INSERT INTO t VALUES (1)", K::kExplain, true, {"t"}},
        {"EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", K::kExplain, true, {"t"}},
        {"EXPLAIN (ANALYZE true, FORMAT json) DELETE FROM t", K::kExplain, true, {"t"}},
        {"EXPLAIN (ANALYZE false) DELETE FROM t", K::kExplain, false, {"t"}},
        {"EXPLAIN (ANALYZE off) DELETE FROM t", K::kExplain, false, {"t"}},
        {"EXPLAIN (ANALYZE 0) DELETE FROM t", K::kExplain, false, {"t"}},
        {"EXPLAIN ANALYZE SELECT nextval('s')", K::kExplain, true},
        {"EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d", K::kExplain, true,
         {"t"}},
        {"EXPLAIN ANALYZE SELECT * INTO t2 FROM t", K::kExplain, true, {"t2", "t"}},
        {"EXPLAIN ANALYZE EXECUTE p(1)", K::kExplain, true},
        {"EXPLAIN EXECUTE p(1)", K::kExplain, false},
        // Locks, notifications, maintenance.
        {"LOCK TABLE t IN ACCESS EXCLUSIVE MODE", K::kLock, false, {"t"}},
        {"LISTEN jobs", K::kListen, false},
        {"UNLISTEN jobs", K::kListen, false},
        {"UNLISTEN *", K::kListen, false},
        {"NOTIFY jobs, 'payload'", K::kNotify, false},
        {"VACUUM t", K::kMaintenance, false, {"t"}},
        {"VACUUM (ANALYZE, VERBOSE) s.t", K::kMaintenance, false, {"s.t"}},
        {"ANALYZE t", K::kMaintenance, false, {"t"}},
        {"CLUSTER t USING t_pkey", K::kMaintenance, false, {"t"}},
        {"REINDEX TABLE t", K::kMaintenance, false, {"t"}},
        {"CHECKPOINT", K::kMaintenance, false},
        // Cursors.
        {"DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", K::kSelect, false, {"t"}},
        {"DECLARE c CURSOR FOR SELECT nextval('s') FROM t", K::kSelect, true, {"t"}},
        {"FETCH 10 FROM c", K::kSelect, false},
        {"MOVE FORWARD 5 IN c", K::kSelect, false},
        {"CLOSE c", K::kSelect, false},
        // SQL-level prepared statements.
        {"PREPARE ins(int) AS INSERT INTO t VALUES ($1)", K::kInsert, true, {"t"}},
        {"PREPARE q AS SELECT * FROM t WHERE id = $1", K::kSelect, false, {"t"}},
        {"EXECUTE ins(1)", K::kOther, false},
        {"EXECUTE ins(nextval('s'))", K::kOther, true},
        {"DEALLOCATE ins", K::kOther, false},
        {"DEALLOCATE PREPARE ALL", K::kOther, false},
        {"LOAD 'auto_explain'", K::kOther, false},
        // Syntax errors and syntax newer than PostgreSQL 15 fail closed.
        {"SELEC 1", K::kOther, true},
        {"SELECT 'unterminated", K::kOther, true},
        {"MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE RETURNING *", K::kOther, true},
    };
    // clang-format on
    return cases;
}

// A configuration without the cache: every text is parsed afresh.
ClassifyConfig uncached() {
    ClassifyConfig config;
    config.cache_entries = 0;
    return config;
}

std::shared_ptr<const Classification> classify(std::string_view sql, ClassifyConfig config = {}) {
    Classifier classifier(std::move(config));
    return classifier.classify(sql);
}

StatementInfo only(const std::shared_ptr<const Classification>& result) {
    REQUIRE(result->statements.size() == 1);
    return result->statements.front();
}

std::string_view text_of(std::string_view sql, const StatementInfo& info) {
    return sql.substr(info.location, info.length);
}

}  // namespace

TEST_CASE("classifier: every statement of the corpus gets its kind, write flag and tables",
          "[classifier]") {
    Classifier classifier{ClassifyConfig{}};
    for (const Case& c : corpus()) {
        INFO(c.sql);
        const auto result = classifier.classify(c.sql);
        const StatementInfo& info = only(result);
        CHECK(to_string(info.kind) == std::string(to_string(c.kind)));
        CHECK(info.is_write == c.write);
        CHECK(info.tables == c.tables);
        CHECK(info.location == 0);
        CHECK(info.length == c.sql.size());
        CHECK(result->any_write() == c.write);
    }
}

TEST_CASE("classifier: the corpus covers every statement kind", "[classifier]") {
    std::set<StatementKind> seen;
    for (const Case& c : corpus())
        seen.insert(c.kind);
    CHECK(seen.size() == pgwarden::policy::kStatementKindCount);
}

TEST_CASE("classifier: kind names are the spec's and round-trip", "[classifier]") {
    using pgwarden::policy::statement_kind_from_string;
    for (std::size_t i = 0; i < pgwarden::policy::kStatementKindCount; ++i) {
        const auto kind = static_cast<StatementKind>(i);
        const auto parsed = statement_kind_from_string(to_string(kind));
        REQUIRE(parsed.has_value());
        CHECK(*parsed == kind);
    }
    CHECK(std::string(to_string(K::kCopyIn)) == "copy_in");
    CHECK(std::string(to_string(K::kRollbackTo)) == "rollback_to");
    CHECK(std::string(to_string(K::kPrepareTransaction)) == "prepare_transaction");
    CHECK_FALSE(statement_kind_from_string("write").has_value());
    CHECK_FALSE(statement_kind_from_string("SELECT").has_value());

    using pgwarden::policy::is_write_kind;
    const std::set<StatementKind> writes = {K::kInsert,   K::kUpdate, K::kDelete,
                                            K::kMerge,    K::kCopyIn, K::kDdl,
                                            K::kTruncate, K::kCall,   K::kDo};
    for (std::size_t i = 0; i < pgwarden::policy::kStatementKindCount; ++i) {
        const auto kind = static_cast<StatementKind>(i);
        INFO(to_string(kind));
        CHECK(is_write_kind(kind) == (writes.count(kind) == 1));
    }
}

TEST_CASE("classifier: splits statements where the server does", "[classifier]") {
    SECTION("locations and lengths") {
        const std::string sql = "SELECT 1; INSERT INTO t VALUES (';');  COMMIT";
        const auto result = classify(sql);
        REQUIRE(result->statements.size() == 3);
        CHECK(text_of(sql, result->statements[0]) == "SELECT 1");
        CHECK(text_of(sql, result->statements[1]) == " INSERT INTO t VALUES (';')");
        CHECK(text_of(sql, result->statements[2]) == "  COMMIT");
        CHECK(result->statements[0].kind == K::kSelect);
        CHECK(result->statements[1].kind == K::kInsert);
        CHECK(result->statements[2].kind == K::kCommit);
        CHECK(result->any_write());
    }
    SECTION("a trailing semicolon and empty statements") {
        const std::string sql = ";; SELECT 1 ;;";
        const auto result = classify(sql);
        REQUIRE(result->statements.size() == 1);
        CHECK(text_of(sql, result->statements[0]) == " SELECT 1 ");
        CHECK_FALSE(result->any_write());
    }
    SECTION("dollar quotes, literals, quoted names and comments do not split") {
        const std::string sql =
            "DO $body$ BEGIN PERFORM 1; PERFORM 2; END $body$; "
            "SELECT 'a;b', \"x;y\" FROM t -- c; DROP TABLE t\n; "
            "SELECT $$;$$ /* ; */";
        const auto result = classify(sql);
        REQUIRE(result->statements.size() == 3);
        CHECK(result->statements[0].kind == K::kDo);
        CHECK(result->statements[1].kind == K::kSelect);
        CHECK(result->statements[1].tables == std::vector<std::string>{"t"});
        CHECK_FALSE(result->statements[1].is_write);
        CHECK(result->statements[2].kind == K::kSelect);
        CHECK(text_of(sql, result->statements[2]) == " SELECT $$;$$ /* ; */");
    }
    SECTION("a rule with several actions is one statement") {
        const auto result = classify(
            "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); "
            "INSERT INTO v VALUES (2))");
        REQUIRE(result->statements.size() == 1);
        CHECK(result->statements[0].kind == K::kDdl);
    }
    SECTION("empty and comment-only texts have no statements") {
        for (const char* sql :
             {"", "   ", "-- only a comment", " /* a */ -- b\n /* c /* d */ */", ";", ";;  ;"}) {
            INFO(sql);
            const auto result = classify(sql);
            CHECK(result->statements.empty());
            CHECK_FALSE(result->any_write());
        }
    }
    SECTION("one bad statement makes the whole text one failed-closed write") {
        const std::string sql = "SELECT 1; SELEC 2; SELECT 3";
        const StatementInfo& info = only(classify(sql));
        CHECK(info.parse_error);
        CHECK(info.is_write);
        CHECK(info.kind == K::kOther);
        CHECK(info.location == 0);
        CHECK(info.length == sql.size());
    }
    SECTION("a NUL byte fails closed") {
        const std::string sql("SELECT 1\0; DROP TABLE t", 23);
        const StatementInfo& info = only(classify(sql));
        CHECK(info.parse_error);
        CHECK(info.is_write);
        CHECK(info.length == sql.size());
    }
    SECTION("good statements are not parse errors") {
        CHECK_FALSE(only(classify("SELECT 1")).parse_error);
        CHECK_FALSE(only(classify("DELETE FROM t")).parse_error);
    }
}

TEST_CASE("classifier: write_functions come from the config", "[classifier]") {
    ClassifyConfig custom;
    custom.write_functions = {"bump_counter", "audit.Touch"};
    CHECK(only(classify("SELECT bump_counter()", custom)).is_write);
    CHECK(only(classify("SELECT app.BUMP_COUNTER(1)", custom)).is_write);
    CHECK(only(classify("SELECT other.touch()", custom)).is_write);
    CHECK(only(classify("SELECT * FROM t WHERE a = (SELECT touch())", custom)).is_write);
    CHECK_FALSE(only(classify("SELECT nextval('s')", custom)).is_write);
    CHECK_FALSE(only(classify("SELECT bump_counters()", custom)).is_write);

    ClassifyConfig none;
    none.write_functions.clear();
    CHECK_FALSE(only(classify("SELECT nextval('s')", none)).is_write);
    CHECK(only(classify("INSERT INTO t VALUES (nextval('s'))", none)).is_write);
}

TEST_CASE("classifier: transaction control details", "[classifier]") {
    const StatementInfo& begin = only(classify("BEGIN"));
    CHECK_FALSE(begin.is_start_transaction);
    CHECK(only(classify("start transaction isolation level serializable")).is_start_transaction);

    CHECK_FALSE(only(classify("COMMIT")).is_end_alias);
    CHECK(only(classify("END")).is_end_alias);
    CHECK(only(classify("  /* why */ -- note\n end transaction")).is_end_alias);
    CHECK_FALSE(only(classify("ROLLBACK WORK")).is_end_alias);
    CHECK(only(classify("abort")).is_end_alias);
    const auto two = classify("SELECT 1; End");
    REQUIRE(two->statements.size() == 2);
    CHECK(two->statements[1].kind == K::kCommit);
    CHECK(two->statements[1].is_end_alias);

    CHECK_FALSE(only(classify("COMMIT")).chain);
    CHECK(only(classify("COMMIT AND CHAIN")).chain);
    CHECK(only(classify("ROLLBACK AND CHAIN")).chain);
    CHECK_FALSE(only(classify("ROLLBACK AND NO CHAIN")).chain);

    CHECK(only(classify("SAVEPOINT sp1")).savepoint == "sp1");
    CHECK(only(classify("RELEASE sp1")).savepoint == "sp1");
    const StatementInfo& rollback_to = only(classify("ROLLBACK TO \"Mixed\""));
    CHECK(rollback_to.kind == K::kRollbackTo);
    CHECK(rollback_to.savepoint == "Mixed");

    CHECK(only(classify("PREPARE TRANSACTION 'g-1'")).gid == "g-1");
    CHECK(only(classify("COMMIT PREPARED 'g-1'")).gid == "g-1");
    CHECK(only(classify("ROLLBACK PREPARED 'g''2'")).gid == "g'2");
}

TEST_CASE("classifier: SET, RESET and DISCARD", "[classifier]") {
    struct SetCase {
        std::string sql;
        std::string name;
        std::optional<std::string> value;
        bool local = false;
        bool reset_all = false;
    };
    const std::vector<SetCase> cases = {
        {"SET application_name = 'web'", "application_name", "web"},
        {"SET pgwarden.client TO 'tenant:7'", "pgwarden.client", "tenant:7"},
        {"SET LOCAL pgwarden.client = 'a'", "pgwarden.client", "a", true},
        {"SET SESSION pgwarden.client = 'b'", "pgwarden.client", "b"},
        {"SET \"PgWarden.Client\" = 'c'", "pgwarden.client", "c"},
        {"SET Application_Name TO web2", "application_name", "web2"},
        {"set search_path to public, \"$user\"", "search_path", "public, $user"},
        {"SET statement_timeout = 5000", "statement_timeout", "5000"},
        {"SET x.y = -3", "x.y", "-3"},
        {"SET x.y = 0", "x.y", "0"},
        {"SET x.y = 1.5", "x.y", "1.5"},
        {"SET x.y = -2.5", "x.y", "-2.5"},
        {"SET x.y = on", "x.y", "on"},
        {"SET x.y = ''", "x.y", ""},
        {"SET x.y = 'it''s'", "x.y", "it's"},
        {"SET x.y = E'a\\tb\"c\\\\d<&>'", "x.y", "a\tb\"c\\d<&>"},
        {"SET x.y = 'caf\u00e9 \U0001F600'", "x.y", "caf\u00e9 \U0001F600"},
        {"SET TIME ZONE 'UTC'", "timezone", "UTC"},
        {"SET NAMES 'UTF8'", "client_encoding", "UTF8"},
        {"SET x.y TO DEFAULT", "x.y", std::nullopt},
        {"SET LOCAL x.y TO DEFAULT", "x.y", std::nullopt, true},
        {"RESET x.y", "x.y", std::nullopt},
        {"RESET ALL", "", std::nullopt, false, true},
        {"DISCARD ALL", "", std::nullopt, false, true},
        {"DISCARD PLANS", "", std::nullopt},
        {"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "", std::nullopt},
        {"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "", std::nullopt},
        {"SET x.y FROM CURRENT", "", std::nullopt},
    };
    for (const SetCase& c : cases) {
        INFO(c.sql);
        const StatementInfo& info = only(classify(c.sql));
        CHECK(info.kind == K::kSet);
        CHECK_FALSE(info.is_write);
        CHECK(info.set_name == c.name);
        CHECK(info.set_value == c.value);
        CHECK(info.set_local == c.local);
        CHECK(info.reset_all == c.reset_all);
    }
}

TEST_CASE("classifier: PREPARE, EXECUTE and DEALLOCATE", "[classifier]") {
    const StatementInfo& prepare =
        only(classify("PREPARE ins(int) AS INSERT INTO s.t VALUES ($1)"));
    CHECK(prepare.kind == K::kInsert);
    CHECK(prepare.is_write);
    CHECK(prepare.prepare_name == "ins");
    CHECK(prepare.tables == std::vector<std::string>{"s.t"});

    const StatementInfo& locking = only(classify("PREPARE q AS SELECT * FROM t FOR UPDATE"));
    CHECK(locking.kind == K::kSelect);
    CHECK(locking.row_locking);
    CHECK_FALSE(locking.is_write);

    CHECK(only(classify("PREPARE n AS SELECT nextval('s')")).is_write);

    const StatementInfo& execute = only(classify("EXECUTE ins(1)"));
    CHECK(execute.execute_name == "ins");
    CHECK(execute.prepare_name.empty());
    CHECK_FALSE(execute.is_write);

    const StatementInfo& deallocate = only(classify("DEALLOCATE ins"));
    CHECK(deallocate.deallocate_name == "ins");
    CHECK_FALSE(deallocate.deallocate_all);
    CHECK(only(classify("DEALLOCATE ALL")).deallocate_all);
    CHECK(only(classify("DISCARD ALL")).deallocate_all);
    CHECK_FALSE(only(classify("DISCARD PLANS")).deallocate_all);
    CHECK_FALSE(only(classify("RESET ALL")).deallocate_all);
}

TEST_CASE("classifier: row locking", "[classifier]") {
    for (const char* sql :
         {"SELECT * FROM t FOR UPDATE", "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
          "SELECT * FROM t FOR SHARE", "SELECT * FROM t FOR KEY SHARE NOWAIT",
          "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
          "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE"}) {
        INFO(sql);
        const StatementInfo& info = only(classify(sql));
        CHECK(info.kind == K::kSelect);
        CHECK(info.row_locking);
        CHECK_FALSE(info.is_write);
    }
    CHECK_FALSE(only(classify("SELECT * FROM t")).row_locking);
    CHECK_FALSE(only(classify("EXPLAIN SELECT * FROM t FOR UPDATE")).row_locking);
    CHECK(only(classify("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE")).row_locking);
}

TEST_CASE("classifier: tables are schema-qualified as written and listed once", "[classifier]") {
    using Tables = std::vector<std::string>;
    CHECK(only(classify("SELECT * FROM s.a, b, s.a, \"Mixed\".\"Case\", b")).tables ==
          Tables{"s.a", "b", "Mixed.Case"});
    CHECK(only(classify("SELECT * FROM db.s.t")).tables == Tables{"s.t"});
    // pg_query's JSON escapes some characters; names come back as written.
    CHECK(only(classify(R"(SELECT * FROM "a>b", "q""uote", "back\slash", "tä")")).tables ==
          Tables{"a>b", "q\"uote", "back\\slash", "t\u00e4"});
    CHECK(only(classify("INSERT INTO t1 SELECT * FROM t2 WHERE x IN (SELECT y FROM t3)")).tables ==
          Tables{"t1", "t2", "t3"});
    // Text order, not the order of the parse tree's fields (WITH comes last there).
    CHECK(only(classify("WITH c AS (SELECT * FROM first) SELECT * FROM second, c")).tables ==
          Tables{"first", "second"});
    // A CTE's name used as an INSERT target is the table, not the CTE.
    CHECK(only(classify("WITH t AS (SELECT 1) INSERT INTO t SELECT * FROM t")).tables ==
          Tables{"t"});
}

TEST_CASE("classifier: sqlcommenter tags", "[classifier]") {
    SECTION("a leading comment") {
        const StatementInfo& info = only(classify("/* client='tenant:42' */ SELECT 1"));
        CHECK(info.tag("client") == "tenant:42");
        CHECK(info.tag("route").empty());
        CHECK(info.tags.size() == 1);
    }
    SECTION("several URL-encoded tags in a trailing comment") {
        const StatementInfo& info =
            only(classify("SELECT 1 /*client='a%3Ab',route='%2Fhome%20page',db_driver='x'*/"));
        CHECK(info.tag("client") == "a:b");
        CHECK(info.tag("route") == "/home page");
        CHECK(info.tag("db_driver") == "x");
        CHECK(info.tags.size() == 3);
    }
    SECTION("comment-like text in literals is not a comment") {
        const StatementInfo& info =
            only(classify("SELECT '/* client=''evil'' */', $$ -- client='evil2' $$, "
                          "E'/* client=\\'evil3\\' */' /* client='good' */"));
        CHECK(info.tag("client") == "good");
        CHECK(info.tags.size() == 1);
        CHECK(only(classify("SELECT '/* client=''evil'' */'")).tags.empty());
    }
    SECTION("a -- comment") {
        CHECK(only(classify("-- client='dash'\nSELECT 1")).tag("client") == "dash");
    }
    SECTION("each statement gets the comments in its own text") {
        const auto result =
            classify("/* client='a' */ SELECT 1; /* client='b' */ SELECT 2; SELECT 3");
        REQUIRE(result->statements.size() == 3);
        CHECK(result->statements[0].tag("client") == "a");
        CHECK(result->statements[1].tag("client") == "b");
        CHECK(result->statements[2].tags.empty());
    }
    SECTION("a comment after the last semicolon belongs to the last statement") {
        const auto result = classify("SELECT 1; SELECT 2; /* client='tail' */");
        REQUIRE(result->statements.size() == 2);
        CHECK(result->statements[0].tags.empty());
        CHECK(result->statements[1].tag("client") == "tail");
    }
    SECTION("an escaped quote in a value") {
        CHECK(only(classify("/* note='it\\'s' */ SELECT 1")).tag("note") == "it's");
    }
    SECTION("a text that does not parse still carries its tags") {
        const StatementInfo& info = only(classify("/* client='x' */ SELEC 1"));
        CHECK(info.parse_error);
        CHECK(info.tag("client") == "x");
    }
    SECTION("a comment with other words has no tags") {
        CHECK(only(classify("/* see ticket=123, it's fine */ SELECT 1")).tags.empty());
    }
}

TEST_CASE("classifier: parse_comment_tags", "[classifier]") {
    using pgwarden::policy::parse_comment_tags;
    using Tags = std::vector<std::pair<std::string, std::string>>;
    CHECK(parse_comment_tags("client='tenant:42',route='%2Fhome'") ==
          Tags{{"client", "tenant:42"}, {"route", "/home"}});
    CHECK(parse_comment_tags("  a = 'x' ,  b='y'  ") == Tags{{"a", "x"}, {"b", "y"}});
    CHECK(parse_comment_tags("a=b, c='d'") == Tags{{"c", "d"}});
    CHECK(parse_comment_tags("='x', d='e'") == Tags{{"d", "e"}});
    CHECK(parse_comment_tags("broken, k='v'") == Tags{{"k", "v"}});
    CHECK(parse_comment_tags("k='unterminated").empty());
    CHECK(parse_comment_tags("%6Bey='v%27'") == Tags{{"key", "v'"}});
    CHECK(parse_comment_tags("a='one, two',b='x\\\\y'") == Tags{{"a", "one, two"}, {"b", "x\\y"}});
    CHECK(parse_comment_tags("a='100%',b='%zz%4'") == Tags{{"a", "100%"}, {"b", "%zz%4"}});
    CHECK(parse_comment_tags("a='x' junk, b='y'") == Tags{{"a", "x"}, {"b", "y"}});
    CHECK(parse_comment_tags("a='1+2'") == Tags{{"a", "1+2"}});
    CHECK(parse_comment_tags("").empty());
}

TEST_CASE("classifier: the cache returns shared results and stays bounded", "[classifier]") {
    SECTION("hits share the result; the least recently used entry goes first") {
        ClassifyConfig config;
        config.cache_entries = 2;
        Classifier classifier(config);
        const auto a = classifier.classify("SELECT a");
        CHECK(classifier.cache_misses() == 1);
        CHECK(classifier.classify("SELECT a") == a);
        CHECK(classifier.cache_hits() == 1);
        classifier.classify("SELECT b");
        CHECK(classifier.classify("SELECT a") == a);  // now a is the most recent
        classifier.classify("SELECT c");              // evicts b
        CHECK(classifier.cache_size() == 2);
        CHECK(classifier.cache_misses() == 3);
        CHECK(classifier.classify("SELECT a") == a);
        CHECK(classifier.cache_hits() == 3);
        classifier.classify("SELECT b");
        CHECK(classifier.cache_misses() == 4);
        CHECK(classifier.cache_size() == 2);
    }
    SECTION("the key is the exact text") {
        Classifier classifier{ClassifyConfig{}};
        classifier.classify("SELECT 1");
        classifier.classify("select 1");
        classifier.classify("SELECT 1 ");
        CHECK(classifier.cache_misses() == 3);
        CHECK(classifier.cache_size() == 3);
    }
    SECTION("never more entries than configured") {
        ClassifyConfig config;
        config.cache_entries = 10;
        Classifier classifier(config);
        for (int i = 0; i < 100; ++i) {
            classifier.classify("SELECT c" + std::to_string(i));  // names: 100 shapes
            CHECK(classifier.cache_size() <= 10);
        }
        CHECK(classifier.cache_size() == 10);
        CHECK(classifier.cache_misses() == 100);
        classifier.classify("SELECT c95");
        CHECK(classifier.cache_hits() == 1);
    }
    SECTION("0 entries disables the cache") {
        Classifier classifier(uncached());
        const auto first = classifier.classify("SELECT 1");
        const auto second = classifier.classify("SELECT 1");
        CHECK(first != second);
        CHECK(second->statements.size() == 1);
        CHECK(classifier.cache_size() == 0);
        CHECK(classifier.cache_hits() == 0);
    }
    SECTION("huge texts are classified but not cached") {
        Classifier classifier{ClassifyConfig{}};
        const std::string huge = "INSERT INTO t VALUES (1)" + std::string(70 * 1024, ' ');
        CHECK(only(classifier.classify(huge)).kind == K::kInsert);
        CHECK(only(classifier.classify(huge)).kind == K::kInsert);
        CHECK(classifier.cache_size() == 0);
        CHECK(classifier.cache_misses() == 2);
    }
    SECTION("cached and fresh results agree") {
        Classifier cached{ClassifyConfig{}};
        for (const Case& c : corpus())
            cached.classify(c.sql);
        for (const Case& c : corpus()) {
            INFO(c.sql);
            const auto again = cached.classify(c.sql);
            const auto fresh = classify(c.sql);
            CHECK(only(again).kind == only(fresh).kind);
            CHECK(only(again).is_write == only(fresh).is_write);
        }
        CHECK(cached.cache_hits() == corpus().size());
    }
}

TEST_CASE("classifier: one classifier per thread, at the same time", "[classifier]") {
    // libpg_query keeps its parser state per thread; two threads parsing at once must each
    // get the same answers as one thread alone.
    constexpr int kRounds = 20;
    std::vector<int> mismatches(2, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t) {
        threads.emplace_back([t, &mismatches] {
            Classifier classifier(uncached());
            for (int round = 0; round < kRounds; ++round) {
                for (const Case& c : corpus()) {
                    const auto result = classifier.classify(c.sql);
                    if (result->statements.size() != 1 || result->statements[0].kind != c.kind ||
                        result->statements[0].is_write != c.write ||
                        result->statements[0].tables != c.tables) {
                        ++mismatches[t];
                    }
                }
            }
        });
    }
    for (auto& thread : threads)
        thread.join();
    CHECK(mismatches[0] == 0);
    CHECK(mismatches[1] == 0);
}

namespace {

bool same_info(const StatementInfo& a, const StatementInfo& b) {
    return a.kind == b.kind && a.is_write == b.is_write && a.parse_error == b.parse_error &&
           a.unknown == b.unknown && a.row_locking == b.row_locking && a.location == b.location &&
           a.length == b.length && a.tables == b.tables && a.contained_writes == b.contained_writes &&
           a.savepoint == b.savepoint && a.gid == b.gid && a.set_name == b.set_name &&
           a.set_value == b.set_value && a.prepare_name == b.prepare_name &&
           a.execute_name == b.execute_name && a.tags == b.tags;
}

bool same_result(const Classification& a, const Classification& b) {
    if (a.log_text != b.log_text || a.statements.size() != b.statements.size()) return false;
    for (std::size_t i = 0; i < a.statements.size(); ++i)
        if (!same_info(a.statements[i], b.statements[i])) return false;
    return true;
}

std::string shape_of(std::string_view sql) {
    std::string shape;
    std::size_t first = 0, last = 0;
    return statement_shape(sql, shape, first, last) ? shape : "<none>";
}

}  // namespace

TEST_CASE("classifier: statement_shape replaces constants and keeps everything else", "[classifier]") {
    using namespace std::string_literals;
    std::string shape;
    std::size_t first = 0, last = 0;
    REQUIRE(statement_shape("SELECT * FROM t WHERE id = 42 AND name = 'x''y';", shape, first, last));
    CHECK(shape == "SELECT * FROM t WHERE id = \0n AND name = \0s;"s);
    CHECK(first == 27);
    CHECK(last == 47);
    CHECK(shape_of("select 1.5e-3, .5, 7., 1e") == "select \0n, \0n, \0n, \0ne"s);
    CHECK(shape_of("select c1, t2.x3 from t4 where a = $1 and b = 2") ==
          "select c1, t2.x3 from t4 where a = $1 and b = \0n"s);
    // Comments stay as they are, quotes in them included; dashes in a string are the string's.
    CHECK(shape_of("/* client='a' */ select 'a--b', 1 -- 2\n") == "/* client='a' */ select \0s, \0n -- 2\n"s);
    CHECK(shape_of("select \"we\"\"ird 1\", 2") == "select \"we\"\"ird 1\", \0n"s);
    CHECK(shape_of("select 1 /* a /* nested 'q' */ b */ + 2") == "select \0n /* a /* nested 'q' */ b */ + \0n"s);
    // Nothing to replace, or something the shape cannot stand for: no shape.
    for (const char* text : {"select a from t", "select $1", "select E'a\\'b'", "select e'x'", "select B'101'",
                             "select X'ff'", "select N'x'", "select U&'x'", "select $$x$$", "select $q$x$q$",
                             "select 'open", "select 1 /* open", "select \"open", "select 1 /* a */ /* b"}) {
        INFO(text);
        CHECK(shape_of(text) == "<none>");
    }
    CHECK(shape_of("select 1\0; delete from t"s) == "<none>");
}

TEST_CASE("classifier: texts of one shape share a classification only where it cannot differ", "[classifier]") {
    Classifier cached{ClassifyConfig{}};
    Classifier fresh(uncached());
    // Each group: texts of one shape. The first is parsed; the others must come out exactly
    // as a fresh parse of their own text says, whether the shape was shared or not.
    struct Group {
        std::vector<std::string> texts;
        bool shared;  // whether the later texts are served by the shape
    };
    const std::vector<Group> groups = {
        {{"SELECT abalance FROM pgbench_accounts WHERE aid = 17;", "SELECT abalance FROM pgbench_accounts WHERE aid = 1234567;"}, true},
        {{"UPDATE pgbench_accounts SET abalance = abalance + -4711 WHERE aid = 3;",
          "UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 99999;"},
         true},
        {{"INSERT INTO h (a, b, c) VALUES (1, 2, 'x'), (3, 4, 'y')", "INSERT INTO h (a, b, c) VALUES (10, 20, 'a;b'), (30, 40, '')"}, true},
        {{"DELETE FROM t WHERE note = 'x' RETURNING id", "DELETE FROM t WHERE note = '; DELETE FROM u; --' RETURNING id"}, true},
        {{"SELECT * FROM q WHERE id = 1 FOR UPDATE", "SELECT * FROM q WHERE id = 2 FOR UPDATE"}, true},
        {{"SELECT nextval('seq_a')", "SELECT nextval('seq_b')"}, true},
        {{"WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
          "WITH d AS (DELETE FROM t WHERE id = 2 RETURNING *) SELECT * FROM d"},
         true},
        {{"/* client='tenant:1' */ SELECT 1", "/* client='tenant:1' */ SELECT 2"}, true},
        {{"SELECT 1 -- client='x'\n", "SELECT 22 -- client='x'\n"}, true},
        // Constants that change what a statement is or says: never shared.
        {{"SET pgwarden.client = 'a'", "SET pgwarden.client = 'b'"}, false},
        {{"SET statement_timeout = 100", "SET statement_timeout = 200"}, false},
        {{"EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"}, false},
        {{"PREPARE TRANSACTION 'a'", "PREPARE TRANSACTION 'b'"}, false},
        {{"COMMIT PREPARED 'a'", "COMMIT PREPARED 'b'"}, false},
        {{"SELECT 1; DELETE FROM t WHERE id = 2", "SELECT 100; DELETE FROM t WHERE id = 2"}, false},
        {{"PREPARE p AS SELECT 1", "PREPARE p AS SELECT 2"}, false},
        {{"COPY t FROM '/tmp/a'", "COPY t FROM '/tmp/b'"}, false},
        {{"SELECT 1 +", "SELECT 2 +"}, false},  // parse errors
    };
    for (const Group& group : groups) {
        const std::uint64_t shared_before = cached.shape_hits();
        for (const std::string& text : group.texts) {
            INFO(text);
            const auto got = cached.classify(text);
            const auto want = fresh.classify(text);
            CHECK(same_result(*got, *want));
        }
        INFO(group.texts.front());
        CHECK(cached.shape_hits() - shared_before == (group.shared ? group.texts.size() - 1 : 0));
    }
}

TEST_CASE("classifier: a shape hit never changes a classification someone still holds", "[classifier]") {
    // Shape hits fill the last result in place once nobody holds it any more.
    Classifier cached{ClassifyConfig{}};
    Classifier fresh(uncached());
    const std::string first = "SELECT abalance FROM pgbench_accounts WHERE aid = 17;";
    const std::string second = "SELECT abalance FROM pgbench_accounts WHERE aid = 1234567;";
    const std::string third = "SELECT abalance FROM pgbench_accounts WHERE aid = 5;";
    cached.classify(first);  // parsed: the shape is learned
    auto held = cached.classify(second);
    REQUIRE(cached.shape_hits() == 1);
    const auto* held_address = held.get();
    auto other = cached.classify(third);
    CHECK(other.get() != held_address);
    CHECK(same_result(*held, *fresh.classify(second)));
    CHECK(held->log_text == second);
    CHECK(same_result(*other, *fresh.classify(third)));
    // Released: the next hit may reuse it, and must come out as a fresh parse says.
    held.reset();
    other.reset();
    for (const std::string& text : {second, third, second}) {
        INFO(text);
        const auto got = cached.classify(text);
        CHECK(same_result(*got, *fresh.classify(text)));
        CHECK(got->log_text == text);
    }
    CHECK(cached.shape_hits() == 5);
}

TEST_CASE("classifier: many classifications held at once stay as they were", "[classifier]") {
    // A thread's sessions each hold theirs until the answer is in: more than the classifier
    // keeps for reuse may be held at once, released in any order.
    Classifier cached{ClassifyConfig{}};
    Classifier fresh(uncached());
    auto text = [](int i) { return "SELECT abalance FROM pgbench_accounts WHERE aid = " + std::to_string(i) + ";"; };
    cached.classify(text(0));
    std::vector<std::pair<std::string, std::shared_ptr<const Classification>>> held;
    auto take = [&](int i) { held.emplace_back(text(i), cached.classify(text(i))); };
    for (int round = 0; round < 3; ++round) {
        for (int i = 1; i <= 40; ++i) take(round * 1000 + i * 7);
        // Every third one is let go; the others stay held while more arrive.
        for (std::size_t i = 0; i < held.size(); i += 3) held[i].second.reset();
        for (int i = 41; i <= 60; ++i) take(round * 1000 + i * 7);
        std::set<const Classification*> distinct;
        for (const auto& [sql, classification] : held) {
            if (!classification) continue;
            INFO(sql);
            CHECK(distinct.insert(classification.get()).second);
            CHECK(classification->log_text == sql);
            CHECK(same_result(*classification, *fresh.classify(sql)));
        }
        std::erase_if(held, [](const auto& entry) { return !entry.second; });
        if (round == 1) held.clear();
    }
    CHECK(cached.shape_hits() == 180);
}

TEST_CASE("classifier: a reused classification is refilled when its shape changes", "[classifier]") {
    // A shape hit fills a classification nobody holds any more. Filled again from the same
    // shape, only its length and text change; from another shape, everything must.
    Classifier cached{ClassifyConfig{}};
    Classifier fresh(uncached());
    const std::vector<std::string> shapes = {
        "SELECT abalance FROM pgbench_accounts WHERE aid = ",
        "UPDATE pgbench_tellers SET tbalance = tbalance + 5 WHERE tid = ",
        "/* client='tenant:7' */ DELETE FROM audit.events WHERE id = ",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, now()) RETURNING ",
    };
    for (const auto& shape : shapes) cached.classify(shape + "0;");
    // Each result is let go before the next is asked for: they all reuse the same few.
    for (int i = 1; i <= 200; ++i) {
        // Runs of one shape, then another, then back: the same spare sees each kind.
        const std::string sql = shapes[(i / 3 + i % 2) % shapes.size()] + std::to_string(i * 131) + ";";
        INFO(sql);
        const auto classification = cached.classify(sql);
        CHECK(classification->log_text == sql);
        CHECK(same_result(*classification, *fresh.classify(sql)));
    }
    CHECK(cached.shape_hits() == 200);
}


TEST_CASE("classifier: reused classifications never show another text's statement (random shapes, evictions, holders)", "[classifier]") {
    std::mt19937 rng(99);
    ClassifyConfig tiny;
    tiny.cache_entries = 2;  // templates evicted and rebuilt all the time
    Classifier cached(tiny);
    Classifier fresh(uncached());
    const std::vector<std::string> shapes = {
        "SELECT abalance FROM pgbench_accounts WHERE aid = ",
        "UPDATE pgbench_tellers SET tbalance = tbalance + 5 WHERE tid = ",
        "/* client='tenant:7' */ DELETE FROM audit.events WHERE id = ",
        "SELECT * FROM a.b JOIN c USING (x) WHERE y = ",
        "INSERT INTO t (a) VALUES (",
    };
    std::vector<std::pair<std::shared_ptr<const Classification>, std::shared_ptr<const Classification>>> held;
    for (int i = 0; i < 20000; ++i) {
        const std::size_t s = std::uniform_int_distribution<std::size_t>(0, shapes.size() - 1)(rng);
        std::string sql = shapes[s] + std::to_string(std::uniform_int_distribution<int>(0, 1 << 20)(rng));
        if (s == 4) sql += ")";
        sql += std::string(std::uniform_int_distribution<int>(0, 3)(rng), ' ') + ";";
        INFO(sql);
        auto got = cached.classify(sql);
        auto want = fresh.classify(sql);
        REQUIRE(same_result(*got, *want));
        if (std::uniform_int_distribution<int>(0, 9)(rng) < 3) held.push_back({got, want});
        if (held.size() > 20 || (!held.empty() && std::uniform_int_distribution<int>(0, 9)(rng) < 3))
            held.erase(held.begin() + std::uniform_int_distribution<std::size_t>(0, held.size() - 1)(rng));
        for (const auto& [g, w] : held) REQUIRE(same_result(*g, *w));
    }
    CHECK(cached.shape_hits() > 1000);
}
