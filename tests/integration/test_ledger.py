# "Nothing lost": 16 clients write a ledger through pgwarden, one row per transaction, while
# a throttle rejects and delays some of their writes, cancel requests land on their
# statements and pgwarden is restarted under them. Every transaction whose COMMIT was
# acknowledged must be in the table; none the client was told failed may be.
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import psycopg
import psycopg.pq
import pytest

import harness
from fault_util import restart_on_same_ports
from throttle_util import metric

pytestmark = pytest.mark.proxy_only

TABLE = "ledger"
CLIENTS = 16
# Ids are client * ID_STRIDE + sequence number: unique without asking anyone.
ID_STRIDE = 1_000_000
IDLE = psycopg.pq.TransactionStatus.IDLE
# A client that has finished no transaction for this long is stuck: every statement here
# answers in milliseconds, pg_sleep is cancelled after 0.1 s (or ends at 2 s), and the
# restart (drain up to shutdown_timeout, then a new process) takes a few seconds.
STALL_SECONDS = 20
HOT = "/* client='hot' */ "
SLOW = "/* client='slow' */ "

# "hot" writes share one bucket of 5 a second that refuses at once; "slow" writes share one
# of 20 a second that makes them wait (refusing past 100 ms). Clients tag a few runs of three
# transactions in a row, so each run meets a bucket that is already empty.
CONFIG = """
[proxy]
shutdown_timeout = "5s"

[[throttle]]
name = "ledger-hot"
match = { client = "hot" }
rate = 5
burst = 1
bucket = "rule"
action = "reject"

[[throttle]]
name = "ledger-slow"
match = { client = "slow" }
rate = 20
burst = 1
bucket = "rule"
action = "delay"
max_delay = "100ms"
"""


@dataclass
class LedgerClient:
    index: int
    acked: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)  # connection lost while COMMIT was on its way
    acked_after_restart: int = 0
    rejected: int = 0        # 53400 from the throttle
    cancelled: int = 0       # 57014 from a cancel request
    connections: int = 0
    silent_rollbacks: list[int] = field(default_factory=list)  # COMMIT answered ROLLBACK with no error before
    cancel_handle: psycopg.pq.abc.PGcancel | None = None
    step: str = "starting"   # what it is doing now, for a hang report
    progress_at: float = field(default_factory=time.monotonic)  # when it last finished a transaction
    crash: str | None = None

    def done(self) -> int:
        return len(self.acked) + len(self.failed) + len(self.unknown)


@pytest.fixture
def ledger(pg_server):
    with pg_server.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, client int NOT NULL, shape text NOT NULL)")
    return TABLE


def send_cancel(handle: psycopg.pq.abc.PGcancel) -> None:
    try:
        handle.cancel()
    except psycopg.OperationalError:
        pass  # pgwarden is restarting: there is nothing to cancel


