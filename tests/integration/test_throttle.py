# Write throttling ([[throttle]]) through a real pgwarden with real clients: the admitted
# rate, rejections, separate and shared buckets, client identity, penalties, row cost,
# transaction blocks, pipelines, multi-statement Queries, reloads and clients that leave.
from __future__ import annotations

import json
import signal
import threading
import time

import psycopg
import psycopg.errors
import pytest

import harness
import pgwire
from interception_util import read_until_ready, summary
from throttle_util import (REJECT_MESSAGE, REJECT_SQLSTATE, admin_post, bucket_levels, committed_ids,
                           create_table, expect_rejection, metric, metric_label_values, metric_samples,
                           throttle_rule, throttles, wait_for_metric)

pytestmark = pytest.mark.proxy_only

IDLE = psycopg.pq.TransactionStatus.IDLE
INERROR = psycopg.pq.TransactionStatus.INERROR
DELAYED = "pgwarden_throttle_delayed_total"
REJECTED = "pgwarden_throttle_rejected_total"
DELAY_SECONDS_COUNT = "pgwarden_throttle_delay_seconds_count"
# A rate so slow that no token comes back while a test runs: bucket levels are exact.
NO_REFILL = 0.001


def insert(conn: psycopg.Connection, table: str, ident: int, who: str = "x") -> None:
    conn.execute(f"insert into {table} values ({ident}, '{who}')")


def tenant(proxy: harness.Pgwarden, name: str, **kw) -> psycopg.Connection:
    """A connection whose client name comes from application_name."""
    return proxy.connect(application_name=name, **kw)


# ---------------------------------------------------------------------------------------------
# Rate


def test_delayed_writes_hold_rate_times_duration_plus_burst(pgwarden_factory, pg_server):
    rate, burst = 20, 5
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=rate, burst=burst,
                                           action="delay", max_delay="2s"))
    create_table(pg_server, "thr_rate")
    # A 10 s run (5 s under the sanitizers, which still resolves 3%: three of 100 slots of
    # 50 ms, where timing noise is milliseconds).
    total = burst + rate * harness.scaled(10, 5)
    connections = [tenant(proxy, "tenant:1") for _ in range(2)]  # two writers keep the bucket saturated
    next_id = iter(range(total))
    lock = threading.Lock()
    finished: list[float] = []
    errors: list[BaseException] = []

    def writer(conn: psycopg.Connection) -> None:
        try:
            while True:
                with lock:
                    ident = next(next_id, None)
                if ident is None:
                    return
                insert(conn, "thr_rate", ident)
                finished.append(time.monotonic())
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in connections]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    elapsed = max(finished) - start

    # The last write may start exactly (total - burst) / rate after the first one, never sooner.
    assert elapsed >= (total - burst) / rate
    expected = rate * elapsed + burst
    assert abs(total - expected) <= 0.03 * expected, f"{total} writes in {elapsed:.3f}s; expected {expected:.1f}"
    assert len(committed_ids(pg_server, "thr_rate")) == total
    # Everything after the burst waited for its slot.
    assert metric(proxy, DELAYED, rule="tenant-writes", client="tenant:1") == total - burst
    assert metric(proxy, DELAY_SECONDS_COUNT, rule="tenant-writes") == total - burst
    assert metric(proxy, REJECTED, rule="tenant-writes") == 0
    for conn in connections:
        conn.close()


