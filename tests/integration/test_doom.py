# Doomed transactions: doomed by an operator (POST /api/clients/{id}/doom) while the client
# sits idle in its transaction, or by a [[rule]] with action "doom". A doomed transaction
# still reads; each write fails with 25006, also a write pgwarden cannot see (inside a
# function: the server refuses it, the transaction having been made read-only); COMMIT
# rolls back and fails with 40000; ROLLBACK succeeds; the next transaction is clean.
from __future__ import annotations

import psycopg
import pytest

from nesting_util import (CLIENTS, Checkpoint, Step, admin_get, admin_post, client_id, committed_ids, config,
                          create_table, log_events, metric, open_session, run_script, wait_for_events)

pytestmark = pytest.mark.proxy_only

T = "doom_t"
I, T_, E = "IDLE", "INTRANS", "INERROR"
APP = "doom-victim"
COUNT = f"SELECT count(*) FROM {T}"


def ins(n: int) -> str:
    return f"INSERT INTO {T} VALUES ({n})"


@pytest.fixture
def table(pg_server):
    create_table(pg_server, T)
    with pg_server.connect() as conn:
        # A write pgwarden cannot see: the statement is a SELECT.
        conn.execute(f"CREATE OR REPLACE FUNCTION doom_hidden_write(n int) RETURNS int LANGUAGE sql AS "
                     f"$$ INSERT INTO {T} VALUES (n) RETURNING n $$")
    return T


def doom(proxy, application_name: str = APP, body: bytes = b"") -> dict:
    status, answer = admin_post(proxy, f"/api/clients/{client_id(proxy, application_name)}/doom", body)
    assert status == 200, answer
    assert answer["ok"] is True
    return answer