class Run:
    """Shared state of one ledger run: the clients, the restart flag and the stop signal."""

    def __init__(self, proxy: harness.Pgwarden, per_client: int, seed: int) -> None:
        self.proxy = proxy
        self.per_client = per_client
        self.seed = seed
        self.clients = [LedgerClient(i) for i in range(CLIENTS)]
        self.restarted = threading.Event()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + 120

    def connect(self, c: LedgerClient) -> psycopg.Connection:
        """Connects, retrying while pgwarden is down (the restart), as a pooled client would."""
        last: Exception | None = None
        while time.monotonic() < self.deadline and not self.stop.is_set():
            try:
                conn = self.proxy.connect(application_name=f"ledger-{c.index}", connect_timeout=3)
            except psycopg.OperationalError as e:
                last = e
                self.stop.wait(0.02)  # back-off between attempts, as a real client's pool does
                continue
            c.connections += 1
            c.cancel_handle = conn.pgconn.get_cancel()
            return conn
        raise AssertionError(f"client {c.index} could not reconnect: {last}")

    def client(self, c: LedgerClient) -> None:
        try:
            self._client(c)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            c.crash = f"{type(e).__name__}: {e}"

    def _client(self, c: LedgerClient) -> None:
        rnd = random.Random(self.seed * 100 + c.index)
        conn: psycopg.Connection | None = None
        tagged_left, tag = 0, ""
        for seq in range(self.per_client):
            c.progress_at = time.monotonic()
            if self.stop.is_set():
                return
            ident = c.index * ID_STRIDE + seq
            if conn is None:
                c.step = "connecting"
                conn = self.connect(c)
            if tagged_left == 0 and rnd.random() < 0.03:
                tagged_left, tag = 3, rnd.choice([HOT, SLOW])
            use_tag = tag if tagged_left > 0 else ""
            tagged_left = max(0, tagged_left - 1)
            shape = rnd.choices(["explicit", "autocommit", "one_query"], weights=[6, 2, 2])[0]
            sleeps = shape == "explicit" and rnd.random() < 0.02
            committing = False
            try:
                # A transaction the last error left open (a cancelled ROLLBACK, say) ends first.
                c.step = f"{ident}: rollback of an earlier transaction"
                for _ in range(5):
                    if conn.info.transaction_status == IDLE:
                        break
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.errors.QueryCanceled:
                        pass
                assert conn.info.transaction_status == IDLE, "cannot end the previous transaction"
                insert = f"{use_tag}INSERT INTO {TABLE} (id, client, shape) VALUES (%s, %s, %s)"
                if shape == "explicit":
                    c.step = f"{ident}: BEGIN"
                    conn.execute("BEGIN")
                    c.step = f"{ident}: INSERT"
                    conn.execute(insert, (ident, c.index, shape))
                    if sleeps:
                        # Cancelled while the server sleeps: the transaction must not commit.
                        c.step = f"{ident}: pg_sleep"
                        timer = threading.Timer(0.1, send_cancel, (c.cancel_handle,))
                        timer.start()
                        try:
                            conn.execute("SELECT pg_sleep(2)")
                        finally:
                            timer.cancel()
                    committing = True
                    c.step = f"{ident}: COMMIT"
                    status = conn.execute("COMMIT").statusmessage
                elif shape == "autocommit":
                    committing = True
                    c.step = f"{ident}: autocommit INSERT"
                    status = "COMMIT" if conn.execute(insert, (ident, c.index, shape)).rowcount == 1 else "?"
                else:
                    committing = True
                    c.step = f"{ident}: BEGIN; INSERT; COMMIT"
                    cur = conn.execute(f"BEGIN; {use_tag}INSERT INTO {TABLE} (id, client, shape) "
                                       f"VALUES ({ident}, {c.index}, '{shape}'); COMMIT")
                    while cur.nextset():
                        pass
                    status = cur.statusmessage
                if status == "COMMIT":
                    c.acked.append(ident)
                    if self.restarted.is_set():
                        c.acked_after_restart += 1
                else:
                    # The server said ROLLBACK to our COMMIT: an error we never saw.
                    c.failed.append(ident)
                    c.silent_rollbacks.append(ident)
            except psycopg.Error as e:
                lost = conn.broken or conn.closed
                (c.unknown if committing and lost else c.failed).append(ident)
                if e.sqlstate == "53400":
                    c.rejected += 1
                elif e.sqlstate == "57014":
                    c.cancelled += 1
                if lost:
                    conn.close()
                    conn = None
        c.step = "finished"
        if conn is not None:
            conn.close()

    def cancel_at_random(self) -> None:
        """Cancel requests for random clients at random moments: whatever statement they hit
        (BEGIN, INSERT, COMMIT, a throttled wait, or nothing) fails or goes on."""
        rnd = random.Random(self.seed)
        while not self.stop.wait(rnd.uniform(0.005, 0.05)):
            handle = rnd.choice(self.clients).cancel_handle
            if handle is not None:
                send_cancel(handle)

    def done(self) -> int:
        return sum(c.done() for c in self.clients)

    def finished_or_stalled(self) -> bool:
        now = time.monotonic()
        return all(c.step == "finished" or c.crash or now - c.progress_at > STALL_SECONDS for c in self.clients)

    def stalled(self) -> str:
        now = time.monotonic()
        return "; ".join(f"client {c.index} for {now - c.progress_at:.0f}s at {c.step}" for c in self.clients
                         if c.step != "finished" and not c.crash and now - c.progress_at > STALL_SECONDS)