def test_rejected_writes_carry_53400_and_commit_nothing(pgwarden_factory, pg_server):
    interval_ms = 2000
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=1000 / interval_ms,
                                           burst=3, action="reject"))
    create_table(pg_server, "thr_reject")
    conn = tenant(proxy, "tenant:1")
    first = time.monotonic()
    for ident in (1, 2, 3):
        insert(conn, "thr_reject", ident)

    rejections = [
        expect_rejection(lambda: conn.execute("insert into thr_reject values (4, 'x'), (5, 'x')")),
        expect_rejection(lambda: conn.execute("insert into thr_reject values (%s, 'x')", (6,))),  # extended protocol
        expect_rejection(lambda: insert(conn, "thr_reject", 7)),
    ]
    waited_ms = (time.monotonic() - first) * 1000
    for rejection in rejections:
        rejection.assert_rate_limited("tenant-writes", "tenant:1")
        # The next token is due one interval after the first write.
        assert interval_ms - waited_ms - 1 <= rejection.retry_after_ms <= interval_ms, rejection
    assert conn.info.transaction_status == IDLE
    assert conn.execute("select count(*) from thr_reject").fetchone() == (3,)  # reads still go
    assert committed_ids(pg_server, "thr_reject") == [1, 2, 3]
    assert metric(proxy, REJECTED, rule="tenant-writes", client="tenant:1") == 3
    assert metric(proxy, DELAYED, rule="tenant-writes") == 0
    conn.close()


def test_delay_beyond_max_delay_is_rejected_at_once_with_a_retry_hint(pgwarden_factory, pg_server):
    # One token a second: the second write would wait about 1 s, more than max_delay allows.
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=1, burst=1,
                                           action="delay", max_delay="600ms"))
    create_table(pg_server, "thr_max_delay")
    with tenant(proxy, "tenant:1") as conn:
        insert(conn, "thr_max_delay", 1)
        started = time.monotonic()
        rejection = expect_rejection(lambda: insert(conn, "thr_max_delay", 2))
        took = time.monotonic() - started
        rejection.assert_rate_limited("tenant-writes", "tenant:1")
        # Refused on arrival, not after sitting out max_delay; the hint says when a token is due.
        assert took < 0.5, took
        assert 600 < rejection.retry_after_ms <= 1000, rejection
        assert conn.info.transaction_status == IDLE
    assert committed_ids(pg_server, "thr_max_delay") == [1]
    assert metric(proxy, REJECTED, rule="tenant-writes", client="tenant:1") == 1
    assert metric(proxy, DELAYED, rule="tenant-writes") == 0


def test_rejections_are_logged_with_client_rule_kind_and_statement(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=NO_REFILL, burst=1,
                                           action="reject"))
    create_table(pg_server, "thr_logged")
    with tenant(proxy, "tenant:1") as conn:
        insert(conn, "thr_logged", 1)
        expect_rejection(lambda: insert(conn, "thr_logged", 2))                                      # simple Query
        expect_rejection(lambda: conn.execute("insert into thr_logged values (%s, 'x')", (3,)))  # Execute
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if '"event":"throttle_rejected"' in line]
    assert len(lines) == 2
    for line in lines:
        # SPEC "Operations": every policy decision is logged with client, rule, kind and statement.
        assert (line.get("client"), line.get("rule"), line.get("kind")) == ("tenant:1", "tenant-writes", "insert"), line
        assert "insert into thr_logged" in line.get("statement", ""), line


