# Faults around pgwarden: clients that vanish at every point of a session (and backends
# terminated under them) leave no fds, memory or server sessions behind; PostgreSQL killed
# with SIGKILL under load gives every client an error at once, pgwarden stays up, turns
# not-ready, and serves again once the server is back on the same port.
from __future__ import annotations

import concurrent.futures
import contextlib
import random
import struct
import threading
import time
from dataclasses import dataclass, field

import psycopg
import pytest

import harness
import pgwire
from fault_util import (admin_get, admin_status, kill_postmaster, rss_kb, start_postgres_again, wait_gone,
                        wait_readyz)

pytestmark = pytest.mark.proxy_only

APP = "pgw_fault"
SINK = "fault_sink"
# Long waits on the server notice a vanished client within this many milliseconds.
CHECK_INTERVAL_MS = "100"
# A raw client waiting for an answer that should come in milliseconds.
SOCKET_TIMEOUT = 10
# A session pgwarden failed to end must not hold up the fixture's SIGTERM for 30 s.
CONFIG = '[proxy]\nshutdown_timeout = "3s"\n'


@pytest.fixture
def sink(pg_server):
    with pg_server.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {SINK}")
        conn.execute(f"CREATE UNLOGGED TABLE {SINK} (a int, b text)")
    return SINK


def our_backends(pg_server: harness.PostgresServer, application_name: str = APP) -> int:
    return pg_server.client_backends(application_name)


def leftover_backends(pg_server: harness.PostgresServer) -> str:
    """What the sessions still on the server are doing, for failure messages."""
    with pg_server.connect() as conn:
        rows = conn.execute("select pid, state, wait_event, now() - backend_start, left(query, 80)"
                            " from pg_stat_activity where application_name = %s", (APP,)).fetchall()
    return "server sessions left:\n" + "\n".join(map(str, rows))


# ---------------------------------------------------------------------------------------------
# Random disconnects
#
# Each scenario drives one raw session to some point and hangs up there (no Terminate unless
# the scenario says so). The worker's `rnd` varies how far it gets; its `admin` is a direct
# connection to the server for pg_terminate_backend.


@dataclass
class Worker:
    host: str
    port: int
    admin: psycopg.Connection
    rnd: random.Random
    counts: dict[str, int] = field(default_factory=dict)
    terminated_ok: int = 0


def _raw(w: Worker) -> pgwire.RawConnection:
    return pgwire.RawConnection(w.host, w.port, timeout=SOCKET_TIMEOUT)


def _startup(raw: pgwire.RawConnection, **options: str) -> pgwire.StartupResult:
    result = raw.startup("postgres", application_name=APP, **options)
    if result.error is not None:
        raw.close()
        raise AssertionError(f"startup through pgwarden failed: {result.error}")
    return result


def _logged_in(w: Worker, **options: str) -> pgwire.RawConnection:
    raw = _raw(w)
    _startup(raw, **options)
    return raw


def _read_some(raw: pgwire.RawConnection, limit: int) -> int:
    got = 0
    while got < limit:
        chunk = raw.sock.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    return got


def s_no_startup(w: Worker) -> None:
    _raw(w).close()


def s_partial_startup(w: Worker) -> None:
    with _raw(w) as raw:
        body = struct.pack("!I", pgwire.PROTOCOL_3_0) + pgwire.cstring("user") + pgwire.cstring("postgres")
        packet = struct.pack("!I", len(body) + 5) + body + b"\0"
        raw.sock.sendall(packet[:w.rnd.randrange(1, len(packet))])


def s_startup_then_gone(w: Worker) -> None:
    # pgwarden is opening the upstream connection or relaying authentication right now.
    with _raw(w) as raw:
        raw.send_startup("postgres", application_name=APP)
        if w.rnd.random() < 0.5:
            raw.read_message()


def s_ssl_request_then_gone(w: Worker) -> None:
    with _raw(w) as raw:
        assert raw.request_ssl() in (b"S", b"N")


