# Statement interception through pgwarden: [[rule]] rejections, notices, logs,
# application_name and table matching, max_statement_bytes and prepared statements, in the
# simple protocol (psql, psycopg) and the extended one (psycopg prepared statements and
# pipelines, libpq pipeline mode). A rejection must look exactly like a server error there.
#
# PGWARDEN_DIRECT=1 runs the emulable tests against PostgreSQL itself, with triggers raising
# what the rules would (interception_util.DIRECT_RULES_SQL): that proves the expectations.
from __future__ import annotations

import contextlib

import psycopg
import psycopg.errors
import pytest

import harness
import interception_util as util
import pgwire

IDLE = psycopg.pq.TransactionStatus.IDLE
INTRANS = psycopg.pq.TransactionStatus.INTRANS
INERROR = psycopg.pq.TransactionStatus.INERROR

AUDIT = "insert into audit.log values (100)"
ABORTED_MESSAGE = "current transaction is aborted, commands ignored until end of transaction block"
OK_INSERT = "ok INSERT 0 1 0"
AUDIT_ERROR = f"error 42501 {util.AUDIT_MESSAGE}"


def item(n: int) -> str:
    return f"insert into icpt_items values ({n})"


POSITIONS = {
    "first": [AUDIT, item(1), item(2)],
    "middle": [item(1), AUDIT, item(2)],
    "last": [item(1), item(2), AUDIT],
}


@pytest.fixture(scope="session")
def libpq_bin(tmp_path_factory):
    return util.build_libpq_pipeline(tmp_path_factory.mktemp("libpq"))


@pytest.fixture
def warden(pgwarden_factory, pg_server):
    util.reset_schema(pg_server)
    # Tests that run in direct mode see the server with the rule triggers, which is what
    # the rules make of these statements.
    return pgwarden_factory(util.CONFIG, direct_equivalent=True)


@contextlib.contextmanager
def raises_sql(sqlstate: str, message: str | None = None):
    with pytest.raises(psycopg.Error) as info:
        yield info
    got = (info.value.sqlstate, info.value.diag.message_primary)
    assert got == (sqlstate, got[1] if message is None else message)


def psql_multi(statements: list[str]) -> str:
    """One simple Query made of several statements (psql sends `\\;`-joined text at once)."""
    return " \\; ".join(statements) + ";\n"


# ---------------------------------------------------------------------------------------------
# A rejected statement in a multi-statement simple Query


@pytest.mark.parametrize("position", POSITIONS)
def test_simple_query_rejection_outside_block_psycopg(warden, pg_server, position):
    with warden.connect() as conn:
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("; ".join(POSITIONS[position]))
        assert conn.info.transaction_status == IDLE
        # The implicit transaction is rolled back whole.
        assert util.committed(pg_server, "icpt_items") == []
        assert util.committed(pg_server, "audit.log") == []
        conn.execute(item(9))
        assert util.committed(pg_server, "icpt_items") == [9]
        util.assert_healthy(warden, conn)


@pytest.mark.parametrize("position", POSITIONS)
def test_simple_query_rejection_inside_block_psycopg(warden, pg_server, position):
    with warden.connect() as conn:
        conn.execute("begin")
        conn.execute(item(0))
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("; ".join(POSITIONS[position]))
        assert conn.info.transaction_status == INERROR
        with raises_sql("25P02", ABORTED_MESSAGE):
            conn.execute("select 1")
        conn.execute("rollback")
        assert conn.info.transaction_status == IDLE
        assert util.committed(pg_server, "icpt_items") == []
        assert util.committed(pg_server, "audit.log") == []
        conn.execute(item(9))
        assert util.committed(pg_server, "icpt_items") == [9]
        util.assert_healthy(warden, conn)


@pytest.mark.parametrize("position", POSITIONS)
def test_simple_query_rejection_outside_block_psql(warden, pg_server, position):
    out, messages = util.psql_script(warden, psql_multi(POSITIONS[position]) +
                                     "\\echo sqlstate=:SQLSTATE\n" + item(9) + ";\nselect 1;\n")
    assert out == ["sqlstate=42501", "1"]
    assert messages == [f"ERROR:  {util.AUDIT_MESSAGE}"]
    assert util.committed(pg_server, "icpt_items") == [9]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


@pytest.mark.parametrize("position", POSITIONS)
def test_simple_query_rejection_inside_block_psql(warden, pg_server, position):
    script = ("begin;\n" + item(0) + ";\n" + psql_multi(POSITIONS[position]) +
              "\\echo sqlstate=:SQLSTATE\nselect 1;\n\\echo sqlstate=:SQLSTATE\nrollback;\n" +
              item(9) + ";\nselect 1;\n")
    out, messages = util.psql_script(warden, script)
    assert out == ["sqlstate=42501", "sqlstate=25P02", "1"]
    assert messages == [f"ERROR:  {util.AUDIT_MESSAGE}", f"ERROR:  {ABORTED_MESSAGE}"]
    assert util.committed(pg_server, "icpt_items") == [9]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


