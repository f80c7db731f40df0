# Soak: one pgwarden with every policy family configured, a few hundred client connections
# (psycopg 3 in the extended protocol and in pipelines, psycopg2's simple protocol, COPY,
# pgbench with named prepared statements, clients that reconnect all the time) driving a mixed
# workload for a bounded time. It must stay error-free apart from what the policies are meant
# to do (one tenant throttled, scripted doomed and idle transactions), keep every
# acknowledged write, keep its metrics consistent with what the clients did, and keep its
# memory flat.
#
#   PGWARDEN_SOAK_SECONDS=600 python3 -m pytest tests/integration/test_soak.py   # a longer soak
from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

import harness
import observability as obs
from fault_util import rss_kb
from throttle_util import REJECT_SQLSTATE, admin_get, rejection_of

pytestmark = pytest.mark.proxy_only

# Bounded by default so the suite stays fast; a human can soak for minutes.
SOAK_SECONDS = float(os.environ.get("PGWARDEN_SOAK_SECONDS") or harness.scaled(60, 30))
CONNECTIONS = harness.scaled(300, 60)   # client connections in all, pgbench's included
PGBENCH_CLIENTS = harness.scaled(8, 4)
# Warm-up: every worker has run each of its paths at least once, then this share of the
# run, so that buffers, caches, metric series and throttle buckets reach their working size
# before the first memory sample.
WARMUP_SHARE = 0.2
IDLE_TIMEOUT = 10      # seconds; long enough that no busy client is ever idle that long
CONNECT_TIMEOUT = 120  # for all the clients to connect (hundreds, on two cores)
JOIN_TIMEOUT = IDLE_TIMEOUT + 60  # the idle-transaction worker may be mid-cycle at the stop
NOISY = "tenant:noisy"
TENANTS = 20

# Memory is flat when the RSS at the end (and after every client has gone) is within this
# of the RSS after warm-up. Generous on purpose: it is a leak detector, not a benchmark.
# Legitimate growth after warm-up is allocator fragmentation and buffers grown to the
# largest message seen, all bounded; a leak of a few hundred bytes per statement or a few
# kB per connection over the run exceeds it. Under ASan, freed memory sits in a quarantine
# of up to 256 MiB and RSS grows by design; there LeakSanitizer at exit does this job.
RSS_FACTOR = 1.5
RSS_SLACK_KB = 16 * 1024

CONFIG = f"""
[identity]
sources = ["comment:client", "setting:pgwarden.client", "application_name", "user"]

[classify]
# Small, so that the cache is full early in the warm-up and then evicts all the time (a
# full default cache of distinct texts would be legitimate growth after warm-up).
cache_entries = 500

[transactions]
nesting = "flatten"
idle_timeout = "{IDLE_TIMEOUT}s"

[metrics]
# More distinct clients than this connect: the rest share the label "other".
max_clients = 100

# Every tenant, generous: delays nobody in practice, yet every tenant write is judged.
[[throttle]]
name = "tenant-writes"
match = {{ client = "tenant:*" }}
rate = 5000
burst = 10000
bucket = "client"
action = "delay"
max_delay = "10s"

# The one tenant that is meant to be throttled: its writes beyond 5 a second fail (53400).
[[throttle]]
name = "noisy-tenant"
match = {{ client = "{NOISY}" }}
rate = 5
burst = 5
bucket = "client"
action = "reject"
penalty = "200ms"

# Three connections sharing one bucket, writing as fast as they can: always delayed (each
# manages a few dozen writes a second on a loaded two-core machine).
[[throttle]]
name = "paced"
match = {{ application_name = "soak-paced" }}
rate = 10
burst = 5
bucket = "client"
action = "delay"
max_delay = "10s"

# Row cost: multi-row INSERTs and COPY debit their rows.
[[throttle]]
name = "importer-rows"
match = {{ application_name = "soak-importer-*" }}
statements = ["insert", "copy_in"]
cost = "row"
rate = 1000000
burst = 1000000
bucket = "user"
action = "delay"
max_delay = "10s"

# One bucket every writer shares (contention on one lock), never exhausted.
[[throttle]]
name = "all-writes"
statements = ["write"]
rate = 10000000
burst = 10000000
bucket = "rule"
action = "delay"
max_delay = "10s"

# Judged on every DDL, never hit: the workload makes no schema changes through pgwarden.
[[throttle]]
name = "ddl-cap"
statements = ["ddl", "truncate"]
rate = 0.1
burst = 3
bucket = "rule"
action = "reject"

[[rule]]
name = "no-ddl-from-apps"
match = {{ application_name = "soak-*", statements = ["ddl", "truncate"] }}
action = "reject"
message = "DDL is not allowed from soak clients"

[[rule]]
name = "reports-read-only"
match = {{ application_name = "soak-report-*", statements = ["write"] }}
action = "doom"

[[rule]]
name = "delete-notice"
match = {{ statements = ["delete"], tables = ["soak_writes"] }}
action = "notice"
message = "soak: a write was deleted"

[[rule]]
name = "legacy-nesting"
match = {{ application_name = "soak-legacy-*", statements = ["begin"] }}
action = "log"
nesting = "savepoint"
"""


