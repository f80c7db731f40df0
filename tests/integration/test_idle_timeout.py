# idle_timeout: a client idle inside a transaction longer than the timeout has it rolled
# back on the server at once, so that a client waiting on its row lock proceeds; the idle
# client keeps its connection, gets 25P03 at its next statement, then 25P02 until it ends
# the transaction, and nothing it wrote is committed. Simple and extended protocol.
from __future__ import annotations

import threading
import time

import psycopg
import pytest

import harness
from nesting_util import (Checkpoint, Step, committed_ids, committed_notes, config, create_table, log_events, metric,
                          open_session, run_script, wait_for_events)

pytestmark = pytest.mark.proxy_only

T = "idle_t"
IDLE_TIMEOUT = 1.0
# The waiting client must get the lock within this long of the idle client going idle.
LOCK_WAIT_BOUND = IDLE_TIMEOUT + 2.0
I, T_, E = "IDLE", "INTRANS", "INERROR"


@pytest.fixture
def table(pg_server):
    create_table(pg_server, T)
    with pg_server.connect() as conn:
        conn.execute(f"INSERT INTO {T} VALUES (1, 'original')")
    return T


def waiting_on_lock(pg_server, application_name: str) -> bool:
    return bool(pg_server.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
        (application_name,)))


class Blocked:
    """A second client, through pgwarden, that takes the idle transaction's row lock."""

    def __init__(self, proxy, sql: str) -> None:
        self.conn = proxy.connect(application_name="idle-waiter")
        self.sql = sql
        self.result = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            cur = self.conn.execute(self.sql)
            self.result = cur.fetchall() if cur.description else cur.statusmessage
        except BaseException as e:  # reported by the test
            self.error = e
        self.finished_at = time.monotonic()

    def start(self) -> "Blocked":
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.conn.cancel()
            self.thread.join(5)
            raise AssertionError(f"the waiting client still waits {timeout:.1f}s later")
        if self.error is not None:
            raise AssertionError(f"the waiting client failed: {self.error!r}")


CASES = [
    ("psql", f"SELECT note FROM {T} WHERE id = 1 FOR UPDATE", [("original",)]),
    ("psycopg2", f"UPDATE {T} SET note = 'waiter' WHERE id = 1", "UPDATE 1"),
    ("psycopg-prepared", f"SELECT note FROM {T} WHERE id = 1 FOR UPDATE", [("original",)]),
    ("psycopg-pipeline", f"UPDATE {T} SET note = 'waiter' WHERE id = 1", "UPDATE 1"),
]


@pytest.mark.parametrize("client,blocker_sql,blocker_result", CASES, ids=[c[0] for c in CASES])
def test_idle_transaction_rolled_back_and_lock_released(pgwarden_factory, pg_server, table, client, blocker_sql,
                                                        blocker_result):
    proxy = pgwarden_factory(config("warn", idle_timeout="1s"))
    session = open_session(client, proxy, application_name="idle-holder")
    blocked = Blocked(proxy, blocker_sql)  # connected now, so that it queries at once later
    try:
        problems = run_script(session, [
            Step("BEGIN", "BEGIN", T_),
            Step(f"UPDATE {T} SET note = 'idle' WHERE id = 1", "UPDATE 1", T_),
            Step(f"INSERT INTO {T} VALUES (2, 'idle')", "INSERT 0 1", T_),
        ], list)
        idle_since = time.monotonic()
        blocked.start()
        # It really waits on the idle transaction's lock (well before the timeout fires).
        harness.wait_until(lambda: waiting_on_lock(pg_server, "idle-waiter"), IDLE_TIMEOUT * 0.8,
                           "the second client to wait on the row lock", interval=0.02)
        blocked.join(LOCK_WAIT_BOUND)
        waited = blocked.finished_at - idle_since
        assert IDLE_TIMEOUT * 0.8 <= waited < LOCK_WAIT_BOUND, f"lock released {waited:.2f}s after going idle"
        # It saw the row as it was before the idle transaction.
        assert blocked.result == blocker_result

        problems += run_script(session, [
            Step("SELECT 1", "ERROR 25P03", E),
            Step("SELECT 1", "ERROR 25P02", E),
            Step(f"INSERT INTO {T} VALUES (3, 'idle')", "ERROR 25P02", E),
            Step("COMMIT", "ROLLBACK", I),
            # The connection is as good as new.
            Step("BEGIN", "BEGIN", T_), Step(f"INSERT INTO {T} VALUES (4, 'after')", "INSERT 0 1", T_),
            Step("COMMIT", "COMMIT", I),
            Step("SELECT 1", "SELECT 1", I, value="1"),
        ], list)
    finally:
        session.close()
        blocked.conn.close()
    assert problems == [], f"via {client}:\n" + "\n".join(problems)
    expected_first = "waiter" if blocker_sql.startswith("UPDATE") else "original"
    assert committed_notes(pg_server, table) == sorted([expected_first, "after"])
    assert metric(proxy, "pgwarden_idle_transaction_rollbacks_total") == 1
    assert metric(proxy, "pgwarden_transactions_total", outcome="idle_rollback") == 1
    (event,) = wait_for_events(proxy, "idle_transaction_rolled_back", 1)
    assert event["client"] == "idle-holder"
    assert event["idle_timeout"] == "1s"