# Transaction control inside the rejected Query itself: (statements, status, committed).
BLOCK_IN_QUERY = {
    "begin-reject-commit": (["begin", item(1), AUDIT, item(2), "commit"], INERROR, []),
    "commit-then-reject": (["begin", item(1), "commit", AUDIT, item(2)], IDLE, [1]),
    "commit-then-begin-reject": (["begin", item(1), "commit", "begin", item(2), AUDIT], INERROR, [1]),
    "reject-then-begin": ([item(1), AUDIT, "begin", item(2)], IDLE, []),
}


@pytest.mark.parametrize("case", BLOCK_IN_QUERY)
def test_simple_query_rejection_with_transaction_control_in_query(warden, pg_server, case):
    statements, status, expected = BLOCK_IN_QUERY[case]
    with warden.connect() as conn:
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("; ".join(statements))
        assert conn.info.transaction_status == status
        if status == INERROR:
            with raises_sql("25P02", ABORTED_MESSAGE):
                conn.execute("select 1")
            conn.execute("rollback")
        assert util.committed(pg_server, "icpt_items") == expected
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)
    # The same through psql.
    util.reset_schema(pg_server)
    out, messages = util.psql_script(warden, psql_multi(statements) + "\\echo sqlstate=:SQLSTATE\n"
                                     "rollback;\nselect 1;\n")
    assert out == ["sqlstate=42501", "1"]
    rollback_warning = [] if status == INERROR else ["WARNING:  there is no transaction in progress"]
    assert messages == [f"ERROR:  {util.AUDIT_MESSAGE}", *rollback_warning]
    assert util.committed(pg_server, "icpt_items") == expected
    util.assert_clean_log(warden)


def test_rejection_after_savepoint_rolls_back_to_it(warden, pg_server):
    with warden.connect() as conn:
        conn.execute("begin")
        conn.execute(item(1))
        conn.execute("savepoint before_audit")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute(f"{item(2)}; {AUDIT}")
        assert conn.info.transaction_status == INERROR
        # In a failed block nothing runs, and the server says so before any rule would.
        with raises_sql("25P02", ABORTED_MESSAGE):
            conn.execute(AUDIT)
        conn.execute("rollback to savepoint before_audit")
        assert conn.info.transaction_status == INTRANS
        conn.execute(item(3))
        conn.execute("commit")
        assert util.committed(pg_server, "icpt_items") == [1, 3]
        util.assert_healthy(warden, conn)


# Statements that write to audit.log without being a plain INSERT/UPDATE/DELETE at the top:
# PostgreSQL runs the write all the same.
NESTED_AUDIT_WRITES = {
    "data-modifying-with": "with w as (insert into audit.log values (1) returning id) select id from w",
    "explain-analyze": "explain analyze insert into audit.log values (2)",
    "copy-query-to-stdout": "copy (insert into audit.log values (3) returning id) to stdout",
}


@pytest.mark.parametrize("shape", NESTED_AUDIT_WRITES)
def test_nested_write_to_audit_is_rejected(warden, pg_server, shape):
    sql = NESTED_AUDIT_WRITES[shape]
    with warden.connect() as conn:
        with raises_sql("42501", util.AUDIT_MESSAGE):
            if sql.startswith("copy"):
                with conn.cursor().copy(sql) as copy:
                    for _ in copy:
                        pass
            else:
                conn.execute(sql)
        assert conn.info.transaction_status == IDLE
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)


# ---------------------------------------------------------------------------------------------
# A rejected Execute in a pipelined extended batch (several Parse/Bind/Execute, one Sync)


def expected_batch_lines(statements: list[str]) -> list[str]:
    """What libpq reports for one batch in which AUDIT is rejected."""
    lines, failed = [], False
    for s in statements:
        if failed:
            lines.append("aborted")
        elif s == AUDIT:
            lines.append(AUDIT_ERROR)
            failed = True
        else:
            lines.append(OK_INSERT)
    return lines


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("block", ["implicit", "block"])
def test_pipeline_rejection_psycopg(warden, pg_server, position, block):
    with warden.connect() as conn:
        if block == "block":
            conn.execute("begin")
            conn.execute(item(0))
        with raises_sql("42501", util.AUDIT_MESSAGE):
            with conn.pipeline():
                for statement in POSITIONS[position]:
                    conn.execute(statement)
        if block == "block":
            assert conn.info.transaction_status == INERROR
            with raises_sql("25P02", ABORTED_MESSAGE):
                conn.execute("select 1")
            conn.execute("rollback")
        assert conn.info.transaction_status == IDLE
        # Statements before the rejection ran in the implicit transaction (or the block),
        # which the error rolled back; the rest was skipped.
        assert util.committed(pg_server, "icpt_items") == []
        assert util.committed(pg_server, "audit.log") == []
        with conn.pipeline():
            conn.execute("insert into icpt_items values (%s)", [9])
            conn.execute("insert into icpt_items values (%s)", [10])
        assert util.committed(pg_server, "icpt_items") == [9, 10]
        util.assert_healthy(warden, conn)