def test_saturated_client_leaves_other_writers_and_all_readers_at_full_speed(pgwarden_factory, pg_server):
    rate = 50
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=rate, burst=rate,
                                           action="delay", max_delay="5s"))
    create_table(pg_server, "thr_share")
    quiet_writes, reads = 40, 200  # the quiet client stays within its own burst

    def workload(quiet_name: str) -> dict[str, float]:
        with tenant(proxy, quiet_name) as quiet, tenant(proxy, "tenant:hog") as hog_reader:
            start = time.monotonic()
            for i in range(quiet_writes):
                insert(quiet, "thr_share", i, quiet_name)
            writes_done = time.monotonic()
            for _ in range(reads):
                quiet.execute("select count(*) from thr_share").fetchone()
            quiet_reads_done = time.monotonic()
            for _ in range(reads):
                hog_reader.execute("select count(*) from thr_share").fetchone()
            end = time.monotonic()
        return {"quiet writes": writes_done - start, "quiet reads": quiet_reads_done - writes_done,
                "hog reads": end - quiet_reads_done}

    baseline = workload("tenant:quiet-a")

    stop = threading.Event()
    hog_errors: list[BaseException] = []

    def hog(index: int) -> None:
        try:
            with tenant(proxy, "tenant:hog") as conn:
                ident = index * 1_000_000
                while not stop.is_set():
                    insert(conn, "thr_share", ident, "tenant:hog")
                    ident += 1
        except BaseException as e:
            hog_errors.append(e)

    hogs = [threading.Thread(target=hog, args=(i,)) for i in range(2)]
    hog_start = time.monotonic()
    for t in hogs:
        t.start()
    try:
        wait_for_metric(proxy, DELAYED, 5, rule="tenant-writes", client="tenant:hog")
        throttled = workload("tenant:quiet-b")
    finally:
        stop.set()
        for t in hogs:
            t.join(timeout=10)
    hog_elapsed = time.monotonic() - hog_start
    assert not hog_errors, hog_errors

    # The exact check: only the hog was ever delayed (asserted below from the metric). The
    # timing check catches what the metric cannot see, a delay that holds up other sessions
    # (a blocking wait, a shared queue). Such a bug costs far more than the slack allowed
    # here: a quiet write queued behind the two hogs waits about three 20 ms slots (40 writes:
    # 2.4 s), a throttled read one slot or more (200 reads: 4 s). The slack is wide because
    # the suite shares two cores with PostgreSQL and, in CI, an ASan build of pgwarden.
    for what, seconds in throttled.items():
        assert seconds <= max(3 * baseline[what], baseline[what] + 1.2), (what, baseline, throttled)
    assert committed_ids(pg_server, "thr_share", "tenant:quiet-b") == list(range(quiet_writes))
    hog_rows = len(committed_ids(pg_server, "thr_share", "tenant:hog"))
    assert hog_rows <= rate + rate * hog_elapsed + 1, (hog_rows, hog_elapsed)
    assert metric_label_values(proxy, DELAYED, "client") == {"tenant:hog"}
    assert metric(proxy, REJECTED) == 0


# ---------------------------------------------------------------------------------------------
# Identity and bucket scopes


def test_comment_tag_and_setting_select_the_bucket_and_rule_scope_shares_one(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(
        throttle_rule("per-tenant", match={"client": "tenant:*"}, rate=NO_REFILL, burst=3, action="reject")
        + throttle_rule("shared", match={"client": "shared:*"}, rate=NO_REFILL, burst=3, action="reject",
                        bucket="rule"))
    create_table(pg_server, "thr_ident")
    tagged = proxy.connect()  # user postgres, no application_name: untagged, it is "postgres"
    tagged.execute("/* client='tenant:1' */ insert into thr_ident values (1, 'c')")
    # sqlcommenter's own form: at the end, percent-encoded.
    tagged.execute("insert into thr_ident values (2, 'c') /*client='tenant%3A1'*/")
    setting = proxy.connect()
    setting.execute("SET pgwarden.client = 'tenant:2'")
    insert(setting, "thr_ident", 3)
    setting.execute("/* client='tenant:3' */ insert into thr_ident values (4, 'c')")  # the tag comes first
    for ident in (5, 6, 7, 8):
        insert(tagged, "thr_ident", ident)  # untagged: no rule takes "postgres"

    levels = bucket_levels(proxy, "per-tenant")
    assert set(levels) == {"tenant:1", "tenant:2", "tenant:3"}
    assert levels["tenant:1"] == pytest.approx(1, abs=0.01)
    assert levels["tenant:2"] == pytest.approx(2, abs=0.01)
    assert levels["tenant:3"] == pytest.approx(2, abs=0.01)

    tagged.execute("/* client='tenant:1' */ insert into thr_ident values (9, 'c')")
    expect_rejection(lambda: tagged.execute("/* client='tenant:1' */ insert into thr_ident values (10, 'c')")
                     ).assert_rate_limited("per-tenant", "tenant:1")
    insert(setting, "thr_ident", 11)
    insert(setting, "thr_ident", 12)
    expect_rejection(lambda: insert(setting, "thr_ident", 13)).assert_rate_limited("per-tenant", "tenant:2")
    setting.execute("RESET pgwarden.client")
    insert(setting, "thr_ident", 14)  # "postgres" again: not throttled

    # bucket = "rule": two clients draw from one bucket, keyed "".
    with tenant(proxy, "shared:a") as a, tenant(proxy, "shared:b") as b:
        insert(a, "thr_ident", 20)
        insert(b, "thr_ident", 21)
        insert(a, "thr_ident", 22)
        expect_rejection(lambda: insert(b, "thr_ident", 23)).assert_rate_limited("shared", "shared:b")
    shared = throttles(proxy)["shared"]
    assert shared["bucket_count"] == 1 and [bk["key"] for bk in shared["buckets"]] == [""]
    assert shared["buckets"][0]["tokens"] == pytest.approx(0, abs=0.01)

    assert committed_ids(pg_server, "thr_ident") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 20, 21, 22]
    rejected = {(labels["rule"], labels["client"]): value
                for labels, value in metric_samples(proxy, REJECTED) if value}
    assert rejected == {("per-tenant", "tenant:1"): 1, ("per-tenant", "tenant:2"): 1, ("shared", "shared:b"): 1}
    tagged.close()
    setting.close()