# ---------------------------------------------------------------------------------------------
# A PostgreSQL of its own: the suite's server allows 200 connections, the soak needs more.


@pytest.fixture(scope="module")
def soak_server():
    server = harness.PostgresServer()
    try:
        server.start()
        with server.connect() as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {CONNECTIONS + 50}")
        harness.run_checked(server._as_server_user([
            str(harness.PG_BIN / "pg_ctl"), "-D", str(server.data), "-l", str(server.log_path),
            "-m", "fast", "-w", "-t", "60", "restart"]), timeout=90)
        harness.wait_until(server._accepts_queries, 30, "PostgreSQL to accept connections again", interval=0.1)
        assert server.query_one("show max_connections") == str(CONNECTIONS + 50)
    except BaseException:
        print(harness.tail(server.log_path))
        server.stop()
        raise
    yield server
    server.stop()


def prepare_schema(server: harness.PostgresServer, workers: int) -> None:
    with server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS soak_writes, soak_counters, soak_items")
        conn.execute("CREATE TABLE soak_writes (id bigint PRIMARY KEY, worker int NOT NULL, payload text)")
        conn.execute("CREATE TABLE soak_counters (worker int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO soak_counters SELECT g, 0 FROM generate_series(0, %s) g", (workers,))
        conn.execute("CREATE TABLE soak_items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL)")
        conn.execute("INSERT INTO soak_items SELECT g, 'item ' || g, g % 97 FROM generate_series(1, 1000) g")
    harness.pgbench(server, "-i", "-s", "1", "-q")


# ---------------------------------------------------------------------------------------------
# Workers: one client connection each, one workload path per class