def s_mid_scram(w: Worker) -> None:
    with _raw(w) as raw:
        raw.send_startup(harness.SCRAM_USER, application_name=APP)
        kind, body = raw.read_message()
        assert kind == "R" and struct.unpack("!I", body[:4])[0] == 10, (kind, body)
        if w.rnd.random() < 0.5:
            first = f"n,,n=,r={w.rnd.getrandbits(64):x}".encode()
            raw.send(b"p", pgwire.cstring("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first)
            raw.read_message()  # server-first; the client never proves anything


def s_after_auth(w: Worker) -> None:
    with _logged_in(w) as raw:
        if w.rnd.random() < 0.5:
            raw.terminate()


def s_mid_sleep(w: Worker) -> None:
    with _logged_in(w, client_connection_check_interval=CHECK_INTERVAL_MS) as raw:
        raw.query("select pg_sleep(30)")
        if w.rnd.random() < 0.5:
            # Still running: nothing comes back within this time.
            raw.sock.settimeout(w.rnd.uniform(0.001, 0.02))
            try:
                assert raw.sock.recv(1) == b"", "pg_sleep(30) answered"
            except TimeoutError:
                pass


def s_mid_big_result(w: Worker) -> None:
    with _logged_in(w) as raw:
        # About 1 MB: more than the client reads, small enough to keep 10,000 sessions quick.
        raw.query("select g, repeat('x', 200) from generate_series(1, 5000) g")
        assert _read_some(raw, w.rnd.randrange(1, 64 * 1024)) > 0


def s_mid_copy_in(w: Worker) -> None:
    with _logged_in(w) as raw:
        raw.query(f"copy {SINK} from stdin")
        assert raw.read_message()[0] == "G"
        for i in range(w.rnd.randrange(0, 20)):
            raw.send(b"d", f"{i}\trow {i}\n".encode())
        if w.rnd.random() < 0.3:
            raw.sock.sendall(b"d\x00\x00\x01\x00partial")  # a CopyData cut short


def s_mid_copy_out(w: Worker) -> None:
    with _logged_in(w) as raw:
        raw.query("copy (select g, repeat('y', 200) from generate_series(1, 5000) g) to stdout")
        assert _read_some(raw, w.rnd.randrange(1, 64 * 1024)) > 0


def s_mid_extended_batch(w: Worker) -> None:
    with _logged_in(w) as raw:
        for i in range(w.rnd.randrange(1, 6)):
            raw.parse(f"s{i}", "select $1::int + g from generate_series(1, 1000) g", (23,))
            raw.bind(f"p{i}", f"s{i}", (str(i).encode(),))
            raw.describe("P", f"p{i}")
            raw.execute(f"p{i}", max_rows=w.rnd.choice([0, 1, 10]))
        cut = w.rnd.random()
        if cut < 0.3:
            raw.flush()
            raw.read_message()
        elif cut < 0.6:
            raw.sync()
        else:
            # A Parse cut off after its header and part of its body.
            raw.sock.sendall(b"P\x00\x00\x00\x40s_cut\x00select")


def s_in_transaction(w: Worker) -> None:
    with _logged_in(w) as raw:
        # A lock of its own: a shared key would queue every such session behind the others.
        key = w.rnd.getrandbits(62)
        raw.query(f"begin; insert into {SINK} values (1, 'in tx'); select pg_advisory_xact_lock({key})")
        if w.rnd.random() < 0.7:
            messages = raw.read_until("Z")
            assert messages[-1] == ("Z", b"T"), messages


def s_terminated(w: Worker) -> None:
    """The server ends the session: the client must see the FATAL and then EOF."""
    with _raw(w) as raw:
        backend_pid = _startup(raw).backend_pid
        if w.rnd.random() < 0.7:
            raw.query("select pg_sleep(30)")
        assert w.admin.execute("select pg_terminate_backend(%s)", (backend_pid,)).fetchone() == (True,)
        messages = raw.read_until("E")
        fields = pgwire.error_fields(messages[-1][1])
        assert (fields.get("S"), fields.get("C")) == ("FATAL", "57P01"), messages
        assert raw.at_eof()
        w.terminated_ok += 1


SCENARIOS = [
    s_no_startup, s_partial_startup, s_startup_then_gone, s_ssl_request_then_gone, s_mid_scram,
    s_after_auth, s_mid_sleep, s_mid_big_result, s_mid_copy_in, s_mid_copy_out, s_mid_extended_batch,
    s_in_transaction, s_terminated,
]


def run_sessions(proxy: harness.Pgwarden, pg_server: harness.PostgresServer, total: int, threads: int,
                 seed: int) -> list[Worker]:
    """`total` sessions spread over `threads` workers, scenarios in a seeded random order."""
    next_index = iter(range(total))
    lock = threading.Lock()
    failures: list[str] = []
    workers = [Worker(proxy.host, proxy.port, pg_server.connect(), random.Random(seed * 1000 + t))
               for t in range(threads)]

    def work(w: Worker) -> None:
        while not failures:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            scenario = w.rnd.choice(SCENARIOS)
            try:
                scenario(w)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"session {i} ({scenario.__name__}): {type(e).__name__}: {e}")
                return
            w.counts[scenario.__name__] = w.counts.get(scenario.__name__, 0) + 1

    pool = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
    try:
        for t in pool:
            t.start()
        deadline = time.monotonic() + 240
        for t in pool:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in pool), "disconnect workers still running after 240 s"
    finally:
        for w in workers:
            w.admin.close()
    assert not failures, f"{len(failures)} sessions failed (seed {seed}):\n" + "\n".join(failures[:10])
    return workers