# ---------------------------------------------------------------------------------------------
# Penalty and row cost


def test_penalty_rejects_for_its_configured_time_then_admits(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=20, burst=2,
                                           action="reject", penalty="1s"))
    create_table(pg_server, "thr_penalty")
    conn = tenant(proxy, "tenant:1")
    insert(conn, "thr_penalty", 1)
    insert(conn, "thr_penalty", 2)
    sent = time.monotonic()
    first = expect_rejection(lambda: insert(conn, "thr_penalty", 3))
    answered = time.monotonic()
    first.assert_rate_limited("tenant-writes", "tenant:1")
    assert first.hint == "retry after 1000 ms"
    bucket = throttles(proxy)["tenant-writes"]["buckets"][0]
    assert bucket["key"] == "tenant:1" and 0 < bucket["penalty_remaining_ms"] <= 1000

    # 0.7 s on the bucket has refilled (rate 20), but the penalty still holds.
    time.sleep(max(0.0, sent + 0.7 - time.monotonic()))
    probe_sent = time.monotonic()
    during = expect_rejection(lambda: insert(conn, "thr_penalty", 4))
    probe_answered = time.monotonic()
    during.assert_rate_limited("tenant-writes", "tenant:1")
    # The hint is what is left of the penalty, which ends between `sent` + 1 s and `answered` + 1 s.
    assert (sent + 1 - probe_answered) * 1000 - 1 <= during.retry_after_ms <= (answered + 1 - probe_sent) * 1000 + 1

    time.sleep(max(0.0, answered + 1.02 - time.monotonic()))
    insert(conn, "thr_penalty", 5)
    assert committed_ids(pg_server, "thr_penalty") == [1, 2, 5]
    assert metric(proxy, REJECTED, rule="tenant-writes", client="tenant:1") == 2
    conn.close()


