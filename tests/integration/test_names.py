# Statement and portal names as the server sees them, against clients that try to make
# pgwarden judge one statement while the server runs another: names cut at 63 bytes,
# Binds that fail and leave the old portal, PREPARE and DEALLOCATE run through the
# extended protocol or undone by a failure, FETCH from a protocol-level portal, and
# batches sent without waiting for answers (RawConnection.one_write).
#
# Every test names a forbidden statement (a write to audit.log) that must never run, or an
# allowed one that must run. PGWARDEN_DIRECT=1 runs them against PostgreSQL itself, whose
# triggers raise what the rules would: that proves the expectations.
from __future__ import annotations

import pytest

import harness
import interception_util as util

AUDIT = "insert into audit.log values (100)"
A63 = "a" * 63


@pytest.fixture
def warden(pgwarden_factory, pg_server):
    util.reset_schema(pg_server)
    return pgwarden_factory(util.CONFIG, direct_equivalent=True)


def ready(raw, count: int = 1) -> list[str]:
    return util.summary(util.read_until_ready(raw, count))


# -- names past 63 bytes ------------------------------------------------------------------


def test_statement_names_are_cut_at_63_bytes(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse(A63 + "y", "select 1")
        raw.close_object("S", A63 + "x")  # the same statement, to the server
        raw.parse(A63 + "x", AUDIT)
        raw.bind("", A63 + "y")  # runs the INSERT
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["1", "3", "1", "2", "E:42501", "Z:I"]
        # A definition under one long name is the one under the others.
        raw.close_object("S", A63 + "z")
        raw.parse(A63 + "q", "select 2")
        raw.sync()
        assert ready(raw) == ["3", "1", "Z:I"]
        util.assert_runs_read(raw, A63 + "r", b"2")
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_sql_deallocate_of_a_long_name_reaches_the_protocol_statement(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse(A63 + "y", "select 1")
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        raw.query(f'deallocate "{A63}x"')
        messages = util.read_until_ready(raw)
        assert [m for m in util.summary(messages) if not m.startswith("N:")] == ["C", "Z:I"]
        raw.parse(A63 + "x", AUDIT)
        raw.bind("", A63 + "y")
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["1", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_portal_names_are_cut_at_63_bytes(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("sA", AUDIT)
        raw.parse("sB", "select 1")
        raw.bind(A63 + "y", "sB")
        raw.close_object("P", A63 + "x")  # the same portal, to the server
        raw.bind(A63 + "x", "sA")
        raw.execute(A63 + "y")  # runs the INSERT
        raw.sync()
        assert ready(raw) == ["1", "1", "2", "3", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


# -- a Bind that fails leaves the old portal -----------------------------------------------


@pytest.mark.parametrize("pipelined", [False, True])
def test_failed_bind_of_existing_portal_keeps_the_old_portal(warden, pg_server, pipelined):
    with util.raw_session(warden) as raw:
        raw.query("begin")
        assert ready(raw) == ["C", "Z:T"]
        raw.parse("sA", AUDIT)
        raw.parse("sB", "select 1")
        raw.bind("p", "sA")
        raw.sync()
        assert ready(raw) == ["1", "1", "2", "Z:T"]
        raw.query("savepoint s")
        assert ready(raw) == ["C", "Z:T"]
        steps = [
            (lambda: (raw.bind("p", "sB"), raw.sync()), ["E:42P03", "Z:E"]),  # p stays the INSERT
            (lambda: raw.query("rollback to savepoint s"), ["C", "Z:T"]),
            (lambda: (raw.execute("p"), raw.sync()), ["E:42501", "Z:E"]),
        ]
        if pipelined:
            with raw.one_write():
                for send, _ in steps:
                    send()
            assert ready(raw, len(steps)) == [m for _, expected in steps for m in expected]
        else:
            for send, expected in steps:
                send()
                assert ready(raw) == expected
        raw.query("commit")
        assert ready(raw) == ["C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_failed_bind_of_unnamed_portal_keeps_the_old_one(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query("begin")
        assert ready(raw) == ["C", "Z:T"]
        raw.parse("sA", AUDIT)
        raw.parse("sB", "select 1")
        raw.parse("sv", "savepoint s")
        raw.bind("", "sA")
        raw.bind("q1", "sv")  # a simple Query would replace the unnamed portal
        raw.execute("q1")
        raw.sync()
        assert ready(raw) == ["1", "1", "1", "2", "2", "C", "Z:T"]
        raw.bind("", "sB", (b"1",))  # one parameter too many: fails before replacing ""
        raw.sync()
        assert ready(raw) == ["E:08P01", "Z:E"]
        raw.parse("rb", "rollback to savepoint s")
        raw.bind("q2", "rb")
        raw.execute("q2")
        raw.sync()
        assert ready(raw) == ["1", "2", "C", "Z:T"]
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["E:42501", "Z:E"]
        raw.query("commit")
        assert ready(raw) == ["C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


# -- PREPARE and DEALLOCATE through the extended protocol ---------------------------------


def test_prepare_run_by_skipped_protocol_execute_is_forgotten(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("x", "selectx")
        raw.parse("", "prepare q as select 1")
        raw.bind("", "")
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["E:42601", "Z:I"]
        raw.query(f"prepare q as {AUDIT}")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("execute q")
        assert ready(raw) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_prepare_run_by_protocol_execute_is_judged_at_sql_execute(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("", f"prepare q as {AUDIT}")
        raw.bind("", "")
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["1", "2", "C", "Z:I"]
        raw.query("execute q")
        assert ready(raw) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_deallocate_run_by_skipped_protocol_execute_then_pipelined_parse(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("s1", AUDIT)
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        with raw.one_write():
            raw.parse("x", "selectx")
            raw.parse("", "deallocate s1")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
            raw.parse("s1", "select 1")  # fails (42P05): s1 is still the INSERT
            raw.sync()
            raw.bind("", "s1")
            raw.execute("")
            raw.sync()
        assert ready(raw, 3) == ["E:42601", "Z:I", "E:42P05", "Z:I", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


# -- FETCH and MOVE run protocol-level portals ---------------------------------------------


@pytest.mark.parametrize("verb", ["fetch all from p", "move all in p"])
def test_fetch_from_protocol_portal_is_judged_as_its_statement(warden, pg_server, verb):
    with util.raw_session(warden) as raw:
        raw.query("begin")
        assert ready(raw) == ["C", "Z:T"]
        raw.parse("sA", AUDIT + " returning id")
        raw.bind("p", "sA")
        raw.sync()
        assert ready(raw) == ["1", "2", "Z:T"]
        raw.query(verb)
        assert ready(raw) == ["E:42501", "Z:E"]
        raw.query("commit")
        assert ready(raw) == ["C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_fetch_from_sql_cursor_stays_a_read(warden, pg_server):
    with warden.connect() as conn:
        with conn.transaction():
            with conn.cursor(name="reader") as cursor:  # DECLARE and FETCH
                cursor.execute("select generate_series(1, 5)")
                assert [r[0] for r in cursor.fetchmany(3)] == [1, 2, 3]
                assert [r[0] for r in cursor.fetchall()] == [4, 5]
        util.assert_healthy(warden, conn)


# -- SQL PREPARE, DEALLOCATE and their undoing ---------------------------------------------


def test_sql_prepare_after_protocol_close_in_the_same_batch(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query("prepare s1 as select 1")
        assert ready(raw) == ["C", "Z:I"]
        with raw.one_write():
            raw.close_object("S", "s1")  # no Sync: the Query below runs after it
            raw.query(f"prepare s1 as {AUDIT}")
            raw.query("execute s1")
        assert ready(raw, 2) == ["3", "C", "Z:I", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_failed_query_undoes_its_prepare_then_deallocate(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query("select 1/0; prepare q as select 1; deallocate q")
        assert ready(raw) == ["E:22012", "Z:I"]
        raw.query(f"prepare q as {AUDIT}")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("execute q")
        assert ready(raw) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_failed_query_undoes_its_deallocate_then_prepare(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query("prepare q as select 1")
        assert ready(raw) == ["C", "Z:I"]
        raw.query(f"select 1/0; deallocate q; prepare q as {AUDIT}")
        assert ready(raw) == ["E:22012", "Z:I"]
        raw.query("execute q")  # still the read
        assert ready(raw) == ["T", "D*1", "C", "Z:I"]


@pytest.mark.parametrize("remove", ["select 1/0; deallocate all", "discard all"])
def test_failed_deallocate_all_keeps_the_statements(warden, pg_server, remove):
    with util.raw_session(warden) as raw:
        raw.query("prepare p as select 1")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("begin")
        assert ready(raw) == ["C", "Z:T"]
        raw.query("select 1/0")
        assert ready(raw) == ["E:22012", "Z:E"]
        raw.query(remove)
        assert ready(raw) == ["E:25P02", "Z:E"]
        raw.query("rollback")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("execute p")
        assert ready(raw) == ["T", "D*1", "C", "Z:I"]


@pytest.mark.parametrize("remove", [["select 1/0; deallocate all"], ["begin", "discard all", "rollback"]])
def test_failed_deallocate_all_then_pipelined_prepare(warden, pg_server, remove):
    with util.raw_session(warden) as raw:
        raw.query(f"prepare p as {AUDIT}")
        assert ready(raw) == ["C", "Z:I"]
        with raw.one_write():
            for sql in remove:
                raw.query(sql)
            raw.query("prepare p as select 1")
            raw.query("execute p")
        assert ready(raw, len(remove) + 2)[-4:] == ["E:42P05", "Z:I", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


THROTTLE_CONFIG = util.CONFIG + """
[[throttle]]
name = "items"
statements = ["insert"]
rate = 0.001
burst = 1
action = "reject"
"""


def test_throttle_rejected_query_undoes_its_prepare(pgwarden_factory, pg_server):
    if harness.direct_mode():
        pytest.skip("throttles are pgwarden's")
    util.reset_schema(pg_server)
    warden = pgwarden_factory(THROTTLE_CONFIG)
    with util.raw_session(warden) as raw:
        raw.query("insert into icpt_items values (1)")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("prepare q as select 1; insert into icpt_items values (2)")
        assert ready(raw) == ["E:53400", "Z:I"]
        raw.query(f"prepare q as {AUDIT}")
        assert ready(raw) == ["C", "Z:I"]
        raw.query("execute q")
        assert ready(raw) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


# -- what a skipped Parse or a failed Bind leaves in place ----------------------------------


def test_skipped_unnamed_parse_leaves_the_unnamed_statement_before_it(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("", "select 5")
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        raw.parse("x", "selectx")
        raw.parse("", AUDIT)  # skipped: the unnamed statement is still the read
        raw.sync()
        assert ready(raw) == ["E:42601", "Z:I"]
        util.assert_runs_read(raw, "", b"5")


def test_skipped_unnamed_parse_pipelined(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("", AUDIT)
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        with raw.one_write():
            raw.parse("x", "selectx")
            raw.parse("", "select 1")  # skipped: the unnamed statement is still the INSERT
            raw.sync()
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        assert ready(raw, 2) == ["E:42601", "Z:I", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    util.assert_clean_log(warden)


def test_skipped_close_and_parse_leave_the_statement_before(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("s3", "select 3")
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        raw.parse("", "selectx")
        raw.close_object("S", "s3")
        raw.parse("s3", AUDIT)
        raw.sync()
        assert ready(raw) == ["E:42601", "Z:I"]
        util.assert_runs_read(raw, "s3", b"3")
