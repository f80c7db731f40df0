# Session lifecycle through pgwarden: cancel requests reach the right backend, clients and
# backends that die leave no server sessions or pgwarden fds behind, and an unreachable
# upstream is reported to the client as 08006.
import concurrent.futures
import signal
import time

import psycopg
import psycopg.errors
import pytest

import harness
import pgwire


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def settle(pg_server, proxy) -> tuple[int, int | None]:
    """Baselines once earlier sessions (the readiness probe, other tests) are gone."""
    harness.wait_until(lambda: pg_server.client_backends() == 0, 10, "earlier sessions to end")
    return 0, proxy.fd_count()


def assert_back_to(pg_server, proxy, baseline: tuple[int, int | None]) -> None:
    backends, fds = baseline
    harness.wait_until(lambda: pg_server.client_backends() <= backends, 10, "server sessions back to baseline")
    if fds is not None:
        try:
            harness.wait_until(lambda: proxy.fd_count() <= fds, 10, f"pgwarden fds back to {fds}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nopen fds:\n" + "\n".join(proxy.fd_listing())) from None
    assert proxy.pid is None or proxy.alive()


def wait_active(pg_server, application_name: str, count: int = 1) -> list[int]:
    return harness.wait_until(
        lambda: (pids := pg_server.backend_pids(application_name, "active")) and len(pids) == count and pids,
        10, f"{application_name} to be running its query")


def test_cancel_reaches_the_right_backend(proxy, pg_server, pool):
    with proxy.connect(application_name="pgw_cancel_a") as a, proxy.connect(application_name="pgw_cancel_b") as b:
        running_a = pool.submit(a.execute, "select pg_sleep(30)")
        running_b = pool.submit(b.execute, "select pg_sleep(30)")
        wait_active(pg_server, "pgw_cancel_a")
        wait_active(pg_server, "pgw_cancel_b")
        started = time.monotonic()
        a.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled) as canceled:
            running_a.result(timeout=5)
        assert time.monotonic() - started < 1.0
        assert canceled.value.sqlstate == "57014"
        # b's query is untouched by a's cancel.
        assert not running_b.done()
        assert pg_server.backend_pids("pgw_cancel_b", "active")
        b.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled):
            running_b.result(timeout=5)
        assert a.execute("select 'a alive'").fetchone() == ("a alive",)
        assert b.execute("select 'b alive'").fetchone() == ("b alive",)


def test_cancel_with_a_wrong_key_does_nothing(proxy, pg_server):
    with pgwire.RawConnection(proxy.host, proxy.port, timeout=10) as raw:
        result = raw.startup("postgres", application_name="pgw_cancel_raw")
        assert result.error is None and result.backend_pid is not None
        raw.query("select pg_sleep(30)")
        wait_active(pg_server, "pgw_cancel_raw")
        pgwire.send_cancel(proxy.host, proxy.port, result.backend_pid, result.backend_secret ^ 0x5A5A)
        pgwire.send_cancel(proxy.host, proxy.port, result.backend_pid + 1, result.backend_secret)
        time.sleep(0.3)  # a cancel that wrongly worked would have arrived by now
        assert pg_server.backend_pids("pgw_cancel_raw", "active")
        started = time.monotonic()
        pgwire.send_cancel(proxy.host, proxy.port, result.backend_pid, result.backend_secret)
        messages = raw.read_until("Z")
        assert time.monotonic() - started < 1.0
        errors = [pgwire.error_fields(body) for kind, body in messages if kind == "E"]
        assert [e["C"] for e in errors] == ["57014"]