def test_row_cost_debits_multi_row_insert_and_copy(pgwarden_factory, pg_server):
    rate = 10
    proxy = pgwarden_factory(
        throttle_rule("rows", match={"client": "tenant:*"}, rate=rate, burst=10, cost="row", action="reject")
        + throttle_rule("rows-delay", match={"client": "slow:*"}, rate=50, burst=5, cost="row", action="delay",
                        max_delay="5s"))
    create_table(pg_server, "thr_rows")

    def assert_debt_then_rejection(conn: psycopg.Connection, client: str, debt: int, sent: float) -> None:
        """The bucket owes `debt` tokens (less what came back since `sent`), and the next write
        is refused until one token is on hand: (debt + 1) / rate after the statement arrived."""
        level = bucket_levels(proxy, "rows")[client]
        assert -debt - 0.01 <= level <= -debt + rate * (time.monotonic() - sent) + 0.01, level
        rejection = expect_rejection(lambda: insert(conn, "thr_rows", 1000, client))
        since_ms = (time.monotonic() - sent) * 1000
        rejection.assert_rate_limited("rows", client)
        due_ms = (debt + 1) * 1000 / rate
        assert due_ms - since_ms - 1 <= rejection.retry_after_ms <= due_ms, (rejection, since_ms)

    # A multi-row INSERT starts on one token and then owes the rest: 10 - 25 = -15.
    with tenant(proxy, "tenant:insert") as conn:
        values = ", ".join(f"({i}, 'tenant:insert')" for i in range(25))
        sent = time.monotonic()
        assert conn.execute(f"insert into thr_rows values {values}").rowcount == 25
        assert_debt_then_rejection(conn, "tenant:insert", 15, sent)

    # COPY FROM (psycopg): 30 rows, 10 - 30 = -20.
    with tenant(proxy, "tenant:copy") as conn:
        with conn.cursor() as cur:
            sent = time.monotonic()
            with cur.copy("copy thr_rows (id, who) from stdin") as copy:
                for i in range(30):
                    copy.write_row((200 + i, "tenant:copy"))
            assert cur.rowcount == 30
        assert_debt_then_rejection(conn, "tenant:copy", 20, sent)

    # psql \copy under a delaying rule: 30 rows at burst 5, so the next write starts 26 slots
    # of 20 ms (0.52 s) after the COPY arrived; measured with the server's clock from before it.
    rows = "".join(f"{400 + i}\tslow:psql\n" for i in range(30))
    script = ("select extract(epoch from clock_timestamp());\n"
              "\\copy thr_rows (id, who) from stdin\n" + rows + "\\.\n"
              "insert into thr_rows values (500, 'slow:psql') returning extract(epoch from clock_timestamp());\n")
    result = harness.psql(proxy, "-q", "-A", "-t", input=script.encode(), env={"PGAPPNAME": "slow:psql"})
    before_copy, insert_ran = (float(line) for line in result.stdout.decode().split())
    assert 0.52 - 0.005 <= insert_ran - before_copy <= 0.52 + 0.3, (before_copy, insert_ran)
    assert metric(proxy, DELAYED, rule="rows-delay", client="slow:psql") == 1

    assert len(committed_ids(pg_server, "thr_rows", "tenant:insert")) == 25
    assert len(committed_ids(pg_server, "thr_rows", "tenant:copy")) == 30
    assert len(committed_ids(pg_server, "thr_rows", "slow:psql")) == 31


# ---------------------------------------------------------------------------------------------
# Interception semantics


BLOCK_RULES = (
    throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=NO_REFILL, burst=2, action="reject")
    + throttle_rule("reader-selects", match={"client": "reader:*"}, statements=["select"], rate=NO_REFILL,
                    burst=1, action="reject"))