@pytest.mark.parametrize("position", POSITIONS)
def test_pipeline_rejection_libpq_implicit_transaction(warden, pg_server, libpq_bin, position):
    statements = POSITIONS[position]
    lines = util.libpq_pipeline(libpq_bin, warden, *[f"q:{s}" for s in statements], "sync",
                                f"q:{item(9)}", "sync", "final")
    assert lines == [*expected_batch_lines(statements), "sync idle", OK_INSERT, "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == [9]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


@pytest.mark.parametrize("position", POSITIONS)
def test_pipeline_rejection_libpq_inside_block(warden, pg_server, libpq_bin, position):
    statements = POSITIONS[position]
    lines = util.libpq_pipeline(libpq_bin, warden, "q:begin", f"q:{item(0)}", "sync",
                                *[f"q:{s}" for s in statements], "sync",
                                "q:select 1", "sync", "q:rollback", "sync", f"q:{item(9)}", "sync", "final")
    assert lines == ["ok BEGIN 0", OK_INSERT, "sync intrans",
                     *expected_batch_lines(statements), "sync inerror",
                     f"error 25P02 {ABORTED_MESSAGE}", "sync inerror",
                     "ok ROLLBACK 0", "sync idle", OK_INSERT, "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == [9]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_pipeline_rejection_libpq_block_begun_in_batch(warden, pg_server, libpq_bin):
    lines = util.libpq_pipeline(libpq_bin, warden, "q:begin", f"q:{item(1)}", f"q:{AUDIT}", f"q:{item(2)}",
                                "q:commit", "sync", "q:commit", "sync", "final")
    # COMMIT of a failed block reports ROLLBACK.
    assert lines == ["ok BEGIN 0", OK_INSERT, AUDIT_ERROR, "aborted", "aborted", "sync inerror",
                     "ok ROLLBACK 0", "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == []
    util.assert_clean_log(warden)


def test_batches_in_flight_together_raw(warden, pg_server):
    """Several Syncs and Queries sent before any answer is read: each rejection lands in its
    own batch, and only that batch is rolled back."""
    with util.raw_session(warden) as raw:
        def extended(sql: str) -> None:
            raw.parse("", sql)
            raw.bind("", "")
            raw.execute("")

        extended(item(1))
        extended(AUDIT)
        extended(item(2))
        raw.sync()
        extended(item(3))
        raw.sync()
        raw.query(f"{item(4)}; {AUDIT}; {item(5)}")
        extended(item(6))
        extended(AUDIT)
        raw.sync()
        raw.query(f"{item(7)}; select 1")
        messages = util.read_until_ready(raw, 5)
        assert util.summary(messages) == [
            "1", "2", "C", "1", "2", "E:42501", "Z:I",
            "1", "2", "C", "Z:I",
            "C", "E:42501", "Z:I",
            "1", "2", "C", "1", "2", "E:42501", "Z:I",
            "C", "T", "D*1", "C", "Z:I"]
        assert [m.error()["M"] for m in messages if m.kind == "E"] == [util.AUDIT_MESSAGE] * 3
    assert util.committed(pg_server, "icpt_items") == [3, 7]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


# ---------------------------------------------------------------------------------------------
# A rejection after a statement whose rows are still streaming

ROWS = 200_000
STREAM_SQL = f"select generate_series(1, {ROWS})"


def test_rejection_after_streaming_rows_simple_protocol(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query(f"{STREAM_SQL}; {AUDIT}; {item(1)}")
        messages = util.read_until_ready(raw)
        assert util.summary(messages) == ["T", f"D*{ROWS}", "C", "E:42501", "Z:I"]
        assert pgwire.data_row_values(messages[1].body) == [b"1"]
        assert pgwire.data_row_values(messages[ROWS].body) == [str(ROWS).encode()]
        assert messages[-2].error()["M"] == util.AUDIT_MESSAGE
        raw.query("select 1")
        assert util.summary(util.read_until_ready(raw)) == ["T", "D*1", "C", "Z:I"]
    assert util.committed(pg_server, "icpt_items") == []
    util.assert_clean_log(warden)


def test_rejection_after_streaming_rows_psql(warden, pg_server):
    out, messages = util.psql_script(warden, psql_multi([STREAM_SQL, AUDIT]) + "select 'after';\n")
    assert out == [str(n) for n in range(1, ROWS + 1)] + ["after"]
    assert messages == [f"ERROR:  {util.AUDIT_MESSAGE}"]
    util.assert_clean_log(warden)


def test_rejection_after_streaming_rows_libpq_pipeline(warden, pg_server, libpq_bin):
    lines = util.libpq_pipeline(libpq_bin, warden, f"q:{STREAM_SQL}", f"q:{AUDIT}", f"q:{item(1)}", "sync",
                                "final")
    assert lines == [f"ok SELECT {ROWS} {ROWS}", AUDIT_ERROR, "aborted", "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == []
    util.assert_clean_log(warden)


# ---------------------------------------------------------------------------------------------
# Notice and log rules: the statement runs


def test_notice_rule_simple_and_extended_psycopg(warden, pg_server):
    notices = []
    with warden.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
        conn.execute(item(1))
        assert notices == []
        conn.execute("update icpt_items set id = id + 1")
        expected = ("NOTICE", "00000", util.ITEMS_NOTICE)
        assert notices == [expected]
        assert util.committed(pg_server, "icpt_items") == [2]
        # Extended protocol, a named prepared statement (executed twice), a pipeline.
        for _ in range(2):
            conn.execute("update icpt_items set id = id + %s", [1], prepare=True)
        assert notices == [expected] * 3
        with conn.pipeline():
            conn.execute("select 1")
            conn.execute("update icpt_items set id = id + %s", [10])
            conn.execute("select 2")
        assert notices == [expected] * 4
        assert util.committed(pg_server, "icpt_items") == [14]
        util.assert_healthy(warden, conn)


def test_notice_rule_arrives_where_the_statement_runs(warden, pg_server, libpq_bin):
    pg_server.query_one("insert into icpt_items values (1)")
    with util.raw_session(warden) as raw:
        raw.query("select 1; update icpt_items set id = 5; select 2")
        assert util.summary(util.read_until_ready(raw)) == [
            "T", "D*1", "C", "N:00000", "C", "T", "D*1", "C", "Z:I"]
    lines = util.libpq_pipeline(libpq_bin, warden, "q:select 1", "q:update icpt_items set id = 6", "q:select 2",
                                "sync", "final")
    assert lines == ["ok SELECT 1 1", f"notice 00000 {util.ITEMS_NOTICE}", "ok UPDATE 1 0", "ok SELECT 1 1",
                     "sync idle", "final 1"]
    out, messages = util.psql_script(warden, "update icpt_items set id = 7;\nselect 1;\n")
    assert (out, messages) == (["1"], [f"NOTICE:  {util.ITEMS_NOTICE}"])
    assert util.committed(pg_server, "icpt_items") == [7]
    util.assert_clean_log(warden)


def test_log_rule_runs_the_statement_silently(warden, pg_server):
    notices = []
    with warden.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("insert into icpt_items values (1), (2)")
        assert conn.execute("delete from icpt_items where id = 1").rowcount == 1
        assert conn.execute("delete from icpt_items where id = %s", [2], prepare=True).rowcount == 1
        util.assert_healthy(warden, conn)
    assert notices == []
    assert util.committed(pg_server, "icpt_items") == []
    if isinstance(warden, harness.Pgwarden):
        hits = [line for line in util.log_events(warden, "rule_matched") if '"rule":"log-item-deletes"' in line]
        assert len(hits) == 2, hits
        assert all('"action":"log"' in line and '"kind":"delete"' in line for line in hits)


# ---------------------------------------------------------------------------------------------
# A rule on application_name


def test_application_name_rule_applies_only_to_that_application(warden, pg_server, libpq_bin):
    with warden.connect(application_name="reporting-nightly") as reporting, \
            warden.connect(application_name="web") as web:
        web.execute(item(1))
        with raises_sql("25006", util.REPORTING_MESSAGE):
            reporting.execute(item(2))
        assert reporting.info.transaction_status == IDLE
        assert reporting.execute("select count(*) from icpt_items").fetchone() == (1,)
        with raises_sql("25006", util.REPORTING_MESSAGE):
            reporting.execute("insert into icpt_items values (%s)", [3])
        with raises_sql("25006", util.REPORTING_MESSAGE):
            reporting.execute("insert into icpt_items values (%s)", [3], prepare=True)
        # The application name follows SET (rolled back with a failed implicit transaction),
        # and SET LOCAL ends with its transaction.
        with raises_sql("25006", util.REPORTING_MESSAGE):
            web.execute(f"set application_name = 'reporting-x'; {item(2)}")
        assert web.info.parameter_status("application_name") == "web"
        web.execute(item(3))
        reporting.execute("set application_name = 'web-2'")
        reporting.execute(item(4))
        web.execute("begin")
        web.execute("set local application_name = 'reporting-adhoc'")
        with raises_sql("25006", util.REPORTING_MESSAGE):
            web.execute(item(5))
        web.execute("rollback")
        web.execute(item(6))
        web.execute("set application_name = 'reporting-adhoc'")
        with raises_sql("25006", util.REPORTING_MESSAGE):
            web.execute(item(7))
        assert util.committed(pg_server, "icpt_items") == [1, 3, 4, 6]
        util.assert_healthy(warden, reporting, web)
    lines = util.libpq_pipeline(libpq_bin, warden, "q:select 1", f"q:{item(8)}", "sync", "final",
                                application_name="reporting-etl")
    assert lines == ["ok SELECT 1 1", f"error 25006 {util.REPORTING_MESSAGE}", "sync idle", "final 1"]
    lines = util.libpq_pipeline(libpq_bin, warden, f"q:{item(8)}", "sync", "final", application_name="etl")
    assert lines == [OK_INSERT, "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == [1, 3, 4, 6, 8]
    util.assert_clean_log(warden)


# ---------------------------------------------------------------------------------------------
# A rule on a table name (any statement that reads or writes it)


@pytest.mark.proxy_only
def test_table_rule_rejects_every_statement_on_that_table(warden, pg_server, libpq_bin):
    with warden.connect() as conn:
        for sql in ["select * from icpt_secrets", "select * from public.icpt_secrets",
                    "select id from icpt_items where id in (select id from icpt_secrets)",
                    "select 1; select count(*) from icpt_secrets"]:
            with raises_sql("42501", util.SECRETS_MESSAGE):
                conn.execute(sql)
            assert conn.info.transaction_status == IDLE
        with raises_sql("42501", util.SECRETS_MESSAGE):
            conn.execute("select * from icpt_secrets where id = %s", [7])
        with raises_sql("42501", util.SECRETS_MESSAGE):
            conn.execute("update icpt_secrets set id = %s", [8], prepare=True)
        # Naming it is not touching it.
        assert conn.execute("select 'icpt_secrets'").fetchone() == ("icpt_secrets",)
        assert conn.execute("select count(*) from icpt_items").fetchone() == (0,)
        util.assert_healthy(warden, conn)
    lines = util.libpq_pipeline(libpq_bin, warden, "q:select 1", "q:select * from icpt_secrets", "q:select 2",
                                "sync", "final")
    assert lines == ["ok SELECT 1 1", f"error 42501 {util.SECRETS_MESSAGE}", "aborted", "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_secrets") == [7]
    util.assert_clean_log(warden)


# ---------------------------------------------------------------------------------------------
# Statements over max_statement_bytes: 54000, and the session goes on

BIG_SQL = "select '" + "x" * 2000 + "' as padding"
BIG_INSERT = "insert into icpt_items select length('" + "x" * 2000 + "')"
JUST_FITS = "select '" + "x" * (util.MAX_STATEMENT_BYTES - len("select ''")) + "'"


@pytest.mark.proxy_only
def test_statement_too_large_psycopg(warden, pg_server):
    with warden.connect() as conn:
        assert len(conn.execute(JUST_FITS).fetchone()[0]) == util.MAX_STATEMENT_BYTES - len("select ''")
        with raises_sql("54000", util.TOO_LARGE_MESSAGE):
            conn.execute(BIG_SQL)
        assert conn.info.transaction_status == IDLE
        with raises_sql("54000", util.TOO_LARGE_MESSAGE):
            conn.execute(BIG_INSERT + " where %s", [True])  # extended
        with raises_sql("54000", util.TOO_LARGE_MESSAGE):
            conn.execute(BIG_INSERT + " where %s", [True], prepare=True)
        assert conn.info.transaction_status == IDLE
        conn.execute("begin")
        conn.execute(item(1))
        with raises_sql("54000", util.TOO_LARGE_MESSAGE):
            conn.execute(BIG_INSERT)
        assert conn.info.transaction_status == INERROR
        conn.execute("rollback")
        with raises_sql("54000", util.TOO_LARGE_MESSAGE):
            with conn.pipeline():
                conn.execute(item(2))
                conn.execute(BIG_INSERT)
                conn.execute(item(3))
        assert conn.info.transaction_status == IDLE
        assert util.committed(pg_server, "icpt_items") == []
        conn.execute(item(4))
        assert util.committed(pg_server, "icpt_items") == [4]
        util.assert_healthy(warden, conn)


@pytest.mark.proxy_only
def test_statement_too_large_psql_and_libpq(warden, pg_server, libpq_bin):
    out, messages = util.psql_script(warden, f"{BIG_SQL};\n\\echo sqlstate=:SQLSTATE\n"
                                     f"begin;\n{BIG_INSERT};\nselect 1;\nrollback;\nselect 1;\n")
    assert out == ["sqlstate=54000", "1"]
    assert messages == [f"ERROR:  {util.TOO_LARGE_MESSAGE}", f"ERROR:  {util.TOO_LARGE_MESSAGE}",
                        f"ERROR:  {ABORTED_MESSAGE}"]
    lines = util.libpq_pipeline(libpq_bin, warden, f"q:{item(1)}", f"q:{BIG_INSERT}", f"q:{item(2)}", "sync",
                                f"q:{item(3)}", "sync", "final")
    assert lines == [OK_INSERT, f"error 54000 {util.TOO_LARGE_MESSAGE}", "aborted", "sync idle",
                     OK_INSERT, "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == [3]
    util.assert_clean_log(warden)


# ---------------------------------------------------------------------------------------------
# Named prepared statements are judged when they run


def test_sql_prepare_is_enforced_at_execute(warden, pg_server):
    with warden.connect() as conn:
        conn.execute("prepare ins_audit(int) as insert into audit.log values ($1)")
        conn.execute("prepare ins_items(int) as insert into icpt_items values ($1)")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute ins_audit(1)")
        assert conn.info.transaction_status == IDLE
        # EXECUTE sent through Parse/Bind/Execute (named, and in a pipeline).
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute ins_audit(2)", prepare=True)
        with raises_sql("42501", util.AUDIT_MESSAGE):
            with conn.pipeline():
                conn.execute("execute ins_items(2)")
                conn.execute("execute ins_audit(2)")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute ins_items(1); execute ins_audit(3); execute ins_items(2)")
        conn.execute("begin")
        conn.execute("execute ins_items(3)")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute ins_audit(4)")
        assert conn.info.transaction_status == INERROR
        conn.execute("rollback")
        # PREPARE and EXECUTE in one Query; the prepared statement outlives the failed Query.
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("prepare ins_audit2 as insert into audit.log values (5); execute ins_audit2")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute ins_audit2")
        conn.execute("execute ins_items(4)")
        assert util.committed(pg_server, "icpt_items") == [4]
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)


def test_protocol_named_statements_are_enforced_at_execute(warden, pg_server, libpq_bin):
    with warden.connect() as conn:
        for n in range(3):
            with raises_sql("42501", util.AUDIT_MESSAGE):
                conn.execute("insert into audit.log values (%s)", [n], prepare=True)
            assert conn.info.transaction_status == IDLE
        # The Parse itself succeeded: the server holds the named statement.
        prepared = conn.execute("select statement from pg_prepared_statements where not from_sql").fetchall()
        assert ("insert into audit.log values ($1)",) in prepared
        for n in (1, 2):
            conn.execute("insert into icpt_items values (%s)", [n], prepare=True)
        with raises_sql("42501", util.AUDIT_MESSAGE):
            with conn.pipeline():
                conn.execute("insert into icpt_items values (%s)", [3], prepare=True)
                conn.execute("insert into audit.log values (%s)", [4], prepare=True)
        assert conn.info.transaction_status == IDLE
        util.assert_healthy(warden, conn)
    lines = util.libpq_pipeline(libpq_bin, warden, "p:ins:insert into audit.log values (1)", "sync",
                                "x:ins", "sync", f"q:{item(5)}", "x:ins", f"q:{item(6)}", "sync", "final")
    assert lines == ["ok  0", "sync idle", AUDIT_ERROR, "sync idle", OK_INSERT, AUDIT_ERROR, "aborted",
                     "sync idle", "final 1"]
    assert util.committed(pg_server, "icpt_items") == [1, 2]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_explain_analyze_execute_of_forbidden_statement_is_rejected(warden, pg_server):
    with warden.connect() as conn:
        conn.execute("prepare p as insert into audit.log values (1)")
        assert conn.execute("explain execute p").fetchone() is not None  # plans only: allowed
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("explain analyze execute p")  # runs p
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)


# No bypass: a name whose first definition failed on the server, then defined again with a
# forbidden statement, is judged by its real definition.

FAILED_PARSES = {
    "syntax": ("insert into audit.log valuesx (1)", "42601"),
    "undefined-table": ("insert into audit.no_such_table values (1)", "42P01"),
}


@pytest.mark.parametrize("failure", FAILED_PARSES)
def test_failed_parse_then_forbidden_parse_of_same_name_raw(warden, pg_server, failure):
    bad_sql, bad_sqlstate = FAILED_PARSES[failure]
    with util.raw_session(warden) as raw:
        # Each in its own batch, all in one write: pgwarden has read the second Parse and
        # the Execute before the server has answered the first Parse...
        with raw.one_write():
            raw.parse("s1", bad_sql)
            raw.sync()
            raw.parse("s1", AUDIT)
            raw.sync()
            raw.bind("", "s1")
            raw.execute("")
            raw.sync()
        messages = util.read_until_ready(raw, 3)
        assert util.summary(messages) == [f"E:{bad_sqlstate}", "Z:I", "1", "Z:I", "2", "E:42501", "Z:I"]
        assert messages[5].error()["M"] == util.AUDIT_MESSAGE
        # ...and all in one.
        with raw.one_write():
            raw.parse("s2", bad_sql)
            raw.parse("s2", AUDIT)
            raw.sync()
            raw.parse("s2", AUDIT)
            raw.bind("", "s2")
            raw.execute("")
            raw.sync()
            raw.query("select 1")
        assert util.summary(util.read_until_ready(raw, 3)) == [
            f"E:{bad_sqlstate}", "Z:I", "1", "2", "E:42501", "Z:I", "T", "D*1", "C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_pipelined_parse_after_unsettled_one_waits_only_for_its_batch(warden, pg_server):
    # The first Parse of s1 succeeds: the second fails (42P05), and s1 stays the first one's,
    # a read. Queries before the redefinition, and after it, still go without waiting.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("s1", "select 7")
            raw.sync()
            raw.query("select 8")
            raw.parse("s1", AUDIT)
            raw.sync()
            raw.bind("", "s1")
            raw.execute("")
            raw.sync()
        messages = util.read_until_ready(raw, 4)
        assert util.summary(messages) == ["1", "Z:I", "T", "D*1", "C", "Z:I", "E:42P05", "Z:I",
                                          "2", "D*1", "C", "Z:I"]
        assert messages[9].body.endswith(b"7")
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


@pytest.mark.parametrize("close_runs", [False, True])
def test_close_then_pipelined_parse_of_same_name(warden, pg_server, close_runs):
    # The Close of s3 runs: the new Parse defines s3 anew (a read). Skipped (its batch
    # failed): s3 stays the forbidden write, the new Parse fails (42P05), and the Execute
    # would run the write: it is rejected.
    with util.raw_session(warden) as raw:
        raw.parse("s3", AUDIT)
        raw.sync()
        assert util.summary(util.read_until_ready(raw)) == ["1", "Z:I"]
        with raw.one_write():
            if not close_runs:
                raw.parse("", "selectx")
            raw.close_object("S", "s3")
            raw.sync()
            raw.parse("s3", "select 3")
            raw.sync()
            raw.bind("", "s3")
            raw.execute("")
            raw.sync()
        messages = util.read_until_ready(raw, 3)
        if close_runs:
            assert util.summary(messages) == ["3", "Z:I", "1", "Z:I", "2", "D*1", "C", "Z:I"]
            assert messages[5].body.endswith(b"3")
        else:
            assert util.summary(messages) == ["E:42601", "Z:I", "E:42P05", "Z:I", "2", "E:42501", "Z:I"]
            assert messages[5].error()["M"] == util.AUDIT_MESSAGE
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_close_of_unnamed_statement_then_parse_in_later_batch(warden, pg_server):
    # Whatever became of the Close, the unnamed statement is the new Parse's.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", "select 1")
            raw.close_object("S", "")
            raw.sync()
            raw.parse("", "select 4")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        messages = util.read_until_ready(raw, 2)
        assert util.summary(messages) == ["1", "3", "Z:I", "1", "2", "D*1", "C", "Z:I"]
        assert messages[5].body.endswith(b"4")
    util.assert_clean_log(warden)


def test_failed_unnamed_parse_leaves_the_next_one_defined(warden, pg_server):
    # The unnamed statement is the last Parse's: the first one's failure, answered after
    # the second Parse went out, must not make pgwarden forget the second.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", "selectx 1")
            raw.sync()
            raw.parse("", "select 42")
            raw.sync()
        assert util.summary(util.read_until_ready(raw, 2)) == ["E:42601", "Z:I", "1", "Z:I"]
        util.assert_runs_read(raw, "", b"42")
    util.assert_clean_log(warden)


@pytest.mark.parametrize("failure", ["undefined-table", "syntax"])
def test_failed_sql_prepare_then_forbidden_prepare_pipelined(warden, pg_server, failure):
    # Simple-protocol Queries sent without waiting: the second PREPARE of p is decided
    # only once the server has said whether the first one created p.
    first = FAILED_PREPARES[failure][0]
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.query(first)
            raw.query("prepare p as insert into audit.log values (1)")
            raw.query("execute p")
        messages = util.read_until_ready(raw, 3)
        assert util.summary(messages) == [f"E:{FAILED_PREPARES[failure][1]}", "Z:I", "C", "Z:I", "E:42501", "Z:I"]
        assert messages[4].error()["M"] == util.AUDIT_MESSAGE
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_prepare_in_query_skipped_after_extended_error_is_forgotten(warden, pg_server):
    # A Query inside an extended batch that failed is skipped by the server, PREPARE and
    # all: q stays undefined, and the next PREPARE of q defines it.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", "selectx")
            raw.query("prepare q as select 1")
            raw.sync()
            raw.query("prepare q as insert into audit.log values (1)")
            raw.query("execute q")
        messages = util.read_until_ready(raw, 3)
        assert util.summary(messages) == ["E:42601", "Z:I", "C", "Z:I", "E:42501", "Z:I"]
        assert messages[4].error()["M"] == util.AUDIT_MESSAGE
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_failed_deallocate_then_pipelined_parse_of_same_name(warden, pg_server):
    # DEALLOCATE fails in an aborted transaction, so p stays the read it was; the Parse of
    # p that follows at once fails (42P05), and the Execute runs the read: nothing to reject.
    with util.raw_session(warden) as raw:
        raw.query("prepare p as select 5")
        assert util.summary(util.read_until_ready(raw)) == ["C", "Z:I"]
        with raw.one_write():
            raw.query("begin")
            raw.query("select 1/0")
            raw.query("deallocate p")
            raw.query("rollback")
            raw.parse("p", AUDIT)
            raw.sync()
            raw.bind("", "p")
            raw.execute("")
            raw.sync()
        messages = util.read_until_ready(raw, 6)
        assert util.summary(messages) == ["C", "Z:T", "E:22012", "Z:E", "E:25P02", "Z:E", "C", "Z:I",
                                          "E:42P05", "Z:I", "2", "D*1", "C", "Z:I"]
        assert messages[11].body.endswith(b"5")
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


@pytest.mark.parametrize("failure", FAILED_PARSES)
def test_failed_parse_then_forbidden_parse_of_same_name_libpq(warden, pg_server, libpq_bin, failure):
    bad_sql, bad_sqlstate = FAILED_PARSES[failure]
    lines = util.libpq_pipeline(libpq_bin, warden, f"p:s1:{bad_sql}", "sync", f"p:s1:{AUDIT}", "sync",
                                "x:s1", "sync", "final")
    assert lines[0].startswith(f"error {bad_sqlstate} ")
    assert lines[1:] == ["sync idle", "ok  0", "sync idle", AUDIT_ERROR, "sync idle", "final 1"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


# SQL-level PREPARE of a name that failed (or never ran), then PREPARE of the same name
# with a forbidden statement: (first Query, its SQLSTATE).
FAILED_PREPARES = {
    "syntax": ("prepare p as insert into audit.log valuesx (1)", "42601"),
    "undefined-table": ("prepare p as select * from icpt_no_such_table", "42P01"),
    "skipped-after-error": ("select 1/0; prepare p as select 1", "22012"),
}


@pytest.mark.parametrize("failure", FAILED_PREPARES)
def test_failed_sql_prepare_then_forbidden_prepare_of_same_name(warden, pg_server, failure):
    first, sqlstate = FAILED_PREPARES[failure]
    with warden.connect() as conn:
        with raises_sql(sqlstate):
            conn.execute(first)
        conn.execute("prepare p as insert into audit.log values (1)")
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute p")
        assert conn.info.transaction_status == IDLE
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)


def test_deallocate_skipped_after_error_keeps_the_statement_enforced(warden, pg_server):
    with warden.connect() as conn:
        conn.execute("prepare p as insert into audit.log values (1)")
        with raises_sql("22012"):
            conn.execute("select 1/0; deallocate p")
        # The server skipped DEALLOCATE: p still exists, and is still a write to audit.
        with raises_sql("42501", util.AUDIT_MESSAGE):
            conn.execute("execute p")
        assert util.committed(pg_server, "audit.log") == []
        util.assert_healthy(warden, conn)


def test_close_skipped_after_error_keeps_the_statement_enforced(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("s3", AUDIT)
        raw.sync()
        raw.parse("", "selectx")
        raw.close_object("S", "s3")  # skipped by the server: the batch already failed
        raw.sync()
        raw.bind("", "s3")
        raw.execute("")
        raw.sync()
        raw.query("select 1")
        messages = util.read_until_ready(raw, 4)
        assert util.summary(messages) == ["1", "Z:I", "E:42601", "Z:I", "2", "E:42501", "Z:I",
                                          "T", "D*1", "C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)