class Countdown:
    """Done when `count` parties have counted down (each worker after its first iteration)."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._cond = threading.Condition()

    def count_down(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count <= 0, timeout)


class Soak:
    """What the workers share: the proxy, the start barrier, the stop event, the latch."""

    def __init__(self, proxy: harness.Pgwarden, plan: list[type[Worker]]) -> None:
        self.proxy = proxy
        self.started = threading.Barrier(len(plan) + 1)
        self.first_iterations = Countdown(sum(1 for cls in plan if cls.counts_for_warmup))
        self.stop = threading.Event()


class Worker:
    app = "soak-worker"
    counts_for_warmup = True

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.index = index
        self.name = f"{type(self).__name__}#{index}"
        self.conn: Any = None
        self._next_id = index * 100_000_000
        self.sent: collections.Counter[str] = collections.Counter()   # statements by kind
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.acked: list[int] = []        # ids whose INSERT was acknowledged as committed
        self.not_committed: list[int] = []  # ids whose INSERT was refused or rolled back
        self.deleted: list[int] = []      # acknowledged ids whose DELETE was acknowledged
        self.counter = 0                  # acknowledged increments of soak_counters[index]
        self.notices: list[str] = []
        self.errors: list[str] = []
        self.iterations = 0

    # -- subclass interface

    def connect(self) -> Any:
        conn = self.soak.proxy.connect(application_name=self.app)
        conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        return conn

    def step(self) -> None:
        raise NotImplementedError

    # -- helpers

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def execute(self, sql: str, params: Any = None, kind: str | None = None, **kw: Any) -> psycopg.Cursor:
        self.sent[kind or sql.split(None, 1)[0].lower()] += 1
        return self.conn.execute(sql, params, **kw)

    def expect_error(self, sqlstate: str, action: Callable[[], Any]) -> psycopg.Error:
        try:
            action()
        except psycopg.Error as e:
            if e.sqlstate != sqlstate:
                raise
            self.outcomes[sqlstate] += 1
            return e
        raise AssertionError(f"expected SQLSTATE {sqlstate}, the statement succeeded")

    # -- the thread

    def run(self) -> None:
        counted = False
        try:
            try:
                self.conn = self.connect()
            except BaseException as e:
                # A worker that cannot connect breaks the barrier: the test fails at once.
                self.errors.append(f"{self.name}: cannot connect: {type(e).__name__}: {e}")
                self.soak.started.abort()
                return
            self.soak.started.wait(CONNECT_TIMEOUT)
            while not self.soak.stop.is_set():
                self.step()
                self.iterations += 1
                if not counted:
                    counted = True
                    if self.counts_for_warmup:
                        self.soak.first_iterations.count_down()
        except threading.BrokenBarrierError:
            pass  # another worker could not connect, or the main thread gave up waiting
        except BaseException as e:  # reported by the main thread
            state = getattr(e, "sqlstate", None)
            self.errors.append(f"{self.name} after {self.iterations} iterations: {type(e).__name__} "
                               f"[{state}] {e}\n{traceback.format_exc(limit=4)}")
            self.soak.stop.set()  # fail fast
        finally:
            if not counted and self.counts_for_warmup:
                self.soak.first_iterations.count_down()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Reader(Worker):
    """Extended protocol, prepared after a few uses; a distinct client name each (over the
    metrics' client cap); big results and COPY out now and then."""

    @property
    def app(self) -> str:
        return f"soak-reader-{self.index}"

    def step(self) -> None:
        key = self.iterations * 7 % 1000 + 1
        assert self.execute("SELECT name, qty FROM soak_items WHERE id = %s", (key,)).fetchone() == (
            f"item {key}", key % 97)
        total = self.execute("SELECT sum(qty) FROM soak_items WHERE id BETWEEN %s AND %s", (key, key + 50),
                             kind="select").fetchone()[0]
        assert total is not None
        tenant = f"tenant:{self.index % TENANTS}"
        self.execute(f"/* client='{tenant}' */ SELECT count(*) FROM soak_writes", kind="select").fetchone()
        # Large results through pgwarden, checked without turning rows into Python objects
        # (Debian's psycopg is the pure-Python build: hundreds of threads share one GIL).
        if (self.iterations + self.index) % 10 == 0:
            cur = self.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
            assert cur.rowcount == 5000
            cur.scroll(4999, mode="absolute")
            assert cur.fetchone() == (5000, "x" * 100)
        if (self.iterations + self.index) % 10 == 5:
            with self.conn.cursor() as cur:
                self.sent["copy_out"] += 1
                with cur.copy("COPY (SELECT id, name FROM soak_items) TO STDOUT") as copy:
                    assert sum(bytes(block).count(b"\n") for block in copy) == 1000


class TenantWriter(Worker):
    """Tenant writes, the tenant named by a sqlcommenter tag or by a startup setting:
    autocommit INSERTs, transaction blocks, pipelines, and DELETEs (a notice rule)."""

    def __init__(self, soak: Soak, index: int) -> None:
        super().__init__(soak, index)
        self.tenant = f"tenant:{index % TENANTS}"
        self.by_setting = index % 2 == 1

    def connect(self) -> Any:
        kw = {"options": f"-c pgwarden.client={self.tenant}"} if self.by_setting else {}
        conn = self.soak.proxy.connect(application_name=f"soak-tenant-{self.index}", **kw)
        conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        return conn

    def tag(self, sql: str) -> str:
        # sqlcommenter's own form: at the end, percent-encoded ("%%" for psycopg's "%").
        return sql if self.by_setting else f"{sql} /*client='{self.tenant.replace(':', '%%3A')}'*/"

    def insert(self, ident: int) -> None:
        self.execute(self.tag("INSERT INTO soak_writes VALUES (%s, %s, %s)"), (ident, self.index, "t"), kind="insert")

    def step(self) -> None:
        ident = self.new_id()
        self.insert(ident)
        self.acked.append(ident)

        ids = [self.new_id() for _ in range(3)]
        with self.conn.transaction():
            self.sent["begin"] += 1
            for i in ids:
                self.insert(i)
            self.execute(self.tag("UPDATE soak_counters SET n = n + 1 WHERE worker = %s"), (self.index,),
                         kind="update")
        self.sent["commit"] += 1
        self.outcomes["commit"] += 1
        self.acked += ids
        self.counter += 1

        ids = [self.new_id() for _ in range(5)]
        with self.conn.pipeline():
            for i in ids:
                self.insert(i)
        self.acked += ids

        if self.iterations % 4 == 3:
            victim = self.acked.pop(0)
            assert self.execute(self.tag("DELETE FROM soak_writes WHERE id = %s"), (victim,),
                                kind="delete").rowcount == 1
            self.deleted.append(victim)


class Psycopg2Writer(Worker):
    """psycopg2 (simple protocol, client-side parameters, its own implicit BEGIN):
    multi-statement Queries, SET LOCAL of the client setting, some rollbacks."""

    def connect(self) -> Any:
        return self.soak.proxy.connect2(application_name=f"soak-p2-{self.index}")

    def step(self) -> None:
        cur = self.conn.cursor()
        ident = self.new_id()
        cur.execute("SET LOCAL pgwarden.client = %s", (f"tenant:{self.index % TENANTS}",))
        self.sent["begin"] += 1
        self.sent["set"] += 1
        cur.execute("INSERT INTO soak_writes VALUES (%s, %s, 'p2'); UPDATE soak_counters SET n = n + 1 "
                    "WHERE worker = %s", (ident, self.index, self.index))
        self.sent["insert"] += 1
        self.sent["update"] += 1
        if self.iterations % 5 == 4:
            self.conn.rollback()
            self.sent["rollback"] += 1
            self.not_committed.append(ident)
        else:
            self.conn.commit()
            self.sent["commit"] += 1
            self.outcomes["commit"] += 1
            self.acked.append(ident)
            self.counter += 1
        cur.execute("SELECT qty FROM soak_items WHERE id = %s", (self.iterations % 1000 + 1,))
        assert cur.fetchone() is not None
        self.sent["select"] += 1
        self.conn.commit()
        self.sent["begin"] += 1
        self.sent["commit"] += 1
        self.outcomes["commit"] += 1


class FlattenNester(Worker):
    """psycopg2 opens a transaction itself; the application's own BEGIN/COMMIT inside it is
    nested. Under "flatten" the inner pair is a no-op and the outer commit commits it all."""

    def connect(self) -> Any:
        return self.soak.proxy.connect2(application_name=f"soak-flatten-{self.index}")

    def step(self) -> None:
        cur = self.conn.cursor()
        a, b = self.new_id(), self.new_id()
        cur.execute("INSERT INTO soak_writes VALUES (%s, %s, 'outer')", (a, self.index))
        cur.execute("BEGIN")
        cur.execute("INSERT INTO soak_writes VALUES (%s, %s, 'inner')", (b, self.index))
        cur.execute("COMMIT")
        assert self.conn.info.transaction_status == 2  # psycopg2 TRANSACTION_STATUS_INTRANS: still open
        cur.execute("UPDATE soak_counters SET n = n + 1 WHERE worker = %s", (self.index,))
        self.conn.commit()
        self.sent.update({"begin": 2, "insert": 2, "commit": 2, "update": 1})
        self.outcomes["nested_begin"] += 1
        self.outcomes["commit"] += 1
        self.acked += [a, b]
        self.counter += 1


class SavepointNester(Worker):
    """A [[rule]] gives these clients "savepoint" nesting: an inner ROLLBACK undoes only the
    inner scope."""

    @property
    def app(self) -> str:
        return f"soak-legacy-{self.index}"

    def step(self) -> None:
        a, b, c = self.new_id(), self.new_id(), self.new_id()
        assert self.execute("BEGIN").statusmessage == "BEGIN"
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'a')", (a, self.index))
        assert self.execute("BEGIN").statusmessage == "BEGIN"
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'b')", (b, self.index))
        assert self.execute("ROLLBACK").statusmessage == "ROLLBACK"
        assert self.execute("BEGIN").statusmessage == "BEGIN"
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'c')", (c, self.index))
        assert self.execute("COMMIT").statusmessage == "COMMIT"
        assert self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert self.execute("COMMIT").statusmessage == "COMMIT"
        self.outcomes["nested_begin"] += 2
        self.outcomes["commit"] += 1
        self.acked += [a, c]
        self.not_committed.append(b)