def test_rejection_in_a_block_aborts_it_until_rollback(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(BLOCK_RULES)
    create_table(pg_server, "thr_block")
    with tenant(proxy, "tenant:aborted") as conn:
        conn.execute("BEGIN")
        insert(conn, "thr_block", 1)
        insert(conn, "thr_block", 2)
        expect_rejection(lambda: insert(conn, "thr_block", 3)).assert_rate_limited("tenant-writes", "tenant:aborted")
        assert conn.info.transaction_status == INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            insert(conn, "thr_block", 4)
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == IDLE
        assert conn.execute("select 1").fetchone() == (1,)
    assert committed_ids(pg_server, "thr_block") == []
    # The write the server refused with 25P02 was no throttling decision: one rejection.
    assert metric(proxy, REJECTED, rule="tenant-writes", client="tenant:aborted") == 1


def test_writes_in_an_aborted_block_cost_no_tokens(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(BLOCK_RULES)
    create_table(pg_server, "thr_failed")
    with tenant(proxy, "tenant:failed") as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        for ident in (1, 2, 3):  # the server refuses each (25P02): none of them runs
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                insert(conn, "thr_failed", ident)
        conn.execute("ROLLBACK")
        assert bucket_levels(proxy, "tenant-writes").get("tenant:failed", 2) == pytest.approx(2, abs=0.01)
        insert(conn, "thr_failed", 4)
        insert(conn, "thr_failed", 5)
    assert committed_ids(pg_server, "thr_failed") == [4, 5]
    assert metric(proxy, REJECTED) == 0


def test_transaction_ends_and_unlisted_reads_are_never_throttled(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(BLOCK_RULES)
    create_table(pg_server, "thr_ends")
    # The bucket is empty after the second write, yet COMMIT, ROLLBACK and reads go.
    with tenant(proxy, "tenant:committed") as conn:
        conn.execute("BEGIN")
        insert(conn, "thr_ends", 10)
        insert(conn, "thr_ends", 11)
        for _ in range(20):
            assert conn.execute("select count(*) from thr_ends").fetchone() == (2,)
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute("select 1")
        conn.execute("ROLLBACK")
        conn.execute("START TRANSACTION")
        conn.execute("SAVEPOINT s")
        conn.execute("RELEASE SAVEPOINT s")
        conn.execute("END")
    assert committed_ids(pg_server, "thr_ends") == [10, 11]

    # Reads count only where a rule lists them.
    with tenant(proxy, "reader:1") as conn:
        conn.execute("select 1")
        expect_rejection(lambda: conn.execute("select 1")).assert_rate_limited("reader-selects", "reader:1")
        for ident in (20, 21, 22):
            insert(conn, "thr_ends", ident)  # no rule counts this client's writes
    assert committed_ids(pg_server, "thr_ends") == [10, 11, 20, 21, 22]
    assert metric(proxy, REJECTED) == 1


def test_transaction_ends_cannot_be_listed(tmp_path):
    config = tmp_path / "pgwarden.toml"
    config.write_text(throttle_rule("ends", statements=["insert", "commit"], rate=1))
    result = harness.run([str(harness.pgwarden_binary()), "--check", "-c", str(config)])
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 1, output
    assert "COMMIT and ROLLBACK are never throttled" in output


def fetch_outcome(cur: psycopg.Cursor) -> object:
    """A pipelined cursor's row, or the name of the exception fetching it raises."""
    try:
        return cur.fetchone()
    except psycopg.Error as e:
        return type(e).__name__


def test_rejection_in_a_pipeline_skips_the_batch_and_commits_none_of_it(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(
        throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=NO_REFILL, burst=2, action="reject")
        + throttle_rule("slow-writes", match={"client": "slow:*"}, rate=20, burst=1, action="delay",
                        max_delay="2s"))
    create_table(pg_server, "thr_pipe")
    sql = "insert into thr_pipe values (%s, 'p') returning id"

    with tenant(proxy, "tenant:pipe") as conn:
        cursors = []
        with pytest.raises(psycopg.errors.DatabaseError) as failure:
            with conn.pipeline():
                for ident in (1, 2, 3, 4):
                    cursors.append(conn.cursor())
                    cursors[-1].execute(sql, (ident,))
        assert (failure.value.sqlstate, failure.value.diag.message_primary) == (REJECT_SQLSTATE, REJECT_MESSAGE)
        # What PostgreSQL's own error in third place gives psycopg: results before it, none after.
        assert [fetch_outcome(c) for c in cursors] == [(1,), (2,), "ProgrammingError", "ProgrammingError"]
        assert conn.info.transaction_status == IDLE
        # The first two ran, in the implicit transaction that the rejection rolled back.
        assert committed_ids(pg_server, "thr_pipe") == []
        assert conn.execute("select 1").fetchone() == (1,)

    # The same on the wire: the rest of the batch is skipped until Sync.
    raw = pgwire.RawConnection(proxy.host, proxy.port, timeout=10)
    assert raw.startup("postgres", application_name="tenant:raw").error is None
    for ident in (5, 6, 7, 8):
        raw.parse("", f"insert into thr_pipe values ({ident}, 'raw')")
        raw.bind("", "")
        raw.execute("")
    raw.sync()
    messages = read_until_ready(raw)
    assert summary(messages) == ["1", "2", "C", "1", "2", "C", "1", "2", "E:53400", "Z:I"]
    assert messages[-2].error()["M"] == REJECT_MESSAGE
    raw.query("select 1")
    assert summary(read_until_ready(raw)) == ["T", "D*1", "C", "Z:I"]
    raw.close()
    assert committed_ids(pg_server, "thr_pipe") == []

    # Delayed Executes in a pipeline keep their order and all commit.
    with tenant(proxy, "slow:pipe") as conn:
        start = time.monotonic()
        with conn.pipeline():
            cursors = [conn.cursor() for _ in range(4)]
            for ident, cur in zip((11, 12, 13, 14), cursors):
                cur.execute(sql, (ident,))
        elapsed = time.monotonic() - start
        assert [cur.fetchone() for cur in cursors] == [(11,), (12,), (13,), (14,)]
    assert elapsed >= 3 / 20
    assert committed_ids(pg_server, "thr_pipe") == [11, 12, 13, 14]
    assert metric(proxy, DELAYED, rule="slow-writes", client="slow:pipe") == 3
    # One rejection per batch: the Executes the server skips after it are no decisions.
    assert metric(proxy, REJECTED, rule="tenant-writes") == 2


def test_multi_statement_query_is_admitted_or_rejected_whole(pgwarden_factory, pg_server):
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=NO_REFILL, burst=3,
                                           action="reject"))
    create_table(pg_server, "thr_multi")
    conn = tenant(proxy, "tenant:multi")
    insert(conn, "thr_multi", 1)  # two tokens left
    three = "; ".join(f"insert into thr_multi values ({i}, 'm')" for i in (2, 3, 4))
    expect_rejection(lambda: conn.execute(three)).assert_rate_limited("tenant-writes", "tenant:multi")
    assert conn.info.transaction_status == IDLE
    assert committed_ids(pg_server, "thr_multi") == [1]
    assert bucket_levels(proxy, "tenant-writes")["tenant:multi"] == pytest.approx(2, abs=0.01)  # nothing kept

    conn.execute("insert into thr_multi values (5, 'm'); select 1; insert into thr_multi values (6, 'm')")
    assert committed_ids(pg_server, "thr_multi") == [1, 5, 6]
    assert bucket_levels(proxy, "tenant-writes")["tenant:multi"] == pytest.approx(0, abs=0.01)
    reads = conn.execute("select 1; select count(*) from thr_multi")  # reads only: no token needed
    assert reads.nextset() and reads.fetchone() == (3,)
    assert metric(proxy, REJECTED, rule="tenant-writes", client="tenant:multi") == 1
    conn.close()

    # More writes than the burst: admitted whole on a full bucket, which is then in debt
    # (throttle.hpp: a cost above the burst waits for a full bucket).
    with tenant(proxy, "tenant:big") as big:
        big.execute("; ".join(f"insert into thr_multi values ({i}, 'big')" for i in (10, 11, 12, 13)))
        assert bucket_levels(proxy, "tenant-writes")["tenant:big"] == pytest.approx(-1, abs=0.01)
        expect_rejection(lambda: insert(big, "thr_multi", 14)).assert_rate_limited("tenant-writes", "tenant:big")
    assert committed_ids(pg_server, "thr_multi", "big") == [10, 11, 12, 13]


# ---------------------------------------------------------------------------------------------
# Reload and clients that leave


def test_reload_keeps_buckets_of_unchanged_rules_and_frees_waiters_of_removed_ones(pgwarden_factory, pg_server):
    keep = throttle_rule("keep", match={"client": "tenant:*"}, rate=NO_REFILL, burst=3, action="reject")
    gone = throttle_rule("gone", match={"client": "slow:*"}, rate=0.1, burst=1, action="delay", max_delay="30s")
    proxy = pgwarden_factory(keep + gone)
    create_table(pg_server, "thr_reload")

    drained = tenant(proxy, "tenant:1")
    for ident in (1, 2, 3):
        insert(drained, "thr_reload", ident)
    expect_rejection(lambda: insert(drained, "thr_reload", 4)).assert_rate_limited("keep", "tenant:1")

    slow = tenant(proxy, "slow:1")
    insert(slow, "thr_reload", 10)
    waiter_done: list[float] = []
    waiter_errors: list[BaseException] = []

    def waiter() -> None:
        try:
            insert(slow, "thr_reload", 11)  # its slot is 10 s away
            waiter_done.append(time.monotonic())
        except BaseException as e:
            waiter_errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for_metric(proxy, DELAYED, 1, rule="gone", client="slow:1")

    proxy.config_path.write_text(keep + throttle_rule("new", match={"client": "other:*"}, rate=1))
    reloaded = time.monotonic()
    assert admin_post(proxy, "/api/reload")["ok"] is True
    thread.join(timeout=5)
    assert not thread.is_alive() and not waiter_errors, waiter_errors
    assert waiter_done[0] - reloaded < 1.0  # not the 10 s its slot was away

    assert set(throttles(proxy)) == {"keep", "new"}
    assert bucket_levels(proxy, "keep")["tenant:1"] == pytest.approx(0, abs=0.01)
    expect_rejection(lambda: insert(drained, "thr_reload", 5)).assert_rate_limited("keep", "tenant:1")

    # SIGHUP, and a rule under a new name starts with full buckets.
    proxy.config_path.write_text(keep.replace('"keep"', '"kept-renamed"'))
    proxy.signal(signal.SIGHUP)
    wait_for_metric(proxy, "pgwarden_config_reloads_total", 2, result="success")
    insert(drained, "thr_reload", 6)
    assert bucket_levels(proxy, "kept-renamed")["tenant:1"] == pytest.approx(2, abs=0.01)
    assert committed_ids(pg_server, "thr_reload") == [1, 2, 3, 6, 10, 11]
    drained.close()
    slow.close()


def test_client_that_hangs_up_while_delayed_gives_its_slot_back(pgwarden_factory, pg_server):
    interval = 2.0
    proxy = pgwarden_factory(throttle_rule("tenant-writes", match={"client": "tenant:*"}, rate=1 / interval, burst=1,
                                           action="delay", max_delay="10s"))
    create_table(pg_server, "thr_leave")
    first = tenant(proxy, "tenant:1")
    first_sent = time.monotonic()
    insert(first, "thr_leave", 1)  # takes the only token; the next slot is `interval` away

    leaver = pgwire.RawConnection(proxy.host, proxy.port, timeout=10)
    assert leaver.startup("postgres", application_name="tenant:1").error is None
    leaver.query("insert into thr_leave values (2, 'x')")
    wait_for_metric(proxy, DELAYED, 1, rule="tenant-writes", client="tenant:1")
    leaver.close()  # no Terminate: the client is simply gone
    harness.wait_until(lambda: '"event":"throttle_waiter_left"' in proxy.log_text(), 5, "throttle_waiter_left")

    insert(first, "thr_leave", 3)  # the slot the leaver had, not the one after it
    done = time.monotonic() - first_sent
    assert interval <= done < 2 * interval - 0.5, done
    assert committed_ids(pg_server, "thr_leave") == [1, 3]
    first.close()
