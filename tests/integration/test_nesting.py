# Transaction nesting modes (warn, reject, flatten, savepoint) as applications see them: a
# BEGIN inside a transaction block, its inner COMMIT or ROLLBACK, an error inside the inner
# scope; the tags, SQLSTATEs and transaction status each client gets, and what PostgreSQL
# has committed at each point, in the simple protocol (psql, psycopg2) and the extended
# protocol (psycopg 3 with prepared statements and in pipeline mode).
from __future__ import annotations

import psycopg
import pytest

import harness
from nesting_util import (CLIENTS, STEP_TIMEOUT, Checkpoint, Step, Watchdog, committed_ids, config, create_table,
                          log_events, metric, open_session, run_script, wait_for_events)

# Only warn mode is what PostgreSQL does by itself: with PGWARDEN_DIRECT=1 its scenarios run
# against the server to prove their expectations; everything else needs pgwarden.
proxy_only = pytest.mark.proxy_only

T = "nest_t"
I, T_, E = "IDLE", "INTRANS", "INERROR"


def ins(n: int) -> str:
    return f"INSERT INTO {T} VALUES ({n})"


COUNT = f"SELECT count(*) FROM {T}"


def script_inner_commit_then_outer_rollback(mode: str) -> tuple[list, list[int]]:
    """The inner COMMIT, then the outer scope fails. Returns the script and what ends up committed."""
    if mode == "warn":
        # PostgreSQL warns about the BEGIN, its COMMIT ends everything; the statements after
        # it run in autocommit, and the outer ROLLBACK finds nothing to undo.
        return [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_, notices=("25001",)), Step(ins(2), "INSERT 0 1", T_),
            Checkpoint([]),
            Step("COMMIT", "COMMIT", I),
            Checkpoint([1, 2]),
            Step(ins(3), "INSERT 0 1", I),
            Step("ROLLBACK", "ROLLBACK", I, notices=("25P01",)),
        ], [1, 2, 3]
    # flatten and savepoint: the inner COMMIT does not end the transaction.
    return [
        Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
        Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_),
        Step("COMMIT", "COMMIT", T_),
        Checkpoint([]),
        Step(ins(3), "INSERT 0 1", T_),
        Step(COUNT, "SELECT 1", T_, value="3"),
        Step("ROLLBACK", "ROLLBACK", I),
        Checkpoint([]),
    ], []


def script_inner_commit_then_outer_commit(mode: str) -> tuple[list, list[int]]:
    if mode == "warn":
        return [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_, notices=("25001",)), Step(ins(2), "INSERT 0 1", T_),
            Step("COMMIT", "COMMIT", I),
            Checkpoint([1, 2]),
            Step(ins(3), "INSERT 0 1", I),
            Checkpoint([1, 2, 3]),
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),
        ], [1, 2, 3]
    return [
        Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
        Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_),
        Step("COMMIT", "COMMIT", T_),
        Step(ins(3), "INSERT 0 1", T_),
        Checkpoint([]),
        Step("COMMIT", "COMMIT", I),
        Checkpoint([1, 2, 3]),
    ], [1, 2, 3]


def script_inner_rollback(mode: str) -> tuple[list, list[int]]:
    if mode == "warn":
        # The inner ROLLBACK ends the whole transaction; what follows autocommits.
        return [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_, notices=("25001",)), Step(ins(2), "INSERT 0 1", T_),
            Step("ROLLBACK", "ROLLBACK", I),
            Step(ins(3), "INSERT 0 1", I),
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),
        ], [3]
    if mode == "flatten":
        # The inner ROLLBACK dooms the transaction: it reads (its own writes too), refuses
        # writes without aborting, and its COMMIT fails with 40000 and commits nothing.
        return [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_),
            Step("ROLLBACK", "ROLLBACK", T_),
            Step(COUNT, "SELECT 1", T_, value="2"),
            Step(ins(3), "ERROR 25006", T_),
            Step(COUNT, "SELECT 1", T_, value="2"),
            Step("COMMIT", "ERROR 40000", I),
            Checkpoint([]),
            # The next transaction is clean.
            Step("BEGIN", "BEGIN", T_), Step(ins(4), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
        ], [4]
    # savepoint: only the inner scope's work is undone.
    return [
        Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
        Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_),
        Step("ROLLBACK", "ROLLBACK", T_),
        Step(COUNT, "SELECT 1", T_, value="1"),
        Step(ins(3), "INSERT 0 1", T_),
        Checkpoint([]),
        Step("COMMIT", "COMMIT", I),
    ], [1, 3]