class Doomer(Worker):
    """Under "flatten", an inner ROLLBACK dooms the transaction: it still reads, its writes
    fail with 25006, its COMMIT rolls back and fails with 40000."""

    @property
    def app(self) -> str:
        return f"soak-doomer-{self.index}"

    def step(self) -> None:
        x, y, z, after = self.new_id(), self.new_id(), self.new_id(), self.new_id()
        self.execute("BEGIN")
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'x')", (x, self.index))
        self.execute("BEGIN")
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'y')", (y, self.index))
        assert self.execute("ROLLBACK").statusmessage == "ROLLBACK"
        assert self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert self.execute("SELECT count(*) FROM soak_writes WHERE id IN (%s, %s)", (x, y)).fetchone() == (2,)
        self.expect_error("25006", lambda: self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'z')",
                                                        (z, self.index)))
        self.expect_error("40000", lambda: self.execute("COMMIT"))
        assert self.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        self.not_committed += [x, y, z]
        self.outcomes["doomed"] += 1
        self.outcomes["nested_begin"] += 1
        # The next transaction is clean.
        with self.conn.transaction():
            self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'after')", (after, self.index))
        self.sent.update({"begin": 1, "commit": 1})
        self.outcomes["commit"] += 1
        self.acked.append(after)


class Reporter(Worker):
    """Reads in transaction blocks; a [[rule]] dooms the block on its first write."""

    @property
    def app(self) -> str:
        return f"soak-report-{self.index}"

    def step(self) -> None:
        self.execute("BEGIN")
        self.execute("SELECT count(*), sum(qty) FROM soak_items").fetchone()
        self.execute("SELECT max(id) FROM soak_writes WHERE worker = %s", (self.index,)).fetchone()
        if self.iterations % 3 == 2:
            ident = self.new_id()
            self.expect_error("25006", lambda: self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'r')",
                                                            (ident, self.index)))
            self.execute("SELECT count(*) FROM soak_items").fetchone()  # still reads
            self.expect_error("40000", lambda: self.execute("COMMIT"))
            self.not_committed.append(ident)
            self.outcomes["doomed"] += 1
        else:
            assert self.execute("COMMIT").statusmessage == "COMMIT"
            self.outcomes["commit"] += 1