@pytest.mark.parametrize("style", ["simple", "prepared"])
def test_idle_rollback_error_and_rollback(pgwarden_factory, pg_server, table, style):
    """The 25P03 error says what happened; ROLLBACK ends the block quietly; a server-side
    check shows the server's transaction is long gone."""
    proxy = pgwarden_factory(config("warn", idle_timeout="1s"))
    prepare = style == "prepared"
    with proxy.connect(application_name="idle-holder") as conn:
        conn.execute("BEGIN", prepare=prepare)
        conn.execute(f"DELETE FROM {T}", prepare=prepare)
        harness.wait_until(lambda: pg_server.backend_pids("idle-holder", state="idle"), IDLE_TIMEOUT + 2,
                           "pgwarden to roll the idle transaction back on the server")
        assert pg_server.query_one(f"SELECT count(*) FROM {T}") == 1
        assert conn.info.transaction_status.name == "INTRANS"  # the client has not been told yet
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT 1", prepare=prepare)
        assert info.value.sqlstate == "25P03"
        assert info.value.diag.message_primary.startswith("pgwarden: transaction rolled back after 1s")
        assert conn.info.transaction_status.name == "INERROR"
        assert conn.execute("ROLLBACK", prepare=prepare).statusmessage == "ROLLBACK"
        assert conn.info.transaction_status.name == "IDLE"
        assert conn.execute("SELECT count(*) FROM " + T, prepare=prepare).fetchone() == (1,)


def test_busy_transaction_is_not_idle(pgwarden_factory, pg_server, table):
    """A statement running longer than the timeout, and a client idle outside any
    transaction, are left alone."""
    proxy = pgwarden_factory(config("warn", idle_timeout="1s"))
    with proxy.connect(application_name="busy") as busy, proxy.connect(application_name="resting") as resting:
        resting.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute(f"UPDATE {T} SET note = 'busy' WHERE id = 1")
        busy.execute("SELECT pg_sleep(1.3)")
        busy.execute("COMMIT")
        assert resting.execute("SELECT 2").fetchone() == (2,)
    assert committed_notes(pg_server, table) == ["busy"]
    assert metric(proxy, "pgwarden_idle_transaction_rollbacks_total") == 0
    assert log_events(proxy, "idle_transaction_rolled_back") == []


def test_idle_timer_restarts_with_each_statement(pgwarden_factory, pg_server, table):
    """Statements closer together than the timeout keep the transaction alive, however long
    it lasts in total."""
    proxy = pgwarden_factory(config("warn", idle_timeout="1s"))
    with proxy.connect(application_name="chatty") as conn:
        conn.execute("BEGIN")
        started = time.monotonic()
        n = 10
        while time.monotonic() - started < 1.6:
            conn.execute(f"INSERT INTO {T} VALUES ({n}, 'chatty')")
            n += 1
            time.sleep(0.4)
        conn.execute("COMMIT")
    assert committed_notes(pg_server, table).count("chatty") == n - 10
    assert metric(proxy, "pgwarden_idle_transaction_rollbacks_total") == 0


def test_idle_timeout_in_flatten_nested_scope(pgwarden_factory, pg_server, table):
    """A transaction idle inside a flattened nested scope is rolled back whole; the client
    ends it with its inner and outer ROLLBACK, or COMMITs that the server answers ROLLBACK."""
    proxy = pgwarden_factory(config("flatten", idle_timeout="1s"))
    session = open_session("psycopg2", proxy, application_name="idle-nested")
    try:
        problems = run_script(session, [
            Step("BEGIN", "BEGIN", T_), Step(f"INSERT INTO {T} VALUES (2, 'outer')", "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_), Step(f"INSERT INTO {T} VALUES (3, 'inner')", "INSERT 0 1", T_),
        ], list)
        harness.wait_until(lambda: metric(proxy, "pgwarden_idle_transaction_rollbacks_total") == 1,
                           IDLE_TIMEOUT + 2, "the idle rollback")
        problems += run_script(session, [
            Step("SELECT 1", "ERROR 25P03", E),
            Step("COMMIT", "ROLLBACK", I),                       # the inner scope's COMMIT
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),     # the outer one: no transaction
            Checkpoint([1]),
            Step("BEGIN", "BEGIN", T_), Step(f"INSERT INTO {T} VALUES (4, 'later')", "INSERT 0 1", T_),
            Step("COMMIT", "COMMIT", I),
        ], lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], "\n".join(problems)
    assert committed_notes(pg_server, table) == ["later", "original"]