def script_error_in_inner_scope(mode: str) -> tuple[list, list[int]]:
    """A statement fails inside the inner scope (duplicate key), which then rolls back."""
    head = [Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_)]
    if mode == "warn":
        return head + [
            Step("BEGIN", "BEGIN", T_, notices=("25001",)),
            Step(ins(1), "ERROR 23505", E),
            Step("ROLLBACK", "ROLLBACK", I),
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),
        ], []
    if mode == "flatten":
        # The failed block cannot commit; it goes on as a doomed transaction that reads.
        return head + [
            Step("BEGIN", "BEGIN", T_),
            Step(ins(1), "ERROR 23505", E),
            Step("ROLLBACK", "ROLLBACK", T_),
            Step(COUNT, "SELECT 1", T_, value="0"),
            Step(ins(2), "ERROR 25006", T_),
            Step("COMMIT", "ERROR 40000", I),
            Step("BEGIN", "BEGIN", T_), Step(ins(5), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
        ], [5]
    return head + [
        Step("BEGIN", "BEGIN", T_),
        Step(ins(1), "ERROR 23505", E),
        Step(COUNT, "ERROR 25P02", E),
        Step("ROLLBACK", "ROLLBACK", T_),
        Step(COUNT, "SELECT 1", T_, value="1"),
        Step(ins(2), "INSERT 0 1", T_),
        Step("COMMIT", "COMMIT", I),
    ], [1, 2]


def script_deep_nesting(mode: str) -> tuple[list, list[int]]:
    """Three levels, START TRANSACTION and END spellings, an inner rollback at depth 1."""
    if mode == "warn":
        return [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_, notices=("25001",)), Step(ins(2), "INSERT 0 1", T_),
            Step("START TRANSACTION", "START TRANSACTION", T_, notices=("25001",)), Step(ins(3), "INSERT 0 1", T_),
            Step("END", "COMMIT", I),
            Step("ROLLBACK", "ROLLBACK", I, notices=("25P01",)),
            Step(ins(4), "INSERT 0 1", I),
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),
        ], [1, 2, 3, 4]
    common = [
        Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
        Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_),
        Step("START TRANSACTION", "START TRANSACTION", T_), Step(ins(3), "INSERT 0 1", T_),
        Step("END", "COMMIT", T_),
        Step("ROLLBACK", "ROLLBACK", T_),
    ]
    if mode == "flatten":
        return common + [
            Step(ins(4), "ERROR 25006", T_),
            Step("COMMIT", "ERROR 40000", I),
        ], []
    # savepoint: depth 2 was released into depth 1, which was rolled back: 2 and 3 go.
    return common + [
        Step(COUNT, "SELECT 1", T_, value="1"),
        Step(ins(4), "INSERT 0 1", T_),
        Step("COMMIT", "COMMIT", I),
    ], [1, 4]


SCRIPTS = {
    "inner_commit_outer_rollback": (script_inner_commit_then_outer_rollback, 1),
    "inner_commit_outer_commit": (script_inner_commit_then_outer_commit, 1),
    "inner_rollback": (script_inner_rollback, 1),
    "error_in_inner_scope": (script_error_in_inner_scope, 1),
    "deep_nesting": (script_deep_nesting, 2),
}
# Inner COMMITs (or ENDs) at nested depth in each warn script: the early commits.
WARN_EARLY_COMMITS = {"inner_commit_outer_rollback": 1, "inner_commit_outer_commit": 1, "inner_rollback": 0,
                      "error_in_inner_scope": 0, "deep_nesting": 1}


