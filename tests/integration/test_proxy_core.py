# The transparent proxy core: what a PostgreSQL 15 client does must work through pgwarden
# unchanged (session state, notifications, notices, errors, pipelining, cursors, FunctionCall).
import hashlib
import os
import select

import psycopg
import psycopg.errors
import pytest

import harness
import nesting_util
import pgwire


def test_backend_key_data_names_the_real_backend(proxy, pg_server):
    with proxy.connect(application_name="pgw_keydata") as conn:
        backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert conn.info.backend_pid == backend_pid
        assert pg_server.backend_pids("pgw_keydata") == [backend_pid]


def test_startup_parameter_status_is_relayed(proxy):
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        result = raw.startup("postgres", application_name="pgw_startup")
    assert result.error is None, result.error
    assert result.parameters["application_name"] == "pgw_startup"
    assert result.parameters["server_version"].startswith("15")
    for name in ("client_encoding", "DateStyle", "integer_datetimes", "standard_conforming_strings", "TimeZone"):
        assert name in result.parameters


def test_set_application_name_sends_parameter_status(proxy):
    with proxy.connect() as conn:
        conn.execute("set application_name = 'pgw_renamed'")
        assert conn.info.parameter_status("application_name") == "pgw_renamed"
        conn.execute("set TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_notice_response_is_delivered(proxy):
    notices = []
    with proxy.connect() as conn:
        # A Diagnostic is only valid inside the handler.
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary)))
        conn.execute("do $$ begin raise notice 'pgw notice %', 42; end $$")
        conn.execute("do $$ begin raise warning 'pgw warning'; end $$")
    assert notices == [
        ("NOTICE", "pgw notice 42"), ("WARNING", "pgw warning")]


def test_listen_notify_between_two_clients(proxy):
    received = []
    with proxy.connect() as listener, proxy.connect() as notifier:
        listener.add_notify_handler(received.append)
        listener.execute("listen pgw_channel")
        notifier_pid = notifier.execute("select pg_backend_pid()").fetchone()[0]
        notifier.execute("notify pgw_channel, 'payload one'")
        # The notification must arrive while the listener is idle, unasked.
        readable, _, _ = select.select([listener.fileno()], [], [], 5)
        assert readable, "no notification reached the idle listener within 5 s"
        listener.execute("select 1")  # lets psycopg read and dispatch what arrived
        assert [(n.channel, n.payload, n.pid) for n in received] == [("pgw_channel", "payload one", notifier_pid)]
        # Inside a transaction, delivery waits for commit.
        with notifier.transaction():
            notifier.execute("select pg_notify('pgw_channel', 'payload two')")
        readable, _, _ = select.select([listener.fileno()], [], [], 5)
        assert readable
        listener.execute("select 1")
        assert [n.payload for n in received] == ["payload one", "payload two"]


def test_multi_statement_simple_query(proxy, pg_server):
    sql = "select 1 as a; select 'two' as b, 2.5 as c; values (3), (4)"
    with proxy.connect() as conn:
        cur = conn.execute(sql)
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
    assert results == [[(1,)], [("two", pytest.approx(2.5))], [(3,), (4,)]]
    # The same through psql: byte for byte what the server itself answers.
    psql_sql = sql + "; show application_name; select 1/0"
    via_proxy = harness.psql(proxy, sql=psql_sql, check=False)
    direct = harness.psql(pg_server, sql=psql_sql, check=False)
    assert b"two" in via_proxy.stdout and b"(2 rows)" in via_proxy.stdout
    assert b"division by zero" in via_proxy.stderr
    assert (via_proxy.returncode, via_proxy.stdout, via_proxy.stderr) == (direct.returncode, direct.stdout,
                                                                          direct.stderr)


def test_multi_statement_query_is_one_implicit_transaction(proxy, pg_server):
    pg_server.query_one("create table if not exists pgw_multi (id int)")
    pg_server.query_one("truncate pgw_multi")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.startup("postgres").error is None
        raw.query("insert into pgw_multi values (1); select 1/0; insert into pgw_multi values (2)")
        messages = raw.read_until("Z")
    assert [kind for kind, _ in messages] == ["C", "E", "Z"]
    assert pgwire.error_fields(messages[1][1])["C"] == "22012"
    assert messages[2][1] == b"I"
    assert pg_server.query_one("select count(*) from pgw_multi") == 0


def test_error_mid_transaction_then_rollback(proxy):
    with proxy.connect() as conn:
        conn.execute("begin")
        conn.execute("create temp table pgw_tx (id int)")
        conn.execute("insert into pgw_tx values (1)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction) as failed:
            conn.execute("select 1")
        assert failed.value.sqlstate == "25P02"
        conn.execute("rollback")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select 2").fetchone() == (2,)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from pgw_tx")  # rolled back with its transaction


