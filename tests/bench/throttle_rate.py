"""Throttle rate precision: how close pgwarden's admitted write rate comes to rate x time + burst.

Starts a throwaway PostgreSQL 15 and a pgwarden in front of it (with tests/integration's
harness), then lets clients write as fast as they can for --seconds per run, in these cases:

    delay, 1 client       one connection, a delay rule (bucket per client)
    delay, 8 clients      eight connections sharing one bucket (bucket = "rule")
    row cost, 1 client    multi-row INSERTs (--rows-per-insert rows each) under a row-cost rule
    reject, 1 client      a reject rule on another client: refused writes commit nothing

The truth is the number of rows committed in the run (counted on the server itself). The
expectation is rate x elapsed + burst, elapsed running from the first write sent to the
last one answered (for the reject case: to the last attempt). Each case prints every run
and the median error over --repeat runs, and pgwarden's own pgwarden_throttle_* figures for
the run as a cross-check. Target: |error| under 1%.

Usage (as root, like the integration tests; the server runs as `pgwarden-test`):

    PGWARDEN_BIN=build/proxy/pgwarden /usr/bin/python3 tests/bench/throttle_rate.py
    PGWARDEN_BIN=build/proxy/pgwarden /usr/bin/python3 tests/bench/throttle_rate.py --seconds 5 --repeat 1
    ... --only "delay, 8 clients" --rate 500 --burst 50

Use a Release or RelWithDebInfo build; a sanitizer build measures the sanitizers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import psycopg  # noqa: E402

import harness  # noqa: E402
from throttle_util import REJECT_SQLSTATE, metric, throttle_rule, throttles  # noqa: E402

TABLE = "bench_rows"


@dataclass
class Case:
    name: str
    rule: str
    clients: int
    rows_per_insert: int   # 1: single-row INSERTs
    per_run_client: bool   # a fresh client name (so a fresh, full bucket) for every run
    rejects: bool          # refused writes are expected (the reject rule)


@dataclass
class Run:
    rows: int
    elapsed: float
    expected: float
    statements: int = 0
    rejected_seen: int = 0
    errors: list[str] = field(default_factory=list)
    delayed: float = 0          # pgwarden's counters, this run's increase
    rejected: float = 0
    delay_count: float = 0
    delay_sum: float = 0

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.rows - self.expected) / self.expected


def config(rate: float, burst: int, rows_per_insert: int) -> str:
    """One rule per case, each matching its own application_name."""
    row_rate = rate * rows_per_insert
    return (
        throttle_rule("delay-client", match={"application_name": "bench-delay-*"}, rate=rate, burst=burst,
                      bucket="client", action="delay", max_delay="5s")
        + throttle_rule("delay-shared", match={"application_name": "bench-shared"}, rate=rate, burst=burst,
                        bucket="rule", action="delay", max_delay="5s")
        + throttle_rule("rows", match={"application_name": "bench-rows-*"}, rate=row_rate,
                        burst=burst * rows_per_insert, cost="row", bucket="client", action="delay", max_delay="5s")
        + throttle_rule("reject-client", match={"application_name": "bench-reject-*"}, rate=rate, burst=burst,
                        bucket="client", action="reject")
    )


CASES = [
    Case("delay, 1 client", "delay-client", 1, 1, True, False),
    Case("delay, 8 clients", "delay-shared", 8, 1, False, False),
    Case("row cost, 1 client", "rows", 1, 0, True, False),  # rows_per_insert from --rows-per-insert
    Case("reject, 1 client", "reject-client", 1, 1, True, True),
]


def rule_fields(proxy: harness.Pgwarden, rule: str) -> dict[str, float]:
    return {
        "delayed": metric(proxy, "pgwarden_throttle_delayed_total", rule=rule),
        "rejected": metric(proxy, "pgwarden_throttle_rejected_total", rule=rule),
        "delay_count": metric(proxy, "pgwarden_throttle_delay_seconds_count", rule=rule),
        "delay_sum": metric(proxy, "pgwarden_throttle_delay_seconds_sum", rule=rule),
    }


def wait_for_full_bucket(proxy: harness.Pgwarden, rule: str, timeout: float = 30) -> None:
    """A shared bucket outlives a run: start the next one only when it has refilled."""
    def full() -> bool:
        info = throttles(proxy)[rule]
        return all(b["tokens"] >= info["burst"] - 1e-6 for b in info["buckets"])
    harness.wait_until(full, timeout, f"the bucket of {rule} to refill", interval=0.05)


def run_case(case: Case, proxy: harness.Pgwarden, server: harness.PostgresServer, rate: float, burst: int,
             seconds: float, run_id: str) -> Run:
    application_name = {
        "delay-client": f"bench-delay-{run_id}",
        "delay-shared": "bench-shared",
        "rows": f"bench-rows-{run_id}",
        "reject-client": f"bench-reject-{run_id}",
    }[case.rule]
    if not case.per_run_client:
        wait_for_full_bucket(proxy, case.rule)
    connections = [proxy.connect(application_name=application_name) for _ in range(case.clients)]
    values = ", ".join(["(%s, %s, %s)"] * case.rows_per_insert)
    sql = f"INSERT INTO {TABLE} (run, client, n) VALUES {values}"
    start = threading.Barrier(case.clients + 1)
    first_sent: list[float] = []
    last_done: list[float] = []
    statements = [0] * case.clients
    rejected = [0] * case.clients
    errors: list[str] = []
    deadline = 0.0

    def client(index: int, conn: psycopg.Connection) -> None:
        n = 0
        first = last = None
        try:
            start.wait(30)
            while time.monotonic() < deadline:
                params = []
                for _ in range(case.rows_per_insert):
                    params += [run_id, index, n]
                    n += 1
                sent = time.monotonic()
                first = first if first is not None else sent
                try:
                    conn.execute(sql, params)
                except psycopg.Error as e:
                    if not (case.rejects and e.sqlstate == REJECT_SQLSTATE):
                        raise
                    rejected[index] += 1
                last = time.monotonic()
                statements[index] += 1
        except BaseException as e:  # reported with the run
            errors.append(f"client {index}: {type(e).__name__}: {e}")
        if first is not None:
            first_sent.append(first)
            last_done.append(last)

    before = rule_fields(proxy, case.rule)
    threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(connections)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    start.wait(30)
    for t in threads:
        t.join(seconds + 60)
    for conn in connections:
        conn.close()
    after = rule_fields(proxy, case.rule)

    rows = server.query_one(f"SELECT count(*) FROM {TABLE} WHERE run = %s", (run_id,))
    elapsed = max(last_done) - min(first_sent) if first_sent else 0.0
    unit_burst = burst * case.rows_per_insert
    expected = rate * case.rows_per_insert * elapsed + unit_burst
    result = Run(rows=rows, elapsed=elapsed, expected=expected, statements=sum(statements),
                 rejected_seen=sum(rejected), errors=errors)
    result.delayed = after["delayed"] - before["delayed"]
    result.rejected = after["rejected"] - before["rejected"]
    result.delay_count = after["delay_count"] - before["delay_count"]
    result.delay_sum = after["delay_sum"] - before["delay_sum"]
    return result


def describe(case: Case, run: Run, burst: int) -> str:
    line = (f"  rows {run.rows:7d}  expected {run.expected:10.1f}  error {run.error_pct:+7.3f}%  "
            f"elapsed {run.elapsed:7.3f}s  statements {run.statements}")
    if case.rejects:
        line += (f"\n    pgwarden: rejected {run.rejected:.0f} (clients saw {run.rejected_seen}), "
                 f"admitted {run.statements - run.rejected_seen}")
    else:
        beyond = run.statements - burst  # the burst's statements are admitted without waiting
        mean_ms = 1000 * run.delay_sum / run.delay_count if run.delay_count else 0.0
        line += (f"\n    pgwarden: delayed {run.delayed:.0f} (statements beyond the burst: {beyond}), "
                 f"delay histogram count {run.delay_count:.0f}, mean delay {mean_ms:.2f} ms, "
                 f"rejected {run.rejected:.0f}")
    for e in run.errors[:3]:
        line += f"\n    ERROR {e}"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="length of each run (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported (default 3)")
    parser.add_argument("--rate", type=float, default=200, help="statements a second (default 200)")
    parser.add_argument("--burst", type=int, default=20, help="bucket size in statements (default 20)")
    parser.add_argument("--rows-per-insert", type=int, default=10, help="rows per INSERT in the row-cost case")
    parser.add_argument("--only", action="append", help="run only this case (repeatable)")
    args = parser.parse_args()

    # As in the integration suite: a developer's PG* variables would change what libpq does.
    for name in [n for n in os.environ if n.startswith("PG") and not n.startswith("PGWARDEN_")]:
        del os.environ[name]
    cases = [c if c.rows_per_insert else Case(c.name, c.rule, c.clients, args.rows_per_insert, c.per_run_client,
                                              c.rejects) for c in CASES]
    if args.only:
        unknown = set(args.only) - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; cases: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.only]

    binary = harness.pgwarden_binary()
    print(f"pgwarden {binary}; rate {args.rate:g}/s, burst {args.burst}, {args.seconds:g}s runs, "
          f"median of {args.repeat}", flush=True)
    server = harness.PostgresServer()
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    proxy = None
    failed = False
    try:
        server.start()
        with server.connect() as conn:
            conn.execute(f"CREATE TABLE {TABLE} (run text NOT NULL, client int NOT NULL, n int NOT NULL)")
        proxy = harness.Pgwarden(workdir, server.port, config(args.rate, args.burst, args.rows_per_insert))
        proxy.start()
        summary = []
        for case in cases:
            print(f"\n{case.name} (rule {case.rule})", flush=True)
            runs = []
            for i in range(args.repeat):
                run = run_case(case, proxy, server, args.rate, args.burst, args.seconds,
                               f"{case.rule}-{i}-{time.monotonic_ns()}")
                runs.append(run)
                failed = failed or bool(run.errors)
                print(describe(case, run, args.burst), flush=True)
            median = statistics.median(r.error_pct for r in runs)
            summary.append((case, median, runs))
        print("\nsummary (median over runs; target |error| < 1%)")
        print(f"  {'case':22s} {'unit':10s} {'rate':>8s} {'burst':>6s} {'achieved':>9s} {'expected':>10s} "
              f"{'error':>8s}")
        for case, median, runs in summary:
            mid = sorted(runs, key=lambda r: r.error_pct)[len(runs) // 2]
            unit = "rows" if case.rows_per_insert > 1 else "statements"
            print(f"  {case.name:22s} {unit:10s} {args.rate * case.rows_per_insert:8g} "
                  f"{args.burst * case.rows_per_insert:6d} {mid.rows:9d} {mid.expected:10.1f} {median:+7.3f}%")
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