@pytest.fixture
def table(pg_server):
    create_table(pg_server, T)
    return T


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("scenario", list(SCRIPTS))
@pytest.mark.parametrize("mode", ["warn", "flatten", "savepoint"])
def test_nesting_scenario(pgwarden_factory, pg_server, table, mode, scenario, client):
    build, nested_begins = SCRIPTS[scenario]
    script, final = build(mode)
    proxy = pgwarden_factory(config(mode), direct_equivalent=mode == "warn")
    session = open_session(client, proxy, application_name="nest-app")
    try:
        problems = run_script(session, script, lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], f"{mode}/{scenario} via {client}:\n" + "\n".join(problems)
    assert committed_ids(pg_server, table) == final
    if harness.direct_mode():
        return

    assert metric(proxy, "pgwarden_nested_begin_total", client="nest-app", mode=mode) == nested_begins
    assert metric(proxy, "pgwarden_nested_begin_total") == nested_begins  # no other mode counted
    early = WARN_EARLY_COMMITS[scenario] if mode == "warn" else 0
    assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == early
    wait_for_events(proxy, "nested_begin", nested_begins)
    if early:
        events = wait_for_events(proxy, "early_commit", early)
        assert [e["client"] for e in events] == ["nest-app"] * early
        assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit", client="nest-app") == early
    else:
        assert log_events(proxy, "early_commit") == []