class Churner(Worker):
    """Connects, writes, hangs up, over and over (psycopg and psycopg2 in turn)."""

    @property
    def app(self) -> str:
        return f"soak-churn-{self.index}"

    def step(self) -> None:
        self.close()
        self.conn = None
        ident = self.new_id()
        if self.iterations % 2:
            self.conn = self.soak.proxy.connect2(application_name=self.app)
            with self.conn.cursor() as cur:
                cur.execute("INSERT INTO soak_writes VALUES (%s, %s, 'churn2')", (ident, self.index))
            self.conn.commit()
            self.sent.update({"begin": 1, "insert": 1, "commit": 1})
            self.outcomes["commit"] += 1
        else:
            self.conn = self.connect()
            self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'churn')", (ident, self.index))
        self.acked.append(ident)
        self.outcomes["connections"] += 1


class Paced(Worker):
    """Writes as fast as it can into a bucket of 10 a second shared with its siblings: its
    writes are delayed, never refused."""
    app = "soak-paced"

    def step(self) -> None:
        ident = self.new_id()
        self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'paced')", (ident, self.index))
        self.acked.append(ident)


class Importer(Worker):
    """Multi-row INSERTs and COPY in, under a row-cost throttle."""

    @property
    def app(self) -> str:
        return f"soak-importer-{self.index}"

    def step(self) -> None:
        ids = [self.new_id() for _ in range(20)]
        values = ", ".join(f"({i}, {self.index}, 'import')" for i in ids)
        assert self.execute(f"INSERT INTO soak_writes VALUES {values}").rowcount == 20
        self.acked += ids
        ids = [self.new_id() for _ in range(50)]
        with self.conn.cursor() as cur:
            self.sent["copy_in"] += 1
            with cur.copy("COPY soak_writes (id, worker, payload) FROM STDIN") as copy:
                for i in ids:
                    copy.write_row((i, self.index, "copy"))
        self.acked += ids


class Noisy(Worker):
    """The throttled tenant: more writes than its 5 a second, some in transaction blocks.
    A refused write fails with 53400 and nothing of its block commits."""

    def connect(self) -> Any:
        return self.soak.proxy.connect(application_name=f"soak-noisy-{self.index}")

    def insert(self, ident: int) -> None:
        self.execute(f"/* client='{NOISY}' */ INSERT INTO soak_writes VALUES (%s, %s, 'noisy')",
                     (ident, self.index), kind="insert")

    def rejected(self, error: psycopg.Error) -> None:
        rejection_of(error).assert_rate_limited("noisy-tenant", NOISY)

    def step(self) -> None:
        ident = self.new_id()
        try:
            self.insert(ident)
            self.acked.append(ident)
        except psycopg.Error as e:
            if e.sqlstate != REJECT_SQLSTATE:
                raise
            self.rejected(e)
            self.outcomes[REJECT_SQLSTATE] += 1
            self.not_committed.append(ident)
        ids = [self.new_id(), self.new_id()]
        try:
            with self.conn.transaction():
                for i in ids:
                    self.insert(i)
            self.acked += ids
        except psycopg.Error as e:
            if e.sqlstate != REJECT_SQLSTATE:
                raise
            self.rejected(e)
            self.outcomes[REJECT_SQLSTATE] += 1
            self.not_committed += ids
        # Pacing, not synchronisation: a few dozen attempts a second are plenty to be
        # throttled, and keep pgwarden's log of rejections small.
        self.soak.stop.wait(0.02)


class Idle(Worker):
    """Mostly idle connections, as real applications keep in their pools."""

    @property
    def app(self) -> str:
        return f"soak-idle-{self.index}"

    def step(self) -> None:
        assert self.execute("SELECT 1").fetchone() == (1,)
        self.soak.stop.wait(0.5)  # pacing: idle is the point


