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


@pytest.mark.parametrize("use", ["bind", "sql_execute"])
def test_skipped_close_and_parse_then_pipelined_use(warden, pg_server, use):
    with util.raw_session(warden) as raw:
        raw.parse("s1", AUDIT)
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        with raw.one_write():
            raw.parse("x", "selectx")  # fails: the Close and Parse below are skipped
            raw.close_object("S", "s1")
            raw.parse("s1", "select 1")
            raw.sync()
            if use == "bind":
                raw.bind("", "s1")  # s1 is still the INSERT on the server
                raw.execute("")
                raw.sync()
            else:
                raw.query("execute s1")
        got = ready(raw, 2)
    assert util.committed(pg_server, "audit.log") == []
    assert got == ["E:42601", "Z:I"] + (["2", "E:42501", "Z:I"] if use == "bind" else ["E:42501", "Z:I"])


def test_fetch_of_portal_after_pipelined_failed_bind(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query("begin")
        assert ready(raw) == ["C", "Z:T"]
        raw.parse("sA", AUDIT + " returning id")
        raw.parse("sB", "select 1")
        raw.bind("p", "sA")
        raw.sync()
        assert ready(raw) == ["1", "1", "2", "Z:T"]
        raw.query("savepoint s")
        assert ready(raw) == ["C", "Z:T"]
        with raw.one_write():
            raw.bind("p", "sB")  # fails (42P03): p stays the INSERT
            raw.sync()
            raw.query("rollback to savepoint s")
            raw.query("fetch all from p")
        got = ready(raw, 3)
        raw.query("commit")
        ready(raw)
    assert util.committed(pg_server, "audit.log") == []
    assert got == ["E:42P03", "Z:E", "C", "Z:T", "E:42501", "Z:E"]


# -- pgwarden's own names cannot be taken by a client ---------------------------------------


def test_client_portal_named_like_the_old_probe(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("sA", AUDIT)
        raw.bind("pgwarden.rejected", "sA")
        raw.bind("", "sA")
        raw.execute("")  # rejected: the probe must not run the client's portal
        raw.sync()
        assert ready(raw) == ["1", "2", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_client_cursor_named_like_the_old_probe(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.query('begin; declare "pgwarden.rejected" cursor for select 1')
        assert ready(raw) == ["C", "C", "Z:T"]
        with raw.one_write():
            raw.query(AUDIT)
            raw.query(AUDIT)  # the block failed: refused by the server
            raw.query("commit")
        assert ready(raw, 3) == ["E:42501", "Z:E", "E:25P02", "Z:E", "C", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


# -- COPY FROM STDIN through the extended protocol ------------------------------------------


def copy_in_extended(raw, fail: bool) -> None:
    with raw.one_write():
        raw.parse("", "copy icpt_items from stdin")
        raw.bind("", "")
        raw.execute("")
        raw.sync()  # libpq sends it at once; the server ignores it during COPY
    assert [kind for kind, _ in raw.read_until("G")] == ["1", "2", "G"]
    if fail:
        raw.send(b"f", b"client gave up\0")
        raw.sync()
        assert ready(raw) == ["E:57014", "Z:I"]
    else:
        raw.send(b"d", b"1\n")
        raw.send(b"c")
        raw.sync()
        assert ready(raw) == ["C", "Z:I"]


@pytest.mark.parametrize("fail", [False, True])
def test_sync_during_copy_in_is_not_an_answer_to_wait_for(warden, pg_server, fail):
    with util.raw_session(warden) as raw:
        copy_in_extended(raw, fail)
        raw.parse("s1", "select 1")
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        with raw.one_write():
            raw.parse("s1", "select 2")
            raw.sync()
            raw.query(AUDIT)
        assert ready(raw, 2) == ["E:42P05", "Z:I", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    assert util.committed(pg_server, "icpt_items") == ([] if fail else [1])
    util.assert_clean_log(warden)


def read_through(raw, kind: str) -> list[str]:
    return [k for k, _ in raw.read_until(kind)]


@pytest.mark.parametrize("pipelined", [False, True])
def test_sync_during_the_second_copy_of_one_query(warden, pg_server, pipelined):
    # Both copies are one Query's: the Sync sent during the second is ignored too, so no
    # later wait for an answer may count on a ReadyForQuery for it.
    with util.raw_session(warden) as raw:
        raw.query("copy icpt_items from stdin; copy icpt_items from stdin")
        assert read_through(raw, "G") == ["G"]
        raw.send(b"d", b"1\n")
        raw.send(b"c")
        assert read_through(raw, "G") == ["C", "G"]
        raw.sync()  # ignored by the server
        raw.send(b"d", b"2\n")
        raw.send(b"c")
        assert ready(raw) == ["C", "Z:I"]
        if pipelined:
            with raw.one_write():
                raw.parse("s1", "selectx")
                raw.sync()
                raw.parse("s1", AUDIT)
                raw.bind("", "s1")
                raw.execute("")
                raw.sync()
            assert ready(raw, 2) == ["E:42601", "Z:I", "1", "2", "E:42501", "Z:I"]
        else:
            raw.parse("s1", "selectx")
            raw.sync()
            assert ready(raw) == ["E:42601", "Z:I"]
            raw.parse("s1", AUDIT)
            raw.sync()
            assert ready(raw) == ["1", "Z:I"]
            raw.bind("", "s1")
            raw.execute("")
            raw.sync()
            assert ready(raw) == ["2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []
    assert util.committed(pg_server, "icpt_items") == [1, 2]


@pytest.mark.parametrize("extended", [False, True])
def test_copy_that_fails_midway_then_a_sync(warden, pg_server, extended):
    # Bad copy data ends the copy on the server: the client's next Sync is answered.
    with util.raw_session(warden) as raw:
        if extended:
            raw.parse("", "copy icpt_items from stdin")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
            assert read_through(raw, "G") == ["1", "2", "G"]
            raw.send(b"d", b"notanint\n")
            assert read_through(raw, "E") == ["E"]
            raw.sync()
            assert ready(raw) == ["Z:I"]
        else:
            raw.query("copy icpt_items from stdin")
            assert read_through(raw, "G") == ["G"]
            raw.send(b"d", b"notanint\n")
            assert ready(raw) == ["E:22P02", "Z:I"]
        raw.parse("s1", "selectx")
        raw.sync()
        assert ready(raw) == ["E:42601", "Z:I"]
        with raw.one_write():
            raw.parse("s1", AUDIT)
            raw.bind("", "s1")
            raw.execute("")
            raw.sync()
        assert ready(raw) == ["1", "2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_deallocate_all_keeps_the_unnamed_statement(warden, pg_server):
    with util.raw_session(warden) as raw:
        raw.parse("d", "deallocate all")
        raw.parse("", "select 5")
        raw.sync()
        assert ready(raw) == ["1", "1", "Z:I"]
        raw.bind("pd", "d")
        raw.execute("pd")
        raw.sync()
        assert ready(raw) == ["2", "C", "Z:I"]
        util.assert_runs_read(raw, "", b"5")


# -- text the server reads otherwise than libpg_query ---------------------------------------


def test_backslash_quotes_with_standard_conforming_strings_off(warden, pg_server):
    # Text with a backslash is judged unknown then (docs/semantics.md): here, rejected.
    with util.raw_session(warden) as raw:
        raw.query("set standard_conforming_strings = off")
        util.read_until_ready(raw)
        # To the server: a SELECT of 'x'' then the INSERT; to a standard reading: one SELECT.
        raw.query("select 'x\\''; insert into audit.log values (100); --'")
        assert [m for m in ready(raw) if not m.startswith("N:")][-2:] == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


@pytest.mark.parametrize("encoding", ["SJIS", "GBK"])
def test_client_only_encoding_cannot_hide_a_quote(warden, pg_server, encoding):
    with util.raw_session(warden, client_encoding=encoding) as raw:
        # 0x95 0x5C is one character in SJIS and GBK: the backslash does not escape the quote.
        raw.send(b"Q", b"select E'\x95\\'; insert into audit.log values (100); --'\0")
        assert ready(raw)[-2:] == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_long_non_ascii_names_in_a_converted_encoding(warden, pg_server):
    n1 = ("\xe9" * 32 + "x").encode("latin1")  # 33 bytes here, 65 in UTF-8 on the server:
    n2 = ("\xe9" * 32 + "y").encode("latin1")  # the server keys both by the same 63 bytes
    with util.raw_session(warden, client_encoding="LATIN1") as raw:
        raw.send(b"P", n1 + b"\0select 1\0\0\0")
        raw.sync()
        assert ready(raw) == ["1", "Z:I"]
        raw.send(b"C", b"S" + n2 + b"\0")
        raw.send(b"P", n2 + b"\0" + AUDIT.encode() + b"\0\0\0")
        raw.sync()
        assert ready(raw) == ["3", "1", "Z:I"]
        raw.send(b"B", b"\0" + n1 + b"\0" + b"\0\0\0\0\0\0")
        raw.execute("")
        raw.sync()
        assert ready(raw) == ["2", "E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


# -- a setting that changes the reading, sent without waiting for its answer ---------------

# Read with standard_conforming_strings on, one SELECT of two literals; read with it off (as
# the server does after the SET), a SELECT of one literal, the INSERT, and a comment.
SCS_QUERY = "select 'x\\', '; insert into audit.log values (100); --'"
# The same trick in one statement, for the extended protocol: with it off, a WITH that
# inserts; with it on, a WITH whose second literal holds the insert.
SCS_STATEMENT = ("with a as (select 'x\\', ' as y), b as (insert into audit.log values (100) returning 1) "
                 "select 1 from a, b --') select * from a")
SCS_OFF = {
    "set": "set standard_conforming_strings = off",
    "set_config": "select set_config('standard_conforming_strings', 'off', false)",
}


def last_answers(raw, count: int) -> list[str]:
    """The last two answers up to the count-th ReadyForQuery, notices left out."""
    return [m for m in ready(raw, count) if not m.startswith("N:")][-2:]


@pytest.mark.parametrize("how", ["set", "set_config", "set_config_extended"])
def test_setting_change_pipelined_with_the_text_it_affects(warden, pg_server, how):
    with util.raw_session(warden) as raw:
        with raw.one_write():
            if how == "set_config_extended":
                raw.parse("", SCS_OFF["set_config"])
                raw.bind("", "")
                raw.execute("")
                raw.sync()
            else:
                raw.query(SCS_OFF[how])
            raw.query(SCS_QUERY)
        assert last_answers(raw, 2) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_client_encoding_change_pipelined_with_the_text_it_affects(warden, pg_server):
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.query("set client_encoding = 'SJIS'")
            # 0x95 0x5C is one character in SJIS: the backslash does not escape the quote.
            raw.send(b"Q", b"select E'\x95\\'; insert into audit.log values (100); select ' --'\0")
        assert last_answers(raw, 2) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_setting_change_in_the_open_batch_makes_backslash_text_unknown(warden, pg_server):
    # The server reports the change only at the batch's ReadyForQuery, which waits for the
    # client's Sync: pgwarden cannot wait, and judges the text unknown (here, rejected).
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", SCS_OFF["set_config"])
            raw.bind("", "")
            raw.execute("")
            raw.parse("", SCS_STATEMENT)
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        assert last_answers(raw, 1) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_backslash_text_after_an_answered_batch_runs(warden, pg_server):
    # Held until the earlier statement's answer said the reading stays: then judged as usual.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.query("select 1")
            raw.query("select 'a\\b' as v")
        assert ready(raw, 2) == ["T", "D*1", "C", "Z:I", "T", "D*1", "C", "Z:I"]
        with raw.one_write():
            raw.parse("", "select 1")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
            raw.parse("", "select 'a\\b' as v")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        assert ready(raw, 2) == ["1", "2", "D*1", "C", "Z:I", "1", "2", "D*1", "C", "Z:I"]


@pytest.mark.parametrize("kind", ["query", "parse"])
def test_client_encoding_change_pipelined_with_high_bytes(warden, pg_server, kind):
    # No backslash: 0x82 0x60 is one SJIS character whose second byte is a backquote, on
    # which libpg_query's reading fails (an unparsable statement names no table), while the
    # server reads an identifier, then the INSERT.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.query("set client_encoding = 'SJIS'")
            if kind == "query":
                raw.send(b"Q", b"select 1 as a\x82\x60; insert into audit.log values (100)\0")
            else:
                raw.send(b"P", b"\0with a\x82\x60 as (insert into audit.log values (100) returning 1) "
                               b"select * from a\x82\x60\0\0\0")
                raw.bind("", "")
                raw.execute("")
                raw.sync()
        assert last_answers(raw, 2) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_bind_may_change_the_reading(warden, pg_server):
    # Planning the unnamed statement at Bind folds an immutable function, which here turns
    # standard_conforming_strings off; no Execute comes before the next Parse.
    with pg_server.connect() as conn:
        conn.execute("create or replace function public.names_scs_off() returns int language plpgsql immutable "
                     "as $$ begin perform set_config('standard_conforming_strings', 'off', false); return 1; end $$")
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", "select public.names_scs_off()")
            raw.bind("", "")
            raw.parse("", SCS_STATEMENT)
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        assert last_answers(raw, 1) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


@pytest.mark.parametrize("then", ["query", "parse"])
def test_answers_without_ready_for_query_do_not_settle_the_reading(warden, pg_server, then):
    # Flush brings the Execute's answer, but the ParameterStatus waits for ReadyForQuery:
    # nothing is unanswered, yet the setting may have changed. Nothing is pipelined here.
    with util.raw_session(warden) as raw:
        raw.parse("", SCS_OFF["set_config"])
        raw.bind("", "")
        raw.execute("")
        raw.flush()
        assert [kind for kind, _ in raw.read_until("C")] == ["1", "2", "D", "C"]
        if then == "query":
            raw.query(SCS_QUERY)
        else:
            raw.parse("", SCS_STATEMENT)
            raw.bind("", "")
            raw.execute("")
            raw.sync()
        assert last_answers(raw, 1) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


@pytest.mark.parametrize("backslash", [False, True])
def test_text_after_an_extended_copy_in_one_write(warden, pg_server, backslash):
    # The Sync after the COPY's Execute is one the server ignores: no ReadyForQuery comes
    # before the Query, so pgwarden cannot wait for one. Text that may read otherwise is
    # judged unknown (rejected here, fail closed); other text runs. Nothing hangs.
    with util.raw_session(warden) as raw:
        with raw.one_write():
            raw.parse("", "copy icpt_items from stdin")
            raw.bind("", "")
            raw.execute("")
            raw.sync()
            raw.send(b"d", b"1\n")
            raw.send(b"c")
            raw.query("select 'a\\b' as v" if backslash else "select 'ab' as v")
        answers = ready(raw)
        assert answers[:4] == ["1", "2", "G", "C"]
        if backslash and not harness.direct_mode():
            assert answers[4:] == ["E:42501", "Z:I"]
        else:
            assert answers[4:] == ["T", "D*1", "C", "Z:T"] or answers[4:5] == ["T"]


@pytest.mark.parametrize("extended", [False, True])
def test_sync_between_copy_data_and_copy_done(warden, pg_server, extended):
    # The server ignores such a Sync while the copy runs, and answers it once bad data has
    # ended the copy: pgwarden cannot know which, and does not forward it (the client then
    # gets no ReadyForQuery for it). A statement pipelined after it keeps its own answer.
    with util.raw_session(warden) as raw:
        if extended:
            with raw.one_write():
                raw.parse("", "copy icpt_items from stdin")
                raw.bind("", "")
                raw.execute("")
                raw.sync()
            assert read_through(raw, "G") == ["1", "2", "G"]
        else:
            raw.query("copy icpt_items from stdin")
            assert read_through(raw, "G") == ["G"]
        with raw.one_write():
            raw.send(b"d", b"notanint\n")
            raw.sync()
            raw.send(b"c")
            if extended:
                raw.sync()
            raw.query("set standard_conforming_strings = off")
            raw.query(AUDIT)
        answers = ready(raw, 4 if harness.direct_mode() else 3)
        if harness.direct_mode():
            assert answers[:3] == ["E:22P02", "Z:I", "Z:I"]
        else:
            assert answers[:2] == ["E:22P02", "Z:I"] and answers[2] != "Z:I"
        assert answers[-2:] == ["E:42501", "Z:I"]
        # The setting change was seen before the next text.
        raw.query(SCS_QUERY)
        assert last_answers(raw, 1) == ["E:42501", "Z:I"]
    assert util.committed(pg_server, "audit.log") == []


def test_sql_names_cut_after_conversion(warden, pg_server):
    # In LATIN1 these two names are 41 bytes each; converted to UTF-8 the server cuts both
    # to the same 63 bytes. SQL names like these are judged unknown (here, rejected).
    x = ("\xe9" * 40 + "x").encode("latin1")
    y = ("\xe9" * 40 + "y").encode("latin1")

    def q(raw, sql: bytes) -> list[str]:
        raw.send(b"Q", sql + b"\0")
        return [m for m in ready(raw) if not m.startswith("N:")]

    with util.raw_session(warden, client_encoding="LATIN1") as raw:
        q(raw, b"prepare " + y + b" as select 1")
        q(raw, b"deallocate " + x)
        q(raw, b"prepare " + x + b" as " + AUDIT.encode())
        assert q(raw, b"execute " + y)[-2:] == ["E:42501", "Z:I"]
        assert q(raw, b"begin") == ["C", "Z:T"]
        raw.parse("", AUDIT + " returning id")
        raw.send(b"B", b"a" + b"\xe9" * 40 + b"x\0\0" + b"\0\0\0\0\0\0")
        raw.sync()
        assert ready(raw) == ["1", "2", "Z:T"]
        assert q(raw, b'fetch all from "a' + b"\xe9" * 40 + b'y"')[-2:] == ["E:42501", "Z:E"]
        q(raw, b"commit")
    assert util.committed(pg_server, "audit.log") == []