@proxy_only
@pytest.mark.parametrize("client", CLIENTS)
def test_reject_mode(pgwarden_factory, pg_server, table, client):
    """The nested BEGIN fails with 25001 and aborts the block; nothing of it commits; the
    next transaction is clean."""
    proxy = pgwarden_factory(config("reject"))
    session = open_session(client, proxy)
    script = [
        Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
        Step("BEGIN", "ERROR 25001", E),
        Step(ins(2), "ERROR 25P02", E),
        Step("COMMIT", "ROLLBACK", I),
        Checkpoint([]),
        Step("BEGIN", "BEGIN", T_), Step(ins(3), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", I),
        Checkpoint([3]),
        # A nested BEGIN then ROLLBACK: the rollback ends the aborted block as usual.
        Step("BEGIN", "BEGIN", T_), Step("BEGIN", "ERROR 25001", E), Step("ROLLBACK", "ROLLBACK", I),
    ]
    try:
        problems = run_script(session, script, lambda: committed_ids(pg_server, table))
    finally:
        session.close()
    assert problems == [], f"reject via {client}:\n" + "\n".join(problems)
    assert metric(proxy, "pgwarden_nested_begin_total", mode="reject") == 2
    assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == 0


@proxy_only
def test_reject_error_message(pgwarden_factory, table):
    proxy = pgwarden_factory(config("reject"))
    with proxy.connect() as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("BEGIN")
        error = info.value
        assert error.sqlstate == "25001"
        assert error.diag.message_primary.startswith("pgwarden: nested BEGIN rejected")
        # The detail says where the outer transaction began.
        assert "BEGIN ISOLATION LEVEL REPEATABLE READ" in (error.diag.message_detail or "")
        assert conn.info.transaction_status.name == "INERROR"
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status.name == "IDLE"


@proxy_only
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", ["warn", "flatten"])
def test_nesting_log_lines(pgwarden_factory, table, mode, client):
    """Every nested BEGIN is logged with the client, the statement and where the outer
    transaction began, in every protocol; so is an early commit."""
    proxy = pgwarden_factory(config(mode))
    session = open_session(client, proxy, application_name="nest-logger")
    outer = "START TRANSACTION ISOLATION LEVEL SERIALIZABLE"
    try:
        tags = [session.run(sql).result for sql in [outer, "BEGIN", "COMMIT", "COMMIT"]]
    finally:
        session.close()
    assert tags == ["START TRANSACTION", "BEGIN", "COMMIT", "COMMIT"]
    (event,) = wait_for_events(proxy, "nested_begin", 1)
    assert {k: event.get(k) for k in ("client", "mode", "depth", "statement", "outer_transaction")} == {
        "client": "nest-logger", "mode": mode, "depth": "1", "statement": "BEGIN", "outer_transaction": outer}
    assert metric(proxy, "pgwarden_nested_begin_total", client="nest-logger", mode=mode) == 1
    if mode == "warn":
        (event,) = wait_for_events(proxy, "early_commit", 1)
        assert {k: event.get(k) for k in ("client", "statement", "outer_transaction")} == {
            "client": "nest-logger", "statement": "COMMIT", "outer_transaction": outer}


@proxy_only
def test_savepoints_are_not_nesting(pgwarden_factory, pg_server, table):
    """The application's own SAVEPOINTs are left alone in every mode that rewrites."""
    proxy = pgwarden_factory(config("savepoint"))
    with proxy.connect() as conn:
        conn.execute("BEGIN")
        conn.execute(ins(1))
        conn.execute("SAVEPOINT a")
        conn.execute(ins(2))
        conn.execute("ROLLBACK TO SAVEPOINT a")
        conn.execute("SAVEPOINT b")
        conn.execute(ins(3))
        conn.execute("RELEASE SAVEPOINT b")
        conn.execute("COMMIT")
    assert committed_ids(pg_server, table) == [1, 3]
    assert metric(proxy, "pgwarden_nested_begin_total") == 0
    assert log_events(proxy, "nested_begin") == []


@proxy_only
def test_application_savepoints_inside_inner_scope(pgwarden_factory, pg_server, table):
    """The application's SAVEPOINT / ROLLBACK TO inside a nested scope work as usual
    alongside pgwarden's own savepoints."""
    proxy = pgwarden_factory(config("savepoint"))
    with proxy.connect() as conn:
        conn.execute("BEGIN")
        conn.execute(ins(1))
        assert conn.execute("BEGIN").statusmessage == "BEGIN"
        assert conn.execute("SAVEPOINT a").statusmessage == "SAVEPOINT"
        conn.execute(ins(2))
        assert conn.execute("ROLLBACK TO SAVEPOINT a").statusmessage == "ROLLBACK"
        conn.execute(ins(3))
        assert conn.execute("COMMIT").statusmessage == "COMMIT"
        assert conn.info.transaction_status.name == "INTRANS"
        assert committed_ids(pg_server, table) == []
        assert conn.execute("COMMIT").statusmessage == "COMMIT"
    assert committed_ids(pg_server, table) == [1, 3]


@proxy_only
@pytest.mark.parametrize("mode,expected", [("flatten", [1, 2, 3]), ("savepoint", [1, 2, 3])])
def test_whole_script_in_one_pipeline(pgwarden_factory, pg_server, table, mode, expected):
    """A nested scope inside one pipelined batch (no Sync in between): the answers pgwarden
    makes up or rewrites arrive in order, each with the tag of what was sent."""
    proxy = pgwarden_factory(config(mode))
    statements = ["BEGIN", ins(1), "BEGIN", ins(2), "COMMIT", "BEGIN", ins(3), "COMMIT", "COMMIT"]
    tags = ["BEGIN", "INSERT 0 1", "BEGIN", "INSERT 0 1", "COMMIT", "BEGIN", "INSERT 0 1", "COMMIT", "COMMIT"]
    with proxy.connect() as conn:
        cursors = []
        with Watchdog(conn.fileno(), STEP_TIMEOUT) as dog:
            try:
                with conn.pipeline():
                    for sql in statements:
                        cur = conn.cursor()
                        cur.execute(sql)
                        cursors.append(cur)
            except psycopg.Error:
                if not dog.fired:
                    raise
        assert not dog.fired, "the pipeline got no complete answer"
        assert [c.statusmessage for c in cursors] == tags
        assert conn.info.transaction_status.name == "IDLE"
    assert committed_ids(pg_server, table) == expected
    assert metric(proxy, "pgwarden_nested_begin_total", mode=mode) == 2


@proxy_only
@pytest.mark.parametrize("client", ["psql", "psycopg-prepared"])
def test_rule_overrides_nesting_mode(pgwarden_factory, pg_server, table, client):
    """A [[rule]] with `nesting` gives the clients it matches their own mode: legacy* get
    flatten, everyone else the global warn."""
    proxy = pgwarden_factory(config("warn", extra=(
        '\n[[rule]]\nname = "legacy"\nmatch = { application_name = "legacy*" }\n'
        'action = "log"\nnesting = "flatten"\n')))
    legacy = open_session(client, proxy, application_name="legacy-billing")
    other = open_session(client, proxy, application_name="web")
    try:
        legacy_script = [
            Step("BEGIN", "BEGIN", T_), Step(ins(1), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_), Step(ins(2), "INSERT 0 1", T_), Step("COMMIT", "COMMIT", T_),
            Checkpoint([]),
            Step("COMMIT", "COMMIT", I),
            Checkpoint([1, 2]),
        ]
        problems = run_script(legacy, legacy_script, lambda: committed_ids(pg_server, table))
        other_script = [
            Step("BEGIN", "BEGIN", T_), Step(ins(3), "INSERT 0 1", T_),
            Step("BEGIN", "BEGIN", T_, notices=("25001",)), Step("COMMIT", "COMMIT", I),
            Checkpoint([1, 2, 3]),
            Step("COMMIT", "COMMIT", I, notices=("25P01",)),
        ]
        problems += run_script(other, other_script, lambda: committed_ids(pg_server, table))
    finally:
        legacy.close()
        other.close()
    assert problems == [], "\n".join(problems)
    assert metric(proxy, "pgwarden_nested_begin_total", client="legacy-billing", mode="flatten") == 1
    assert metric(proxy, "pgwarden_nested_begin_total", client="web", mode="warn") == 1
    assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit") == 1
    assert metric(proxy, "pgwarden_lint_findings_total", finding="early_commit", client="web") == 1


@proxy_only
@pytest.mark.parametrize("mode,tags,status,committed", [
    # After the early COMMIT the rest runs in the Query's implicit transaction, which the
    # ROLLBACK does undo: 3 is lost, 1 and 2 are committed.
    ("warn", ["BEGIN", "INSERT 0 1", "BEGIN", "INSERT 0 1", "COMMIT", "INSERT 0 1", "ROLLBACK"], I, [1, 2]),
    ("reject", None, E, []),
    ("flatten", ["BEGIN", "INSERT 0 1", "BEGIN", "INSERT 0 1", "COMMIT", "INSERT 0 1", "ROLLBACK"], I, []),
    ("savepoint", ["BEGIN", "INSERT 0 1", "BEGIN", "INSERT 0 1", "COMMIT", "INSERT 0 1", "ROLLBACK"], I, []),
])
def test_nesting_in_one_multi_statement_query(pgwarden_factory, pg_server, table, mode, tags, status, committed):
    """The whole nested scope in one simple Query: pgwarden rewrites part of it and answers
    each statement in order."""
    proxy = pgwarden_factory(config(mode))
    with proxy.connect() as conn:
        sql = f"BEGIN; {ins(1)}; BEGIN; {ins(2)}; COMMIT; {ins(3)}; ROLLBACK"
        if tags is None:
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            assert info.value.sqlstate == "25001"
        else:
            cur = conn.execute(sql)
            seen = [cur.statusmessage]
            while cur.nextset():
                seen.append(cur.statusmessage)
            assert seen == tags
        assert conn.info.transaction_status.name == status
        if status == E:
            conn.execute("ROLLBACK")
    assert committed_ids(pg_server, table) == committed
    assert metric(proxy, "pgwarden_nested_begin_total", mode=mode) == 1