def committed(pg_server: harness.PostgresServer) -> set[int]:
    with pg_server.connect() as conn:
        return {row[0] for row in conn.execute(f"SELECT id FROM {TABLE}")}


def delayed(proxy: harness.Pgwarden) -> float:
    return metric(proxy, "pgwarden_throttle_delayed_total", rule="ledger-slow")


def test_nothing_lost_through_throttling_cancels_and_a_restart(pgwarden_factory, pg_server, ledger):
    proxy = pgwarden_factory(CONFIG)
    per_client = harness.scaled(2000, 400)
    run = Run(proxy, per_client, seed=int(time.time()))
    started = time.monotonic()
    workers = [threading.Thread(target=run.client, args=(c,), daemon=True) for c in run.clients]
    canceller = threading.Thread(target=run.cancel_at_random, daemon=True)
    for t in [*workers, canceller]:
        t.start()
    try:
        total = CLIENTS * per_client
        harness.wait_until(lambda: run.done() >= total * 0.4 or any(c.crash for c in run.clients), 90,
                           "clients to get through 40% of their transactions", interval=0.05)
        old_pid = proxy.pid
        delayed_before_restart = delayed(proxy)
        restart_at = time.monotonic()
        restart_on_same_ports(proxy)
        restart_seconds = time.monotonic() - restart_at
        assert proxy.pid != old_pid
        run.restarted.set()

        harness.wait_until(run.finished_or_stalled, max(1.0, run.deadline - time.monotonic()),
                           "every client to finish its transactions")
        stalled = run.stalled()
        assert not stalled, f"clients stuck waiting for pgwarden: {stalled}"
        for t in workers:
            t.join(5)
    finally:
        run.stop.set()
        canceller.join(10)
    elapsed = time.monotonic() - started
    crashes = [f"client {c.index}: {c.crash}" for c in run.clients if c.crash]
    assert not crashes, "\n".join(crashes)

    acked = {i for c in run.clients for i in c.acked}
    failed = {i for c in run.clients for i in c.failed}
    unknown = {i for c in run.clients for i in c.unknown}
    assert len(acked) + len(failed) + len(unknown) == CLIENTS * per_client
    in_table = committed(pg_server)

    lost = sorted(acked - in_table)
    assert not lost, f"{len(lost)} acknowledged commits missing from the table: {lost[:20]}"
    resurrected = sorted(failed & in_table)
    assert not resurrected, f"{len(resurrected)} transactions reported failed are in the table: {resurrected[:20]}"
    strangers = sorted(in_table - acked - unknown)
    assert not strangers, f"rows nobody committed: {strangers[:20]}"
    silent = [i for c in run.clients for i in c.silent_rollbacks]
    assert not silent, f"COMMIT answered ROLLBACK without an earlier error for {silent[:20]}"

    # The faults really happened, so the checks above were not vacuous.
    rejected = sum(c.rejected for c in run.clients)
    cancelled = sum(c.cancelled for c in run.clients)
    delays = delayed_before_restart + delayed(proxy)
    assert rejected > 0, "the throttle never rejected a write"
    assert delays > 0, "the throttle never delayed a write"
    assert cancelled > 0, "no cancel request ever cancelled a statement"
    assert all(c.connections >= 2 for c in run.clients), \
        f"connections per client: {[c.connections for c in run.clients]} (the restart must end every session)"
    assert all(c.acked_after_restart > 0 for c in run.clients), \
        f"commits after the restart per client: {[c.acked_after_restart for c in run.clients]}"
    assert len(acked) > CLIENTS * per_client // 2, f"only {len(acked)} of {CLIENTS * per_client} committed"
    print(f"{CLIENTS * per_client} transactions in {elapsed:.1f}s (restart {restart_seconds:.2f}s): "
          f"{len(acked)} acked, {len(failed)} failed, {len(unknown)} unknown "
          f"({len(unknown & in_table)} of them committed); {rejected} rejected, {delays:.0f} delayed, "
          f"{cancelled} cancelled, {sum(c.connections for c in run.clients)} connections")