@pytest.mark.parametrize("client", CLIENTS)
def test_admin_doom_while_idle_in_transaction(pgwarden_factory, pg_server, table, client):
    proxy = pgwarden_factory(config("warn"))
    session = open_session(client, proxy, application_name=APP)
    try:
        problems = run_script(session, [Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_)],
                              lambda: committed_ids(pg_server, table))
        doom(proxy)
        (listed,) = [c for c in admin_get(proxy, "/api/clients") if c["application_name"] == APP]
        assert listed["doomed_reason"] is not None
        problems += run_script(session, [
            # Reads work, and see the transaction's own writes.
            Step(COUNT, "SELECT 1", T_, value="1"),
            Step(ins(2), "ERROR 25006", T_),
            Step(f"UPDATE {T} SET note = 'x'", "ERROR 25006", T_),
            Step(f"DELETE FROM {T}", "ERROR 25006", T_),
            Step(COUNT, "SELECT 1", T_, value="1"),
            Step("COMMIT", "ERROR 40000", I),
            Checkpoint([]),
            # The next transaction is clean.
            Step("BEGIN", "BEGIN", T_), Step(ins(3), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
            Checkpoint([3]),
        ], lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], f"via {client}:\n" + "\n".join(problems)
    assert metric(proxy, "pgwarden_doomed_transactions_total", reason="admin") == 1
    assert metric(proxy, "pgwarden_doomed_writes_rejected_total") == 3
    assert metric(proxy, "pgwarden_transactions_total", outcome="doomed_rollback") == 1
    wait_for_events(proxy, "transaction_doomed", 1)


def test_doom_error_messages_and_reason(pgwarden_factory, table):
    """The reason given to the admin API reaches the client list and the errors."""
    proxy = pgwarden_factory(config("warn"))
    with proxy.connect(application_name=APP) as conn:
        conn.execute("BEGIN")
        answer = doom(proxy, body=b'{"reason": "maintenance window"}')
        assert answer["reason"] == "maintenance window"
        (listed,) = [c for c in admin_get(proxy, "/api/clients") if c["application_name"] == APP]
        assert listed["doomed_reason"] == "maintenance window"
        with pytest.raises(psycopg.Error) as write:
            conn.execute(ins(1))
        assert write.value.sqlstate == "25006"
        assert write.value.diag.message_primary.startswith("pgwarden: transaction is doomed")
        assert "maintenance window" in (write.value.diag.message_detail or "")
        assert conn.info.transaction_status.name == "INTRANS"
        with pytest.raises(psycopg.Error) as commit:
            conn.execute("COMMIT")
        assert commit.value.sqlstate == "40000"
        assert commit.value.diag.message_primary.startswith(
            "pgwarden: transaction was doomed and has been rolled back")
        assert conn.info.transaction_status.name == "IDLE"
        # The session is no longer doomed.
        (listed,) = [c for c in admin_get(proxy, "/api/clients") if c["application_name"] == APP]
        assert listed["doomed_reason"] is None


def test_admin_doom_refusals(pgwarden_factory, table):
    proxy = pgwarden_factory(config("warn"))
    with proxy.connect(application_name=APP) as conn:
        conn.execute("SELECT 1")
        cid = client_id(proxy, APP)
        status, answer = admin_post(proxy, f"/api/clients/{cid}/doom")
        assert status == 404, "dooming a client outside a transaction must fail"
        assert "not in a transaction" in answer["error"]
        # Nothing was left armed: the next transaction is not doomed.
        conn.execute("BEGIN")
        conn.execute(ins(1))
        conn.execute("COMMIT")
        status, _ = admin_post(proxy, f"/api/clients/{cid + 1000}/doom")
        assert status == 404
        status, _ = admin_post(proxy, "/api/clients/abc/doom")
        assert status == 400
    assert metric(proxy, "pgwarden_doomed_transactions_total") == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_doomed_rollback_succeeds(pgwarden_factory, pg_server, table, client):
    proxy = pgwarden_factory(config("warn"))
    session = open_session(client, proxy, application_name=APP)
    try:
        problems = run_script(session, [Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_)], list)
        doom(proxy)
        problems += run_script(session, [
            Step("ROLLBACK", "ROLLBACK", I),
            Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
        ], list)
    finally:
        session.close()
    assert problems == [], f"via {client}:\n" + "\n".join(problems)
    assert committed_ids(pg_server, table) == [2]
    assert metric(proxy, "pgwarden_transactions_total", outcome="doomed_rollback") == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_write_hidden_in_function_is_refused_by_server(pgwarden_factory, pg_server, table, client):
    """SELECT f() where f inserts: pgwarden sees a read, but the server refuses the write
    because the doomed transaction is read-only there (25006 from PostgreSQL)."""
    proxy = pgwarden_factory(config("warn"))
    session = open_session(client, proxy, application_name=APP)
    try:
        problems = run_script(session, [Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_)], list)
        doom(proxy)
        problems += run_script(session, [
            Step("SELECT doom_hidden_write(2)", "ERROR 25006", E),
            Step("COMMIT", "ERROR 40000", I),
            Checkpoint([]),
            Step("BEGIN", "BEGIN", T_), Step("SELECT doom_hidden_write(3)", "SELECT 1", T_, value="3"),
            Step("COMMIT", "COMMIT", I),
            Checkpoint([3]),
        ], lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], f"via {client}:\n" + "\n".join(problems)


def test_hidden_write_error_comes_from_server(pgwarden_factory, table):
    proxy = pgwarden_factory(config("warn"))
    with proxy.connect(application_name=APP) as conn:
        conn.execute("BEGIN")
        doom(proxy)
        assert conn.execute(COUNT).fetchone() == (0,)
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT doom_hidden_write(1)")
        assert info.value.sqlstate == "25006"
        assert info.value.diag.message_primary == "cannot execute INSERT in a read-only transaction"
        conn.execute("ROLLBACK")


