# Volume through pgwarden: pgbench in every query mode, and COPY streams in both directions
# that must come out byte-identical to the same COPY run directly against the server.
import hashlib
import re

import pytest

import harness

BIG_TABLE_ROWS = 110_000  # ~24 MB as COPY text
COPY_IN_ROWS = 200_000


@pytest.fixture(scope="module")
def bench_db(pg_server):
    pg_server.query_one("create database pgw_bench")
    harness.pgbench(pg_server, "-i", "-q", "-s", "1", dbname="pgw_bench")
    return "pgw_bench"


def pgbench_counts(output: str) -> tuple[int, int]:
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert processed and failed, output
    return int(processed.group(1)), int(failed.group(1))


def test_pgbench_initialize_through_proxy(proxy, pg_server):
    pg_server.query_one("create database pgw_bench_init")
    result = harness.pgbench(proxy, "-i", "-s", "1", dbname="pgw_bench_init")  # client-side COPY
    assert b"done" in result.stderr
    with pg_server.connect(dbname="pgw_bench_init") as conn:
        assert conn.execute("select count(*), sum(abalance) from pgbench_accounts").fetchone() == (100000, 0)
        assert conn.execute("select count(*) from pgbench_branches").fetchone() == (1,)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_query_mode(proxy, bench_db, mode):
    result = harness.pgbench(proxy, "-n", "-M", mode, "-c", "4", "-j", "2", "-T", "3", dbname=bench_db)
    processed, failed = pgbench_counts(result.stdout.decode())
    assert failed == 0
    assert processed > 50, result.stdout.decode()


@pytest.fixture(scope="module")
def big_table(pg_server):
    pg_server.query_one(
        "create table pgw_big as select g as id, md5(g::text) || repeat('y', 180) as payload,"
        f" now() - g * interval '1 second' as at from generate_series(1, {BIG_TABLE_ROWS}) g")
    return "pgw_big"


def test_copy_to_stdout_of_a_large_table(proxy, pg_server, big_table):
    sql = f"copy (select * from {big_table} order by id) to stdout"
    via_proxy = harness.psql(proxy, sql=sql).stdout
    direct = harness.psql(pg_server, sql=sql).stdout
    assert len(direct) > 20 * 1024 * 1024
    assert len(via_proxy) == len(direct)
    assert hashlib.sha256(via_proxy).digest() == hashlib.sha256(direct).digest()


def test_copy_binary_to_stdout(proxy, pg_server, big_table):
    sql = f"copy (select * from {big_table} order by id limit 20000) to stdout with (format binary)"
    assert harness.psql(proxy, sql=sql).stdout == harness.psql(pg_server, sql=sql).stdout


def test_copy_from_stdin(proxy, pg_server):
    rows = b"".join(b"%d\tlabel %d with some text\t%d.%02d\n" % (i, i * 7, i % 1000, i % 100)
                    for i in range(COPY_IN_ROWS))
    table_sql = "create table {} (id int, label text, amount numeric)"
    pg_server.query_one(table_sql.format("pgw_copy_proxy"))
    pg_server.query_one(table_sql.format("pgw_copy_direct"))
    via_proxy = harness.psql(proxy, sql="copy pgw_copy_proxy from stdin", input=rows)
    harness.psql(pg_server, sql="copy pgw_copy_direct from stdin", input=rows)
    assert via_proxy.stdout.strip() == f"COPY {COPY_IN_ROWS}".encode()

    digest = "select count(*), md5(string_agg(t::text, ',' order by id)) from {} t"
    assert pg_server.query_one("select count(*) from pgw_copy_proxy") == COPY_IN_ROWS
    with pg_server.connect() as conn:
        assert (conn.execute(digest.format("pgw_copy_proxy")).fetchone()
                == conn.execute(digest.format("pgw_copy_direct")).fetchone())
    # And back out: what went in comes out unchanged.
    copied_out = harness.psql(proxy, sql="copy (select * from pgw_copy_proxy order by id) to stdout").stdout
    assert copied_out == rows