def settle(proxy: harness.Pgwarden, pg_server: harness.PostgresServer, fds: int | None, timeout: float = 20) -> None:
    """Waits until no session of ours is left on the server and pgwarden is back to `fds` fds."""
    try:
        harness.wait_until(lambda: our_backends(pg_server) == 0, timeout, "server sessions of the disconnected "
                           "clients to end")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{leftover_backends(pg_server)}\npgwarden's sessions: "
                             f"{admin_get(proxy, '/api/clients')}") from None
    if fds is not None:
        try:
            harness.wait_until(lambda: proxy.fd_count() <= fds, timeout, f"pgwarden's fds back to {fds}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nopen fds:\n" + "\n".join(proxy.fd_listing())) from None
    harness.wait_until(lambda: pg_server.query_one("select count(*) from pg_locks where locktype = 'advisory'") == 0,
                       timeout, "advisory locks of abandoned transactions to be released")


def test_random_disconnects_leave_nothing_behind(pgwarden_factory, pg_server, sink):
    proxy = pgwarden_factory(CONFIG)
    threads = 16
    seed = int(time.time())
    harness.wait_until(lambda: our_backends(pg_server) == 0, 10, "earlier sessions to end")
    # Warm-up: allocator arenas, per-thread caches and the classifier cache reach their
    # working size, so growth after it is what the sessions themselves keep.
    run_sessions(proxy, pg_server, harness.scaled(1500, 300), threads, seed)
    settle(proxy, pg_server, None)
    fds = proxy.fd_count()
    assert fds is not None
    rss_before = rss_kb(proxy.pid)

    total = harness.scaled(10000, 1500)
    started = time.monotonic()
    workers = run_sessions(proxy, pg_server, total, threads, seed + 1)
    elapsed = time.monotonic() - started
    settle(proxy, pg_server, fds)
    rss_after = rss_kb(proxy.pid)

    counts: dict[str, int] = {}
    for w in workers:
        for name, n in w.counts.items():
            counts[name] = counts.get(name, 0) + n
    assert sum(counts.values()) == total
    # Every kind of disconnect really happened, several times.
    assert set(counts) == {s.__name__ for s in SCENARIOS}, counts
    assert min(counts.values()) >= total // len(SCENARIOS) // 3, counts
    assert sum(w.terminated_ok for w in workers) == counts["s_terminated"]

    assert proxy.alive()
    assert admin_status(proxy, "/healthz") == 200
    with proxy.connect() as conn:
        assert conn.execute("select count(*) from generate_series(1, 10)").fetchone() == (10,)
    if not harness.sanitized():
        # ASan keeps freed memory in quarantine (256 MB by default), so RSS says nothing there;
        # LeakSanitizer at exit covers that build. 10 MB over 10,000 sessions is 1 kB each.
        growth = rss_after - rss_before
        assert growth < 10 * 1024, (f"pgwarden's RSS grew {growth} kB over {total} sessions "
                                    f"({rss_before} -> {rss_after} kB)")
    print(f"{total} sessions in {elapsed:.1f}s, rss {rss_before} -> {rss_after} kB, fds {fds}, {counts}")