@pytest.mark.parametrize("application_savepoint", [False, True])
def test_hidden_write_refused_after_rollback_to_savepoint(pgwarden_factory, pg_server, table,
                                                          application_savepoint):
    """ROLLBACK TO a savepoint made before the doom undoes the server's read-only setting;
    the doom must still be enforced by the server afterwards. Both the application's own
    savepoint and the one savepoint mode makes for a nested BEGIN."""
    proxy = pgwarden_factory(config("savepoint"))
    with proxy.connect(application_name=APP) as conn:
        conn.execute("BEGIN")
        conn.execute("SAVEPOINT a" if application_savepoint else "BEGIN")
        doom(proxy)
        assert conn.execute(COUNT).fetchone() == (0,)   # the transaction is read-only from here
        conn.execute("ROLLBACK TO SAVEPOINT a" if application_savepoint else "ROLLBACK")
        assert conn.info.transaction_status.name == "INTRANS"
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT doom_hidden_write(1)")
        assert info.value.sqlstate == "25006"
        conn.execute("ROLLBACK")
    assert committed_ids(pg_server, table) == []


@pytest.mark.parametrize("client", CLIENTS)
def test_rule_dooms_transaction(pgwarden_factory, pg_server, table, client):
    """A rule with action "doom": the matching write is refused as the doomed transaction's
    first write, reads go on, the COMMIT fails. Outside a transaction block there is nothing
    to doom."""
    proxy = pgwarden_factory(config("warn", extra=(
        '\n[[rule]]\nname = "no-bulk-delete"\n'
        f'match = {{ statements = ["delete"], tables = ["{T}"] }}\naction = "doom"\n')))
    session = open_session(client, proxy, application_name=APP)
    try:
        problems = run_script(session, [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step(f"DELETE FROM {T}", "ERROR 25006", T_),
            Step(COUNT, "SELECT 1", T_, value="1"),
            Step(ins(2), "ERROR 25006", T_),
            Step("SELECT doom_hidden_write(3)", "ERROR 25006", E),
            Step("COMMIT", "ERROR 40000", I),
            Checkpoint([]),
            Step("BEGIN", "BEGIN", T_), Step(ins(4), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
            Checkpoint([4]),
        ], lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], f"via {client}:\n" + "\n".join(problems)
    assert metric(proxy, "pgwarden_doomed_transactions_total", reason="rule") == 1
    assert metric(proxy, "pgwarden_rule_hits_total", rule="no-bulk-delete", action="doom") == 1
    assert metric(proxy, "pgwarden_doomed_writes_rejected_total") == 2
    (event,) = wait_for_events(proxy, "transaction_doomed", 1)
    assert event["rule"] == "no-bulk-delete"
    assert event["client"] == APP


def test_rule_doom_on_read(pgwarden_factory, pg_server, table):
    """A rule that dooms on a read: the read itself runs, later writes do not."""
    proxy = pgwarden_factory(config("warn", extra=(
        '\n[[rule]]\nname = "peeked"\n'
        f'match = {{ statements = ["select"], tables = ["{T}"] }}\naction = "doom"\n')))
    session = open_session("psycopg-prepared", proxy, application_name=APP)
    try:
        problems = run_script(session, [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step(COUNT, "SELECT 1", T_, value="1"),
            Step(ins(2), "ERROR 25006", T_),
            Step("ROLLBACK", "ROLLBACK", I),
        ], list)
    finally:
        session.close()
    assert problems == [], "\n".join(problems)
    assert committed_ids(pg_server, table) == []
    assert metric(proxy, "pgwarden_doomed_transactions_total", reason="rule") == 1


def test_function_call_refused_in_doomed_transaction(pgwarden_factory, pg_server, table):
    """The fast-path FunctionCall (psycopg2 large objects) is a write: refused with 25006."""
    import psycopg2
    proxy = pgwarden_factory(config("warn"))
    conn = proxy.connect2(application_name=APP)
    try:
        conn.cursor().execute("SELECT 1")  # psycopg2 opened a transaction
        doom(proxy)
        with pytest.raises(psycopg2.Error) as info:
            conn.lobject(0, "wb")
        assert "pgwarden: transaction is doomed" in str(info.value)
        with pytest.raises(psycopg2.Error) as commit:
            conn.commit()
        assert commit.value.pgcode == "40000"
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        assert cur.fetchone() == (0,)
        conn.commit()
    finally:
        conn.close()
    assert log_events(proxy, "doomed_write_rejected")