def test_psql_interrupt_cancels(proxy, pg_server):
    client = harness.psql_popen(proxy, "-c", "select pg_sleep(30)", env={"PGAPPNAME": "pgw_psql_sigint"})
    try:
        wait_active(pg_server, "pgw_psql_sigint")
        started = time.monotonic()
        client.send_signal(signal.SIGINT)  # psql sends a CancelRequest
        _, stderr = client.communicate(timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        client.kill()
    assert b"canceling statement due to user request" in stderr
    assert client.returncode != 0


def test_client_killed_mid_query_leaves_nothing_behind(proxy, pg_server):
    baseline = settle(pg_server, proxy)
    # The server notices a vanished peer during pg_sleep only with this check enabled.
    client = harness.psql_popen(proxy, "-c", "select pg_sleep(30)",
                                env={"PGAPPNAME": "pgw_killed", "PGOPTIONS": "-c client_connection_check_interval=100"})
    try:
        wait_active(pg_server, "pgw_killed")
    finally:
        client.kill()
        client.wait(timeout=5)
    assert_back_to(pg_server, proxy, baseline)
    with proxy.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_client_killed_mid_stream_leaves_nothing_behind(proxy, pg_server):
    baseline = settle(pg_server, proxy)
    client = harness.psql_popen(proxy, "-c", "copy (select g, repeat('x', 200) from generate_series(1, 5000000) g)"
                                " to stdout", env={"PGAPPNAME": "pgw_killed_stream"})
    try:
        assert len(client.stdout.read(1024 * 1024)) == 1024 * 1024
    finally:
        client.kill()
        client.wait(timeout=5)
        client.stdout.close()
        client.stderr.close()
    assert_back_to(pg_server, proxy, baseline)


def test_terminated_backend_gives_57P01_and_leaves_nothing_behind(proxy, pg_server, pool):
    baseline = settle(pg_server, proxy)
    with proxy.connect(application_name="pgw_victim") as victim:
        running = pool.submit(victim.execute, "select pg_sleep(30)")
        pid = wait_active(pg_server, "pgw_victim")[0]
        assert pid == victim.info.backend_pid
        assert pg_server.query_one("select pg_terminate_backend(%s)", (pid,)) is True
        # libpq reports the FATAL and the close together, without the SQLSTATE; the raw
        # sessions below check that.
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            running.result(timeout=5)
    assert_back_to(pg_server, proxy, baseline)

    # Mid-query and idle: the ErrorResponse arrives, then pgwarden closes the client side too.
    for busy in (True, False):
        with pgwire.RawConnection(proxy.host, proxy.port) as raw:
            result = raw.startup("postgres", application_name="pgw_raw_victim")
            assert result.error is None
            if busy:
                raw.query("select pg_sleep(30)")
                wait_active(pg_server, "pgw_raw_victim")
            assert pg_server.query_one("select pg_terminate_backend(%s)", (result.backend_pid,)) is True
            messages = raw.read_until("E")
            assert "".join(k for k, _ in messages) == ("TE" if busy else "E")
            assert (pgwire.error_fields(messages[-1][1])["S"], pgwire.error_fields(messages[-1][1])["C"]) \
                == ("FATAL", "57P01")
            assert raw.at_eof()
        assert_back_to(pg_server, proxy, baseline)


def test_many_sessions_come_and_go(proxy, pg_server):
    baseline = settle(pg_server, proxy)

    def session(i: int) -> int:
        with proxy.connect(application_name=f"pgw_many_{i}") as conn:
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(%s)", (i,))
                return conn.execute("select %s::int + count(*) from generate_series(1, 1000)", (i,)).fetchone()[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as executor:
        results = list(executor.map(session, range(100), timeout=60))
    assert results == [i + 1000 for i in range(100)]
    # Abandoned sockets at every stage: before the startup packet, mid-startup, mid-query.
    for _ in range(5):
        with pgwire.RawConnection(proxy.host, proxy.port):
            pass
        with pgwire.RawConnection(proxy.host, proxy.port) as raw:
            raw.sock.sendall(b"\x00\x00\x00\x30\x00\x03")
        with pgwire.RawConnection(proxy.host, proxy.port) as raw:
            raw.startup("postgres")
            raw.query("select g from generate_series(1, 100000) g")
    assert_back_to(pg_server, proxy, baseline)


@pytest.mark.proxy_only
def test_unreachable_upstream_gives_08006(pgwarden_factory):
    nobody_listens = harness.free_port()
    proxy = pgwarden_factory(upstream=f"{harness.HOST}:{nobody_listens}", wait="tcp")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        result = raw.startup("postgres")
        assert result.error is not None
        assert (result.error["S"], result.error["C"]) == ("FATAL", "08006")
        assert result.error["M"].startswith("pgwarden: cannot connect to upstream")
        assert raw.at_eof()
    # Measured only now: pgwarden's worker threads may open their fds after it starts listening.
    fds = proxy.fd_count()
    for _ in range(5):
        assert "pgwarden: cannot connect to upstream" in proxy.connect_error()
    assert proxy.alive()
    harness.wait_until(lambda: proxy.fd_count() <= fds, 10, f"pgwarden fds back to {fds}")