class IdleInTransaction(Worker):
    """Leaves a transaction idle past idle_timeout (once, early in the run): pgwarden rolls
    it back, the next statement fails with 25P03, ROLLBACK ends the block."""
    counts_for_warmup = False  # its first iteration lasts idle_timeout

    @property
    def app(self) -> str:
        return f"soak-idler-{self.index}"

    def step(self) -> None:
        if self.outcomes["idle_rollback"] == 0:
            ident = self.new_id()
            self.execute("BEGIN")
            self.execute("INSERT INTO soak_writes VALUES (%s, %s, 'idle')", (ident, self.index))
            # pgwarden's own count says when it has rolled the transaction back.
            harness.wait_until(lambda: metric_value(admin_get(self.soak.proxy, "/metrics"),
                                                    "pgwarden_idle_transaction_rollbacks_total") >= 1,
                               IDLE_TIMEOUT + 30, "pgwarden to roll back the idle transaction", interval=0.2)
            error = self.expect_error("25P03", lambda: self.execute("SELECT 1"))
            assert error.diag.message_primary.startswith("pgwarden: transaction rolled back after"), error
            assert self.execute("ROLLBACK").statusmessage == "ROLLBACK"
            self.not_committed.append(ident)
            self.outcomes["idle_rollback"] += 1
        else:
            assert self.execute("SELECT 1").fetchone() == (1,)
            self.soak.stop.wait(0.5)


# Shares of the connections (pgbench's are taken first; Idle gets the rest).
MIX: list[tuple[type[Worker], float, int]] = [  # class, share, at least
    (Reader, 0.20, 2),
    (TenantWriter, 0.16, 2),
    (Psycopg2Writer, 0.10, 2),
    (FlattenNester, 0.06, 1),
    (SavepointNester, 0.05, 1),
    (Doomer, 0.02, 1),
    (Reporter, 0.02, 1),
    (Churner, 0.05, 1),
    (Paced, 0.0, 3),
    (Importer, 0.01, 1),
    (Noisy, 0.0, 2),
    (IdleInTransaction, 0.0, 1),
]


def build_workers(proxy: harness.Pgwarden) -> tuple[Soak, list[Worker]]:
    plan: list[type[Worker]] = []
    budget = CONNECTIONS - PGBENCH_CLIENTS
    for cls, share, least in MIX:
        plan += [cls] * max(least, int(budget * share))
    assert len(plan) <= budget, (len(plan), budget)
    plan += [Idle] * (budget - len(plan))
    soak = Soak(proxy, plan)
    return soak, [cls(soak, index) for index, cls in enumerate(plan)]