def test_savepoints_survive_an_error(proxy):
    with proxy.connect(autocommit=False) as conn:
        conn.execute("create temp table pgw_sp (id int)")
        conn.execute("insert into pgw_sp values (1)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():  # a savepoint inside the open transaction
                conn.execute("create unique index on pgw_sp (id)")
                conn.execute("insert into pgw_sp values (1)")
        conn.execute("insert into pgw_sp values (2)")
        assert conn.execute("select array_agg(id order by id) from pgw_sp").fetchone() == ([1, 2],)
        conn.rollback()


def test_pipeline_with_an_error_in_the_middle(proxy):
    with proxy.connect() as conn:
        conn.execute("create temp table pgw_pipe (id int primary key)")
        cursors = []
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline():
                cursors.append(conn.execute("insert into pgw_pipe values (1) returning id"))
                cursors.append(conn.execute("insert into pgw_pipe values (1)"))
                # psycopg may already have read the error while sending this one, and then
                # raises here instead of at the end of the block.
                cursors.append(conn.execute("insert into pgw_pipe values (3) returning id"))
        assert cursors[0].fetchone() == (1,)
        if len(cursors) == 3:
            with pytest.raises(psycopg.ProgrammingError):
                cursors[2].fetchone()  # skipped by the server after the error
        # One implicit transaction up to the Sync: nothing of it is kept.
        assert conn.execute("select count(*) from pgw_pipe").fetchone() == (0,)

        with conn.pipeline() as pipeline:
            cursors = [conn.execute("insert into pgw_pipe values (%s) returning id", (i,)) for i in range(1, 6)]
            pipeline.sync()
            selected = conn.execute("select array_agg(id order by id) from pgw_pipe")
        assert [c.fetchone()[0] for c in cursors] == [1, 2, 3, 4, 5]
        assert selected.fetchone() == ([1, 2, 3, 4, 5],)

        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline() as pipeline:
                conn.execute("insert into pgw_pipe values (10)")
                pipeline.sync()  # commits 10 on its own
                conn.execute("insert into pgw_pipe values (1)")
        assert conn.execute("select max(id) from pgw_pipe").fetchone() == (10,)


def test_prepared_statements_and_binary_results(proxy):
    with proxy.connect() as conn:
        for i in range(8):  # psycopg prepares server-side after prepare_threshold uses
            row = conn.execute("select %s::int * 2, %s::text", (i, f"v{i}"), prepare=True).fetchone()
            assert row == (i * 2, f"v{i}")
        with conn.cursor(binary=True) as cur:
            cur.execute("select %s::bytea, %s::numeric, now()::date", (b"\x00\x01\xff", "12.50"))
            data, number, _ = cur.fetchone()
            assert bytes(data) == b"\x00\x01\xff" and str(number) == "12.50"
        conn.execute("prepare pgw_sql_prep(int) as select $1 + 40")
        assert conn.execute("execute pgw_sql_prep(2)").fetchone() == (42,)
        conn.execute("deallocate pgw_sql_prep")


def test_server_side_cursor_fetchmany(proxy):
    rows_total = 30000
    with proxy.connect(autocommit=False) as conn:
        with conn.cursor(name="pgw_named") as cur:
            cur.execute("select g, md5(g::text) from generate_series(1, %s) g", (rows_total,))
            first = cur.fetchmany(7)
            assert [r[0] for r in first] == list(range(1, 8))
            seen = len(first)
            checksum = 0
            while batch := cur.fetchmany(4000):
                seen += len(batch)
                checksum += sum(r[0] for r in batch)
            assert seen == rows_total
            assert checksum == sum(range(8, rows_total + 1))
        conn.commit()


def test_copy_with_psycopg_error_and_client_abort(proxy):
    with proxy.connect() as conn:
        conn.execute("create temp table pgw_copy (id int, label text)")
        with conn.cursor() as cur:
            with cur.copy("copy pgw_copy from stdin") as copy:
                for i in range(1000):
                    copy.write_row((i, f"row {i}"))
            # A bad row: the server fails the COPY while the client is still sending.
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                with cur.copy("copy pgw_copy from stdin") as copy:
                    copy.write(b"1\tok\nnot-a-number\tbad\n" + b"2\tok\n" * 5000)
            # The client gives up (CopyFail): the server answers 57014.
            with pytest.raises(psycopg.errors.QueryCanceled):
                with cur.copy("copy pgw_copy from stdin") as copy:
                    copy.write_row((5, "never"))
                    raise psycopg.errors.QueryCanceled("client aborts")
        assert conn.execute("select count(*), sum(id) from pgw_copy").fetchone() == (1000, sum(range(1000)))
        with conn.cursor() as cur:
            with cur.copy("copy (select id from pgw_copy where id < 3 order by id) to stdout") as copy:
                assert b"".join(bytes(chunk) for chunk in copy) == b"0\n1\n2\n"


def test_function_call_via_psycopg2_large_objects(proxy, pg_server):
    """libpq's lo_* functions (psycopg2's lobject) use the FunctionCall message."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    conn = proxy.connect2()
    try:
        lob = conn.lobject(0, "wb")
        oid = lob.oid
        assert lob.write(payload) == len(payload)
        lob.close()
        conn.commit()
        lob = conn.lobject(oid, "rb")
        lob.seek(1024 * 1024)
        assert lob.read(10) == payload[1024 * 1024:1024 * 1024 + 10]
        lob.seek(0)
        assert lob.read() == payload
        lob.close()
        conn.commit()
        # A FunctionCall that fails leaves a normal aborted transaction behind.
        import psycopg2
        with pytest.raises(psycopg2.OperationalError):
            conn.lobject(2**31 - 5, "rb")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert pg_server.query_one("select md5(lo_get(%s))", (oid,)) == hashlib.md5(payload).hexdigest()
    pg_server.query_one("select lo_unlink(%s)", (oid,))


def test_function_call_message(proxy):
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.startup("postgres").error is None
        raw.query("select 'int4pl'::regproc::oid")
        messages = raw.read_until("Z")
        function_oid = int(pgwire.data_row_values(next(b for k, b in messages if k == "D"))[0])
        raw.function_call(function_oid, (b"\x00\x00\x00\x28", b"\x00\x00\x00\x02"))
        messages = raw.read_until("Z")
        assert [k for k, _ in messages] == ["V", "Z"]
        assert messages[0][1] == b"\x00\x00\x00\x04\x00\x00\x00\x2a"  # length 4, value 42
        raw.function_call(function_oid, (b"\x7f\xff\xff\xff", b"\x00\x00\x00\x01"))
        messages = raw.read_until("Z")
        assert [k for k, _ in messages] == ["E", "Z"]
        assert pgwire.error_fields(messages[0][1])["C"] == "22003"  # integer out of range


def test_portal_suspension_and_describe(proxy):
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.startup("postgres").error is None
        raw.parse("pgw_stmt", "select g from generate_series(1, $1::int) g", (23,))
        raw.describe("S", "pgw_stmt")
        raw.bind("pgw_portal", "pgw_stmt", (b"10",))
        raw.describe("P", "pgw_portal")
        raw.execute("pgw_portal", 3)
        raw.execute("pgw_portal", 3)
        raw.execute("pgw_portal", 0)
        raw.close_object("P", "pgw_portal")
        raw.close_object("S", "pgw_stmt")
        raw.sync()
        messages = raw.read_until("Z")
    kinds = "".join(k for k, _ in messages)
    assert kinds == "1tT2T" + "DDDs" + "DDDs" + "DDDDC" + "33Z"
    values = [int(pgwire.data_row_values(b)[0]) for k, b in messages if k == "D"]
    assert values == list(range(1, 11))


def test_flush_gets_answers_before_sync(proxy):
    with pgwire.RawConnection(proxy.host, proxy.port, timeout=5) as raw:
        assert raw.startup("postgres").error is None
        raw.parse("", "select 41 + 1")
        raw.flush()
        assert raw.read_message()[0] == "1"  # times out if the Flush was held back
        raw.bind("", "")
        raw.execute("")
        raw.flush()
        kinds = [raw.read_message() for _ in range(3)]
        assert [k for k, _ in kinds] == ["2", "D", "C"]
        assert pgwire.data_row_values(kinds[1][1]) == [b"42"]
        raw.sync()
        assert raw.read_message() == ("Z", b"I")


def test_extended_batch_error_skips_to_sync(proxy, pg_server):
    pg_server.query_one("create table if not exists pgw_batch (id int)")
    pg_server.query_one("truncate pgw_batch")
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.startup("postgres").error is None
        raw.parse("", "insert into pgw_batch values (1)")
        raw.bind("", "")
        raw.execute("")
        raw.parse("", "selec broken")
        raw.bind("", "")
        raw.execute("")
        raw.sync()
        messages = raw.read_until("Z")
        assert "".join(k for k, _ in messages) == "12CEZ"
        assert pgwire.error_fields(messages[3][1])["C"] == "42601"
        raw.query("select count(*) from pgw_batch")
        messages = raw.read_until("Z")
        assert pgwire.data_row_values(next(b for k, b in messages if k == "D")) == [b"0"]


@pytest.mark.proxy_only
def test_gssenc_request_is_declined(proxy):
    # (PostgreSQL itself, built with GSSAPI, answers 'G'; pgwarden must answer 'N'.)
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.request_gssenc() == b"N"
        result = raw.startup("postgres")
        assert result.error is None
        raw.query("select 1")
        assert [k for k, _ in raw.read_until("Z")] == ["T", "D", "C", "Z"]


@pytest.mark.proxy_only
def test_ssl_request_declined_when_client_tls_is_off(proxy):
    # (The test server itself has TLS on, so this only holds for a pgwarden without [tls].)
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.request_ssl() == b"N"
        assert raw.startup("postgres").error is None


def test_large_rows_and_many_small_ones(proxy):
    with proxy.connect() as conn:
        big = conn.execute("select repeat('ab', 8 * 1024 * 1024)").fetchone()[0]
        assert len(big) == 16 * 1024 * 1024 and big[:4] == "abab"
        echoed = conn.execute("select length(%s::text)", ("x" * (5 * 1024 * 1024),)).fetchone()[0]
        assert echoed == 5 * 1024 * 1024
        rows = conn.execute("select g from generate_series(1, 200000) g").fetchall()
        assert len(rows) == 200000 and rows[-1] == (200000,)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_client_name_follows_set_rollback_and_set_local(pgwarden_factory, protocol):
    """pgwarden keeps the client name of statements without tags from one statement to the
    next while the session's identity stays the same: every SET, ROLLBACK and end of a
    SET LOCAL must show in the next statement's client label."""
    if harness.direct_mode():
        pytest.skip("reads pgwarden's metrics")
    from nesting_util import metric
    proxy = pgwarden_factory('[identity]\nsources = ["setting:pgwarden.client", "application_name"]\n')
    steps = [
        ("select 1", "namer"),
        ("set pgwarden.client = 'a'", None),
        ("select 1", "a"),
        ("begin", None),
        ("set pgwarden.client = 'b'", None),
        ("select 1", "b"),
        ("rollback", None),
        ("select 1", "a"),
        ("begin", None),
        ("set local pgwarden.client = 'c'", None),
        ("select 1", "c"),
        ("commit", None),
        ("select 1", "a"),
        ("reset pgwarden.client", None),
        ("select 1", "namer"),
    ]
    expected: dict[str, int] = {}
    with pgwire.RawConnection(proxy.host, proxy.port) as raw:
        assert raw.startup("postgres", application_name="namer").error is None
        for sql, client in steps:
            if protocol == "simple":
                raw.query(sql)
            else:
                raw.parse("", sql)
                raw.bind("", "")
                raw.execute()
                raw.sync()
            answers = raw.read_until("Z")
            assert [t for t, _ in answers if t == "E"] == [], (sql, answers)
            if client:
                expected[client] = expected.get(client, 0) + 1
    assert expected == {"namer": 2, "a": 3, "b": 1, "c": 1}
    for client, count in expected.items():
        assert metric(proxy, "pgwarden_statements_total", kind="select", client=client) == count, client


def epoll_watched_descriptors(pid: int) -> int:
    """Descriptors registered in all of a process's epoll sets, from /proc/<pid>/fdinfo."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                total += sum(1 for line in info if line.startswith("tfd:"))
        except FileNotFoundError:
            continue
    return total


def test_relay_runs_on_the_configured_io_path(pgwarden_factory):
    # By default the relay's sockets leave Asio's epoll set for the worker's io_uring; with
    # io_uring = false (PGWARDEN_TEST_IO=epoll) they stay in it. Either way the sessions work.
    proxy = pgwarden_factory("[proxy]\nthreads = 1\n")
    listening = nesting_util.log_events(proxy, "listening")
    assert listening and listening[-1]["io"] == harness.io_mode(), listening
    before = epoll_watched_descriptors(proxy.pid)
    sessions = [proxy.connect(application_name=f"pgw_io_{i}") for i in range(8)]
    try:
        for i, conn in enumerate(sessions):
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        grown = epoll_watched_descriptors(proxy.pid) - before
        if harness.io_mode() == "io_uring":
            assert grown == 0, f"{grown} relay sockets still in an epoll set"
            fds = [os.readlink(f"/proc/{proxy.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proxy.pid}/fd")]
            assert "anon_inode:[io_uring]" in fds, fds
        else:
            # Two per session; the readiness probe's session may still be leaving the set.
            assert grown >= len(sessions), f"only {grown} descriptors joined the epoll sets"
    finally:
        for conn in sessions:
            conn.close()