def test_copy_from_stdin_with_a_bad_row(proxy, pg_server):
    pg_server.query_one("create table pgw_copy_bad (id int)")
    rows = b"".join(b"%d\n" % i for i in range(50_000)) + b"oops\n" + b"".join(b"%d\n" % i for i in range(50_000))
    result = harness.psql(proxy, sql="copy pgw_copy_bad from stdin", input=rows, check=False)
    assert result.returncode != 0
    assert b'invalid input syntax for type integer: "oops"' in result.stderr
    assert pg_server.query_one("select count(*) from pgw_copy_bad") == 0
    with proxy.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_slow_reader_gets_backpressure_not_buffering(proxy, pg_server):
    """While the client stops reading a large COPY, the server must end up blocked on the
    write (wait event ClientWrite) and pgwarden's memory must stay small."""
    rss_before = resident_bytes(proxy.pid) if proxy.pid else 0
    client = harness.psql_popen(proxy, "-c", "copy (select g, repeat('x', 1000) from generate_series(1, 500000) g)"
                                " to stdout", env={"PGAPPNAME": "pgw_slow_reader"})
    try:
        assert len(client.stdout.read(1024 * 1024)) == 1024 * 1024
        harness.wait_until(
            lambda: pg_server.query_one("select wait_event from pg_stat_activity where application_name ="
                                        " 'pgw_slow_reader'") == "ClientWrite",
            20, "the server to block writing to a client that does not read")
        if proxy.pid:
            grown = resident_bytes(proxy.pid) - rss_before
            assert grown < 64 * 1024 * 1024, f"pgwarden grew by {grown} bytes holding a stalled stream"
    finally:
        client.kill()
        client.wait(timeout=5)
        client.stdout.close()
        client.stderr.close()
    harness.wait_until(lambda: pg_server.client_backends("pgw_slow_reader") == 0, 10, "the stalled session to end")


@pytest.mark.skipif(harness.sanitized(), reason="ASan holds freed memory in quarantine: RSS cannot show a release")
def test_sessions_that_moved_large_answers_hold_no_large_buffers_once_idle(proxy):
    """A large answer or statement moves through a session's heap buffers in large reads;
    once the session is idle again they must be gone, or every session that ever ran a
    big query would keep tens of KiB. The sessions take turns, so what one gives back the
    next one reuses, and RSS grows only if buffers are kept. A few sessions go first, so
    that the allocator of each worker thread already holds what one turn needs, and (on
    io_uring) so that the kernel has gone once round each thread's provided buffers, which
    it hands out in turn: they are a fixed 2 MiB per thread, not a cost per session."""
    sessions, warm = 60, 8
    big_text = "y" * 100_000

    def large_work(conn) -> None:
        rows = conn.execute("select g, repeat('x', 100) from generate_series(1, 2000) g").fetchall()
        assert len(rows) == 2000 and rows[-1] == (2000, "x" * 100)
        assert conn.execute("select length(%s)", (big_text,)).fetchone() == (100_000,)

    conns = [proxy.connect() for _ in range(sessions)]
    try:
        for _ in range(3):
            for conn in conns[:warm]:
                large_work(conn)
        rss_before = resident_bytes(proxy.pid)
        for conn in conns[warm:]:
            large_work(conn)
        grown = resident_bytes(proxy.pid) - rss_before
        # Kept buffers would be about 16 KiB (the answer) and 100 KiB (the statement) per
        # session: over 6 MiB for these 52.
        assert grown < 1024 * 1024, f"{sessions - warm} idle sessions grew pgwarden by {grown} bytes after large answers"
    finally:
        for conn in conns:
            conn.close()


def test_many_stalled_readers_at_once_each_get_their_answer_intact(pgwarden_factory, pg_server):
    """On io_uring each socket keeps a receive armed that takes its bytes into buffers the
    worker thread shares (128 of them); a direction whose other side does not take what
    it read keeps a few, and then stops receiving. With every session on one thread and
    more stalled answers than the shared buffers hold, some sessions must go on receiving
    into their own memory; all must then deliver their whole answer, in order, once their
    clients read again. The same runs on epoll, where nothing is shared."""
    proxy = pgwarden_factory("[proxy]\nthreads = 1\n")
    clients_count = harness.scaled(40, 24)
    rows = 20_000  # 20 MB each: more than the sockets on the way hold for a reader that stalls
    answer = b"".join(f"{g}\t{'x' * 1000}\n".encode() for g in range(1, rows + 1))
    expected = hashlib.sha256(answer).hexdigest()
    app = "pgw_stalled_many"
    clients = [harness.psql_popen(proxy, "-c", f"copy (select g, repeat('x', 1000) from generate_series(1, {rows}) g)"
                                  " to stdout", env={"PGAPPNAME": app}) for _ in range(clients_count)]
    try:
        harness.wait_until(
            lambda: pg_server.query_one("select count(*) from pg_stat_activity where application_name = %s"
                                        " and (wait_event = 'ClientWrite' or state = 'idle')", (app,)) == clients_count,
            60, f"all {clients_count} servers to block writing to clients that do not read (or to have sent all"
                " into the sockets' buffers on the way)")
        for client in clients:
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0, err.decode(errors="replace")
            assert len(out) == len(answer)
            assert hashlib.sha256(out).hexdigest() == expected
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=5)
    with proxy.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