# ---------------------------------------------------------------------------------------------
# Observations: /metrics as numbers, pgwarden's memory


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(page: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` on `page` whose labels include `labels`."""
    total = 0.0
    for line in page.splitlines():
        found = _SAMPLE.match(line)
        if found and found.group(1) == name:
            have = dict(_LABEL.findall(found.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(found.group(3))
    return total


def pgbench_command(proxy: harness.Pgwarden, seconds: int) -> list[str]:
    return ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", "postgres", "-n", "-N", "-M", "prepared",
            "-c", str(PGBENCH_CLIENTS), "-j", "2", "-T", str(seconds), "postgres"]


def pgbench_transactions(output: str) -> int:
    found = re.search(r"number of transactions actually processed: (\d+)", output)
    assert found, output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is None or failed.group(1) == "0", output
    return int(found.group(1))


def total(workers: list[Worker], what: Callable[[Worker], int], cls: type | tuple = Worker) -> int:
    return sum(what(w) for w in workers if isinstance(w, cls))


# ---------------------------------------------------------------------------------------------


def test_soak_with_every_policy(pgwarden_factory, soak_server):
    started_at = time.monotonic()
    proxy = pgwarden_factory(CONFIG, upstream=f"{harness.HOST}:{soak_server.port}")
    soak, workers = build_workers(proxy)
    prepare_schema(soak_server, len(workers))
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    for t in threads:
        t.start()
    pgbench: subprocess.Popen | None = None
    try:
        try:
            soak.started.wait(CONNECT_TIMEOUT)
        except threading.BrokenBarrierError:
            soak.stop.set()
            for t in threads:
                t.join(15)
            pytest.fail("clients could not connect:\n" + "\n".join(e for w in workers for e in w.errors))
        connected_at = time.monotonic()
        env = dict(os.environ, PGAPPNAME="soak-pgbench", PGCONNECT_TIMEOUT="10")
        pgbench = subprocess.Popen(pgbench_command(proxy, math.ceil(SOAK_SECONDS)), env=env, text=True,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        # Warm-up: every path has run, then a share of the run (a duration, not a wait for
        # something: the stop event only cuts it short when a worker fails).
        assert soak.first_iterations.wait(60), "not every worker finished one iteration within 60s"
        soak.stop.wait(max(0.0, connected_at + SOAK_SECONDS * WARMUP_SHARE - time.monotonic()))
        rss_warm = rss_kb(proxy.pid)
        soak.stop.wait(max(0.0, connected_at + SOAK_SECONDS - time.monotonic()))
        soak.stop.set()
        for t in threads:
            t.join(max(1.0, JOIN_TIMEOUT - (time.monotonic() - connected_at - SOAK_SECONDS)))
        hung = [t.name for t in threads if t.is_alive()]
        assert not hung, f"workers still running {JOIN_TIMEOUT}s after the stop: {hung[:10]}"
        errors = [e for w in workers for e in w.errors]
        assert not errors, f"{len(errors)} workers failed; the first ones:\n" + "\n".join(errors[:5])

        # Every client connection is still open (pgbench's too, until its -T runs out).
        rss_end = rss_kb(proxy.pid)
        pgbench_out, _ = pgbench.communicate(timeout=60)
        assert pgbench.returncode == 0, pgbench_out
        pgbench_txns = pgbench_transactions(pgbench_out)
        assert pgbench_txns > 0, pgbench_out
        # pgbench has hung up; every other client is still connected.
        open_connections = sum(1 for w in workers if w.conn is not None)
        harness.wait_until(lambda: metric_value(admin_get(proxy, "/metrics"), "pgwarden_client_connections")
                           == open_connections, 30, f"pgwarden_client_connections to be {open_connections}")
        # Every statement of every client has been answered: the counters are final.
        page = admin_get(proxy, "/metrics")
    finally:
        soak.stop.set()
        if pgbench is not None and pgbench.poll() is None:
            pgbench.kill()
            pgbench.wait(10)
        for w in workers:
            try:
                w.close()
            except Exception:
                pass
    stopped_at = time.monotonic()

    # Everyone has gone: pgwarden holds no connection on either side.
    harness.wait_until(lambda: (p := admin_get(proxy, "/metrics")) and
                       metric_value(p, "pgwarden_client_connections") == 0 and
                       metric_value(p, "pgwarden_server_connections") == 0, 30,
                       "pgwarden to drop every connection")
    rss_closed = rss_kb(proxy.pid)
    assert proxy.alive()
    assert admin_get(proxy, "/healthz")

    # ---- what was committed
    with soak_server.connect() as conn:
        present = {row[0] for row in conn.execute("SELECT id FROM soak_writes")}
        counters = dict(conn.execute("SELECT worker, n FROM soak_counters").fetchall())
        history = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
    acked = {i for w in workers for i in w.acked}
    refused = {i for w in workers for i in w.not_committed}
    deleted = {i for w in workers for i in w.deleted}
    assert not acked & refused and not acked & deleted
    missing = acked - present
    assert not missing, f"{len(missing)} acknowledged writes are missing: {sorted(missing)[:10]}"
    assert not refused & present, f"refused or rolled-back writes committed: {sorted(refused & present)[:10]}"
    assert not deleted & present, f"deleted rows still there: {sorted(deleted & present)[:10]}"
    assert present == acked, f"{len(present - acked)} rows nobody acknowledged: {sorted(present - acked)[:10]}"
    wrong_counters = {w.name: (w.counter, counters[w.index]) for w in workers if counters[w.index] != w.counter}
    assert not wrong_counters, f"counters (acknowledged, committed): {wrong_counters}"
    # pgbench counts a transaction once its END is acknowledged; each inserts one history row.
    assert pgbench_txns <= history <= pgbench_txns + PGBENCH_CLIENTS, (pgbench_txns, history)

    # ---- what pgwarden says about it
    exposition = obs.parse_exposition(page)
    assert exposition.families.get("pgwarden_statements_total") == "counter"
    result = harness.run(["promtool", "check", "metrics"], input=page.encode(), timeout=60)
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout.decode()}{result.stderr.decode()}"
    sent = collections.Counter()
    for w in workers:
        sent.update(w.sent)
    pgbench_sent = {"select": pgbench_txns, "insert": pgbench_txns, "update": pgbench_txns,
                    "begin": pgbench_txns, "commit": pgbench_txns}  # -N: BEGIN, UPDATE, SELECT, INSERT, END
    for kind in ("select", "insert", "update", "delete", "begin", "commit", "rollback", "copy_in", "copy_out"):
        counted = metric_value(page, "pgwarden_statements_total", kind=kind)
        expected = sent[kind] + pgbench_sent.get(kind, 0)
        assert counted >= expected, f"pgwarden_statements_total{{kind={kind}}} = {counted}, clients sent {expected}"
    assert metric_value(page, "pgwarden_statements_total", kind="insert") > 0
    client_labels = set(re.findall(r'^pgwarden_statements_total\{[^}]*client="([^"]*)"', page, re.M))
    assert len(client_labels - {"other"}) <= 100, len(client_labels)
    if CONNECTIONS >= 200:  # more distinct client names than max_clients: the rest are "other"
        assert "other" in client_labels, sorted(client_labels)

    noisy_rejections = total(workers, lambda w: w.outcomes[REJECT_SQLSTATE], Noisy)
    assert noisy_rejections > 0, "the noisy tenant was never throttled"
    assert metric_value(page, "pgwarden_throttle_rejected_total", rule="noisy-tenant") == noisy_rejections
    assert metric_value(page, "pgwarden_throttle_rejected_total") == noisy_rejections  # no other rule refused
    delayed = metric_value(page, "pgwarden_throttle_delayed_total", rule="paced")
    assert delayed > 0, "the paced clients were never delayed"
    assert metric_value(page, "pgwarden_throttle_delay_seconds_count", rule="paced") == delayed

    doomer_dooms = total(workers, lambda w: w.outcomes["doomed"], Doomer)
    reporter_dooms = total(workers, lambda w: w.outcomes["doomed"], Reporter)
    assert doomer_dooms > 0 and reporter_dooms > 0
    assert metric_value(page, "pgwarden_doomed_transactions_total", reason="inner_rollback") == doomer_dooms
    assert metric_value(page, "pgwarden_doomed_transactions_total", reason="rule") == reporter_dooms
    assert metric_value(page, "pgwarden_doomed_transactions_total") == doomer_dooms + reporter_dooms
    assert metric_value(page, "pgwarden_doomed_writes_rejected_total") == total(workers, lambda w: w.outcomes["25006"])
    assert metric_value(page, "pgwarden_transactions_total", outcome="doomed_rollback") == doomer_dooms + reporter_dooms
    assert metric_value(page, "pgwarden_rule_hits_total", rule="reports-read-only", action="doom") == reporter_dooms
    idle_rollbacks = total(workers, lambda w: w.outcomes["idle_rollback"])
    assert idle_rollbacks == 1
    assert metric_value(page, "pgwarden_idle_transaction_rollbacks_total") == idle_rollbacks
    assert metric_value(page, "pgwarden_transactions_total", outcome="idle_rollback") == idle_rollbacks

    flatten_nested = total(workers, lambda w: w.outcomes["nested_begin"], (FlattenNester, Doomer))
    savepoint_nested = total(workers, lambda w: w.outcomes["nested_begin"], SavepointNester)
    assert metric_value(page, "pgwarden_nested_begin_total", mode="flatten") == flatten_nested
    assert metric_value(page, "pgwarden_nested_begin_total", mode="savepoint") == savepoint_nested
    assert metric_value(page, "pgwarden_nested_begin_total") == flatten_nested + savepoint_nested
    # The log rule sees every outermost BEGIN; nested ones are answered by the nesting mode
    # before the rules run (not counted as hits today, though the annotated config says
    # "log" records each BEGIN the rule matches).
    legacy_begins = total(workers, lambda w: w.sent["begin"], SavepointNester)
    legacy_outer = total(workers, lambda w: w.outcomes["commit"], SavepointNester)
    legacy_hits = metric_value(page, "pgwarden_rule_hits_total", rule="legacy-nesting", action="log")
    assert legacy_outer <= legacy_hits <= legacy_begins, (legacy_outer, legacy_hits, legacy_begins)

    deletes = sent["delete"]
    notices = total(workers, lambda w: sum(1 for n in w.notices if n == "soak: a write was deleted"))
    assert deletes > 0 and notices == deletes
    assert metric_value(page, "pgwarden_rule_hits_total", rule="delete-notice", action="notice") == deletes
    assert metric_value(page, "pgwarden_rule_hits_total", rule="no-ddl-from-apps") == 0
    committed = total(workers, lambda w: w.outcomes["commit"]) + pgbench_txns
    assert metric_value(page, "pgwarden_transactions_total", outcome="commit") >= committed
    churned = total(workers, lambda w: w.outcomes["connections"], Churner)
    assert metric_value(page, "pgwarden_client_connections_total") >= len(workers) + churned + PGBENCH_CLIENTS

    # ---- memory
    bound = rss_warm * RSS_FACTOR + RSS_SLACK_KB
    statements = sum(sent.values()) + 4 * pgbench_txns
    print(f"\nsoak: {len(workers)} client connections + {PGBENCH_CLIENTS} pgbench for {SOAK_SECONDS:.0f}s: "
          f"~{statements} statements, {len(acked)} rows, {pgbench_txns} pgbench transactions, "
          f"{churned} reconnections, {noisy_rejections} throttled writes, {delayed:.0f} delayed; "
          f"pgwarden RSS after warm-up {rss_warm} kB, at the end {rss_end} kB, after close {rss_closed} kB "
          f"(bound {bound:.0f} kB); log {Path(proxy.log_path).stat().st_size // 1024} kB; "
          f"wall time {stopped_at - started_at:.1f}s")
    if not harness.sanitized():
        assert rss_end <= bound, f"RSS grew from {rss_warm} kB after warm-up to {rss_end} kB at the end"
        assert rss_closed <= bound, f"RSS grew from {rss_warm} kB after warm-up to {rss_closed} kB after close"