# ---------------------------------------------------------------------------------------------
# PostgreSQL killed under load


@dataclass
class LoadClient:
    index: int
    statements: int = 0
    failed_at: float | None = None
    error: BaseException | None = None
    running: str = ""  # the statement it is waiting for, for a hang report


def test_postgres_killed_under_load(pgwarden_factory, pg_server, sink):
    proxy = pgwarden_factory(CONFIG)
    wait_readyz(proxy, 200, 5)
    harness.wait_until(lambda: pg_server.client_backends() == 0, 10, "earlier sessions to end")
    fds = proxy.fd_count()
    clients = [LoadClient(i) for i in range(16)]
    give_up = threading.Event()

    def load(c: LoadClient) -> None:
        try:
            conn = proxy.connect(application_name=f"{APP}_load")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            c.error = e
            return
        try:
            while not give_up.is_set():
                step = c.statements % 4
                if step == 0:
                    c.running = "pg_sleep"
                    conn.execute("select pg_sleep(0.01)")
                elif step == 1:
                    c.running = "transaction"
                    with conn.transaction():
                        conn.execute(f"insert into {SINK} values (%s, 'load')", (c.index,))
                        conn.execute(f"select count(*) from {SINK} where a = %s", (c.index,))
                elif step == 2:
                    c.running = "2000 rows"
                    conn.execute("select g from generate_series(1, 2000) g").fetchall()
                else:
                    c.running = "select 1"
                    conn.execute("select 1")
                c.statements += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            c.failed_at = time.monotonic()
            c.error = e
        finally:
            conn.close()

    pool = [threading.Thread(target=load, args=(c,), daemon=True) for c in clients]
    for t in pool:
        t.start()
    orphans: list[int] | None = None
    restarted = False
    try:
        harness.wait_until(lambda: all(c.statements >= 8 or c.error for c in clients), 20, "every client under load")
        assert not [c.error for c in clients if c.error], "clients failed before the kill"
        killed_at, orphans = kill_postmaster(pg_server)
        for t in pool:
            t.join(max(0.0, killed_at + 5 - time.monotonic()))
        give_up.set()
        hung = [(c.index, c.running) for c in clients if c.failed_at is None]
        assert not hung, f"clients got no answer within 5 s of the kill (client, statement): {hung}"
        unexpected = [repr(c.error) for c in clients if not isinstance(c.error, psycopg.OperationalError)]
        assert not unexpected, unexpected
        delays = sorted(c.failed_at - killed_at for c in clients)
        assert delays[-1] < 1.0, f"time from kill to each client's error (s): {[round(d, 3) for d in delays]}"

        # pgwarden itself stays up and says the upstream is gone.
        assert proxy.alive()
        assert admin_status(proxy, "/healthz") == 200
        wait_readyz(proxy, 503, 5)
        with pgwire.RawConnection(proxy.host, proxy.port) as raw:
            result = raw.startup("postgres")
            assert result.error is not None and (result.error["S"], result.error["C"]) == ("FATAL", "08006")
            assert raw.at_eof()
        harness.wait_until(lambda: proxy.fd_count() <= fds, 10, f"pgwarden's fds back to {fds} with the server down")

        wait_gone(orphans, 10)
        start_postgres_again(pg_server)
        restarted = True
        wait_readyz(proxy, 200, 5)

        def session(i: int) -> int:
            with proxy.connect(application_name=f"{APP}_after") as conn:
                with conn.transaction():
                    conn.execute(f"insert into {SINK} values (%s, 'after')", (1000 + i,))
                return conn.execute("select count(*) from generate_series(1, %s)", (i,)).fetchone()[0]

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
            assert list(executor.map(session, range(8), timeout=20)) == list(range(8))
        assert pg_server.query_one(f"select count(*) from {SINK} where b = 'after'") == 8
        assert proxy.alive()
        print(f"kill -> client error (s): min {delays[0]:.3f} max {delays[-1]:.3f}")
    finally:
        give_up.set()
        if orphans is not None and not restarted:
            # Whatever failed above, later tests need the server back.
            with contextlib.suppress(AssertionError):
                wait_gone(orphans, 10)
            start_postgres_again(pg_server)
