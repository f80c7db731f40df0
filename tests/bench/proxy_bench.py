"""Proxy benchmark: pgwarden against PostgreSQL itself and PgBouncer (issue 7). Prints figures.

Starts a throwaway PostgreSQL 15 (with tests/integration's harness: the server runs as the
unprivileged `pgwarden-test` when started as root), loads `pgbench -i -s 10`, then starts
PgBouncer (session mode) and pgwarden twice (no policies; the policy set below) in front of
it and runs pgbench against every target, interleaved round by round (the order of the
targets rotates each round, so drift on this shared machine spreads over all of them).

Sections (--only, comma-separated; default all):

    throughput  -c 16 -j 2: `-S -M simple`, `-S -M prepared`, the TPC-B-like mix
                (-M extended), a pipeline of 5 SELECTs per transaction (\\startpipeline,
                -M extended), and a SELECT of 500 rows (about 50 KB) per transaction
                (-M prepared), against direct / pgbouncer / pgwarden / pgwarden-epoll
                ([proxy] io_uring = false; --no-epoll-target leaves it out) / pgwarden+pol
    latency     -c 1 -j 1 -S (simple, prepared) with per-transaction logs: p50 and p99, and
                what each proxy adds over direct
    threads     pgwarden with [proxy] threads = 1 and 2 on `-S -M simple -c 16`
    memory      VmRSS of a fresh proxy before and with N idle sessions (100, 1000): psycopg
                connections that each ran `select 1` once; (RSS_N - RSS_0) / N

Every target runs the same custom scripts (the SQL of pgbench's builtin -S and TPC-B-like
scripts); for pgwarden+pol each statement also carries a sqlcommenter tag
`/* client='bench' */`, which names the client there. Before the first round the script
proves the tag reaches pgwarden (its /metrics counts statements of client "bench").

The policy set (pgwarden+pol): 10 [[throttle]] rules matching every client, counting
SELECTs and writes, with rates no workload reaches (bucket per client, user, database or
rule in turn); 10 [[rule]] entries that never fire (5 on clients that do not exist, 5 on
tables that do not exist, so table matching runs on every statement); nesting = savepoint;
identity sources starting with `comment:client`.

Per run: TPS and mean latency from pgbench; CPU per transaction of the proxy (utime+stime of
its process from /proc/<pid>/stat, all threads, delta over the run / transactions), of the
PostgreSQL server (postmaster, its children and the children it reaped), of pgbench; and
`other %`, the share of all CPUs busy with anything else (other load on the box). Tables
show medians over the rounds; a run that fails or has failed transactions is left out and
counted as bad.

Before every run the backends PgBouncer kept from earlier runs are ended (--pgbouncer-pool
fresh, the default), so that every target starts its run with new backends, as pgwarden and
direct connections always do: a backend that has run for a while costs the server markedly
less CPU per transaction than a new one (see close_idle_backends). --pgbouncer-pool kept
leaves PgBouncer its warm backends.

CPU per transaction is the stable figure on a small shared machine; TPS is shared between
pgbench, the server and the proxy on the same cores.

Usage (as root, like the integration tests; Debian's /usr/bin/python3):

    PGWARDEN_BIN=build-rel/proxy/pgwarden /usr/bin/python3 tests/bench/proxy_bench.py
    ... --quick                                  # 1 round of 3 s: a smoke run
    ... --only latency,memory --rounds 5 --out /tmp/bench-out

Markdown tables go to stdout (for docs/performance.md), progress to stderr. --out DIR keeps
the configs, scripts, logs, pgbench per-transaction logs and the raw rows (runs.tsv,
memory.tsv). Exit status 0 when every run succeeded, 1 otherwise.
Use a Release or RelWithDebInfo build; a sanitizer build measures the sanitizers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import psycopg  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

import harness  # noqa: E402

HOST = harness.HOST
HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SECTIONS = ("throughput", "latency", "threads", "memory")
TAG = "/* client='bench' */"
PIPELINE_DEPTH = 5
RANGE_ROWS = 500


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc accounting


def stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces): index 0 is
    field 3 (state), so field k of proc(5) is index k - 3."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()


def process_ticks(pid: int) -> int:
    """utime + stime of every thread of the process, in clock ticks."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def server_ticks(postmaster: int) -> int:
    """CPU of the PostgreSQL server: the postmaster and its live children (backends, walwriter,
    ...), plus what its children that already exited used (cutime + cstime): backends of a run
    exit at its end and are reaped by the postmaster."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(int(entry))
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(entry) == postmaster or int(fields[1]) == postmaster:
            total += sum(int(x) for x in fields[11:15])
    return total


def host_busy_ticks() -> int:
    """Busy ticks of all CPUs (user nice system irq softirq steal) from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    return sum(int(cpu[i]) for i in (1, 2, 3, 6, 7, 8))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def idle_check(seconds: float = 2.0) -> float:
    """Percent of all CPUs busy over a short sample, before anything of ours runs."""
    b0, t0 = host_busy_ticks(), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (host_busy_ticks() - b0) / HZ / ((time.monotonic() - t0) * NCPU)


# ---------------------------------------------------------------------------------------------
# Server and proxies


class BenchServer(harness.PostgresServer):
    """The harness's throwaway server with benchmark settings: no TLS (direct runs must not pay
    for TLS the proxies do not use), max_connections for the memory section, a buffer cache that
    holds scale 10, and no autovacuum or checkpoints inside a run (each run starts from a
    VACUUM + CHECKPOINT of its own). Commits do not wait for the WAL flush."""

    def __init__(self, max_connections: int) -> None:
        super().__init__()
        self.max_connections = max_connections

    def start(self) -> None:
        if harness.running_as_root():
            account = harness.ensure_test_os_user()
            os.chown(self.base, account.pw_uid, account.pw_gid)
        os.chmod(self.base, 0o755)
        harness.run_checked(self._as_server_user([
            str(harness.PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions"]), timeout=120)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"""
# pgwarden proxy benchmark
listen_addresses = '{HOST}'
port = {self.port}
unix_socket_directories = '{self.base}'
max_connections = {self.max_connections}
shared_buffers = 1GB
huge_pages = off
ssl = off
fsync = on
synchronous_commit = off
max_wal_size = 8GB
checkpoint_timeout = 1h
autovacuum = off
""")
        (self.data / "pg_hba.conf").write_text(f"local all all trust\nhost all all {HOST}/32 trust\n")
        harness.run_checked(self._as_server_user([
            str(harness.PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
            "start"]), timeout=70)
        self._started = True
        harness.wait_until(self._accepts_queries, 30, "PostgreSQL to accept connections", interval=0.1)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])


class Proxy:
    """A proxy process in the foreground, in a session of its own, its output in a log file."""

    def __init__(self, name: str, workdir: Path, command: list[str], port: int) -> None:
        self.name, self.workdir, self.command, self.port = name, workdir, command, port
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> "Proxy":
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{harness.tail(self.log_path)}")
            try:
                with psycopg.connect(dsn(self.port, connect_timeout=3), autocommit=True) as conn:
                    if conn.execute("select 1").fetchone() == (1,):
                        return self
            except psycopg.Error as e:
                last = e
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s ({last}):\n{harness.tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s; killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def dsn(port: int, **kw: object) -> str:
    return make_conninfo(host=HOST, port=port, user="postgres", dbname="postgres", sslmode="disable", **kw)


def metric_lines(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric in Prometheus text format: (labels, value)."""
    samples = []
    for m in re.finditer(r"^" + re.escape(name) + r"(?:\{(.*)\})? (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        samples.append((labels, float(m.group(2))))
    return samples


def pgwarden_config(threads: int, policies: bool, io_uring: bool = True) -> str:
    text = f"""# written by tests/bench/proxy_bench.py
[proxy]
threads = {threads}
io_uring = {"true" if io_uring else "false"}
max_client_connections = 5000
max_unauthenticated = 2000
shutdown_timeout = "1s"

[admin]
enabled = false

[log]
level = "warn"
"""
    if not policies:
        return text
    text += """
[identity]
sources = ["comment:client", "setting:pgwarden.client", "application_name", "user"]

[transactions]
nesting = "savepoint"
"""
    # Throttles that admit everything: they match every client and count SELECTs too, so each
    # statement of every workload debits all ten buckets; no run comes near the rate.
    buckets = ("client", "user", "database", "rule")
    for i in range(10):
        text += f"""
[[throttle]]
name = "admit-all-{i}"
match = {{ client = "*" }}
statements = ["select", "write"]
rate = 1000000000
burst = 1000000000
bucket = "{buckets[i % len(buckets)]}"
action = "delay"
max_delay = "1s"
"""
    # Rules that never fire: half on clients that never connect, half on tables that do not
    # exist (so every statement's tables are matched against them).
    actions = ("reject", "doom", "notice", "log", "reject")
    for i in range(5):
        text += f"""
[[rule]]
name = "never-client-{i}"
match = {{ client = "nobody-{i}-*", statements = ["write", "select"] }}
action = "{actions[i]}"
"""
    for i in range(5):
        text += f"""
[[rule]]
name = "never-table-{i}"
match = {{ statements = ["select", "write"], tables = ["nosuch_{i}.*", "*.audit_{i}"] }}
action = "{actions[i]}"
"""
    return text


def pgbouncer_files(workdir: Path, port: int, upstream_port: int, name: str) -> Path:
    """Session mode, trust as postgres, pools large enough for the memory section."""
    userlist = workdir / f"{name}.userlist.txt"
    userlist.write_text('"postgres" ""\n')
    ini = workdir / f"{name}.ini"
    # PgBouncer refuses to run as root; it drops to the server's account after reading this.
    user = f"user = {harness.TEST_OS_USER}\n" if harness.running_as_root() else ""
    ini.write_text(f"""; written by tests/bench/proxy_bench.py
[databases]
* = host={HOST} port={upstream_port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = session
max_client_conn = 1500
default_pool_size = 1500
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
{user}""")
    for path in (userlist, ini):
        os.chmod(path, 0o644)
    return ini


# ---------------------------------------------------------------------------------------------
# Workloads


def sql(statement: str, tagged: bool) -> str:
    # sqlcommenter puts its tag after the statement; pgwarden reads it anywhere in the statement.
    return f"{statement} {TAG};" if tagged else f"{statement};"


def script_text(kind: str, tagged: bool) -> str:
    """pgbench's builtin scripts (select-only, tpcb-like) as custom scripts, and the pipeline."""
    if kind == "select":
        return ("\\set aid random(1, 100000 * :scale)\n"
                + sql("SELECT abalance FROM pgbench_accounts WHERE aid = :aid", tagged) + "\n")
    if kind == "tpcb":
        return "".join([
            "\\set aid random(1, 100000 * :scale)\n",
            "\\set bid random(1, 1 * :scale)\n",
            "\\set tid random(1, 10 * :scale)\n",
            "\\set delta random(-5000, 5000)\n",
            sql("BEGIN", tagged) + "\n",
            sql("UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid", tagged) + "\n",
            sql("SELECT abalance FROM pgbench_accounts WHERE aid = :aid", tagged) + "\n",
            sql("UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid", tagged) + "\n",
            sql("UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid", tagged) + "\n",
            sql("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                "VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP)", tagged) + "\n",
            sql("END", tagged) + "\n",
        ])
    if kind == "pipeline":
        lines = [f"\\set aid{i} random(1, 100000 * :scale)\n" for i in range(PIPELINE_DEPTH)]
        lines.append("\\startpipeline\n")
        lines += [sql(f"SELECT abalance FROM pgbench_accounts WHERE aid = :aid{i}", tagged) + "\n"
                  for i in range(PIPELINE_DEPTH)]
        lines.append("\\endpipeline\n")
        return "".join(lines)
    if kind == "range":
        # A large answer: RANGE_ROWS rows of about 100 bytes (DataRow with the filler column).
        return (f"\\set aid random(1, 100000 * :scale - {RANGE_ROWS})\n"
                + sql(f"SELECT aid, bid, abalance, filler FROM pgbench_accounts "
                      f"WHERE aid BETWEEN :aid AND :aid + {RANGE_ROWS - 1}", tagged) + "\n")
    raise ValueError(kind)


@dataclass(frozen=True)
class Workload:
    name: str
    script: str            # select | tpcb | pipeline | range
    mode: str              # pgbench -M
    clients: int
    jobs: int
    per_tx_log: bool = False


@dataclass
class Target:
    name: str
    port: int
    proxy: Proxy | None = None
    tagged: bool = False   # scripts carry the sqlcommenter tag


@dataclass
class Row:
    section: str
    round: int
    target: str
    workload: str
    rc: int
    tps: float = 0.0
    lat_ms: float = 0.0
    txns: int = 0
    failed: int = 0
    proxy_us: float | None = None
    pg_us: float = 0.0
    pgbench_us: float = 0.0
    other_pct: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.failed == 0 and self.txns > 0

    TSV_FIELDS = ("section", "round", "target", "workload", "rc", "tps", "lat_ms", "txns", "failed", "proxy_us",
                  "pg_us", "pgbench_us", "other_pct", "p50_us", "p99_us")

    def tsv(self) -> str:
        def fmt(v: object) -> str:
            return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        return "\t".join(fmt(getattr(self, f)) for f in self.TSV_FIELDS)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(rank) - 1]


# ---------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.server = BenchServer(max_connections=max(args.mem_conns) + 100 if "memory" in args.only else 300)
        self.admin: psycopg.Connection | None = None
        self.proxies: list[Proxy] = []
        self.rows: list[Row] = []
        self.memory: list[dict[str, object]] = []
        self.scripts: dict[tuple[str, bool], Path] = {}
        self.env = {k: v for k, v in os.environ.items() if not (k.startswith("PG") and not k.startswith("PGWARDEN_"))}
        self.env["PGCONNECT_TIMEOUT"] = "10"
        self.env["PGSSLMODE"] = "disable"
        self.tsv = open(workdir / "runs.tsv", "w")
        self.tsv.write("\t".join(Row.TSV_FIELDS) + "\n")

    # -- setup ------------------------------------------------------------------------------

    def start_server(self) -> None:
        log(f"starting PostgreSQL 15 (max_connections {self.server.max_connections})")
        self.server.start()
        self.admin = self.server.connect()
        log(f"pgbench -i -s {self.args.scale}")
        result = subprocess.run(["pgbench", "-i", "-q", "-s", str(self.args.scale), "-h", HOST,
                                 "-p", str(self.server.port), "-U", "postgres", "postgres"],
                                capture_output=True, env=self.env, timeout=900, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {result.stderr.decode(errors='replace')}")
        for kind in ("select", "tpcb", "pipeline", "range"):
            for tagged in (False, True):
                path = self.workdir / f"{kind}{'-tagged' if tagged else ''}.sql"
                path.write_text(script_text(kind, tagged))
                self.scripts[kind, tagged] = path

    def pgwarden(self, name: str, threads: int, policies: bool, admin_port: int | None = None,
                 io_uring: bool = True) -> Proxy:
        config = pgwarden_config(threads, policies, io_uring)
        if admin_port is not None:
            config = config.replace("[admin]\nenabled = false", f'[admin]\nenabled = true\nlisten = "{HOST}:{admin_port}"')
        path = self.workdir / f"{name}.toml"
        path.write_text(config)
        check = subprocess.run([self.args.pgwarden, "--check", "-c", str(path)], capture_output=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"pgwarden --check {path}: {check.stdout.decode()}{check.stderr.decode()}")
        port = harness.free_port()
        proxy = Proxy(name, self.workdir, [self.args.pgwarden, "-c", str(path), "--listen", f"{HOST}:{port}",
                                           "--upstream", f"{HOST}:{self.server.port}"], port)
        self.proxies.append(proxy)
        return proxy.start()

    def pgbouncer(self, name: str) -> Proxy:
        port = harness.free_port()
        ini = pgbouncer_files(self.workdir, port, self.server.port, name)
        proxy = Proxy(name, self.workdir, [self.args.pgbouncer, str(ini)], port)
        self.proxies.append(proxy)
        return proxy.start()

    def stop_proxy(self, proxy: Proxy) -> None:
        proxy.stop()
        self.proxies.remove(proxy)

    def stop_all(self) -> None:
        for proxy in list(self.proxies):
            with contextlib.suppress(Exception):
                self.stop_proxy(proxy)
        if self.admin is not None:
            with contextlib.suppress(Exception):
                self.admin.close()
            self.admin = None
        if self.args.out:
            with contextlib.suppress(OSError):
                shutil.copy(self.server.log_path, self.workdir / "postgresql.log")
        self.server.stop()

    def verify_tag(self) -> None:
        """The policy target is only meaningful if pgwarden sees the tag: run each tagged script a
        few times through a pgwarden with the same policies and its admin listener on, and look
        for client "bench" in its statement counters (and for no throttle or rule hits)."""
        admin_port = harness.free_port()
        proxy = self.pgwarden("pgwarden-tagcheck", 1, True, admin_port=admin_port)
        try:
            for kind, mode in (("select", "simple"), ("tpcb", "extended"), ("pipeline", "extended")):
                cmd = ["pgbench", "-n", "-h", HOST, "-p", str(proxy.port), "-U", "postgres", "-M", mode,
                       "-s", str(self.args.scale), "-c", "1", "-t", "5", "-f", str(self.scripts[kind, True]),
                       "postgres"]
                result = subprocess.run(cmd, capture_output=True, env=self.env, timeout=60, stdin=subprocess.DEVNULL)
                if result.returncode != 0:
                    raise RuntimeError(f"tag check, {kind}: {result.stderr.decode(errors='replace')}")
            with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            counted = set()
            for labels, value in metric_lines(metrics, "pgwarden_statements_total"):
                if labels.get("client") == "bench" and value > 0:
                    counted.add(labels.get("kind", "?"))
            missing = {"select", "update", "insert", "begin", "commit"} - counted
            if missing:
                raise RuntimeError(f"pgwarden did not count statements of kinds {sorted(missing)} for client "
                                   f"'bench': is the tag read?\n" + "\n".join(
                                       line for line in metrics.splitlines() if "statements_total" in line))
            fired = [f"{name}{labels} {value:g}" for name in ("pgwarden_rule_hits_total", "pgwarden_throttle_rejected_total",
                                                              "pgwarden_throttle_delayed_total")
                     for labels, value in metric_lines(metrics, name) if value > 0]
            if fired:
                raise RuntimeError("policies that must not fire did:\n" + "\n".join(fired))
            log(f"tag check: pgwarden counts client 'bench' statements of kinds {sorted(counted)}; no policy fired")
        finally:
            self.stop_proxy(proxy)

    # -- one pgbench run -------------------------------------------------------------------

    def reset(self) -> None:
        # Same starting state for every run (pgbench's own cleanup, then a checkpoint so every
        # run pays the same full-page writes), done directly so no proxy is charged for it.
        assert self.admin is not None
        self.admin.execute("VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts")
        self.admin.execute("TRUNCATE pgbench_history")
        self.admin.execute("CHECKPOINT")
        if self.args.pgbouncer_pool == "fresh":
            self.close_idle_backends()

    def close_idle_backends(self) -> None:
        # PgBouncer keeps its server connections after its clients leave and hands them to the
        # next run's clients, whose backends have then long been warmed up; every other target
        # starts the run with new backends. A new backend maps the shared buffers page by page
        # as it touches them, and on a virtual machine those page faults are dear (minor faults
        # per transaction 0.5-0.7 against 0 for reused backends; server CPU per transaction up
        # by a third). So that the run compares the proxies and not the age of the backends,
        # the backends PgBouncer kept are ended first; PgBouncer sees its idle server
        # connections close and opens new ones for the run.
        assert self.admin is not None
        # All are signalled at once, then awaited: pg_terminate_backend's own timeout would
        # wait for each in turn, in steps of 100 ms.
        others = "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        self.admin.execute(f"SELECT pg_terminate_backend(pid) {others}")
        deadline = time.monotonic() + 10
        while (row := self.admin.execute(f"SELECT count(*) {others}").fetchone()) and row[0] > 0:
            if time.monotonic() > deadline:
                log("WARNING: backends still alive 10 s after pg_terminate_backend")
                break
            time.sleep(0.05)

    def pgbench_cmd(self, target: Target, w: Workload, duration: float, extra: list[str]) -> list[str]:
        return ["pgbench", "-n", "-h", HOST, "-p", str(target.port), "-U", "postgres", "-T", str(int(duration)),
                "-M", w.mode, "-c", str(w.clients), "-j", str(w.jobs), "-s", str(self.args.scale),
                "-f", str(self.scripts[w.script, target.tagged]), *extra, "postgres"]

    def run(self, section: str, rnd: int, target: Target, w: Workload) -> Row:
        self.reset()
        stem = f"{section}-r{rnd}-{target.name}-{w.name}"
        extra: list[str] = []
        txlog_dir = self.workdir / "txlogs" / stem
        if w.per_tx_log:
            txlog_dir.mkdir(parents=True, exist_ok=True)
            extra = ["-l", f"--log-prefix={txlog_dir}/tx"]
        cmd = self.pgbench_cmd(target, w, self.args.duration, extra)
        postmaster = self.server.postmaster_pid()

        proxy0 = process_ticks(target.proxy.pid) if target.proxy else 0
        pg0, host0, t0 = server_ticks(postmaster), host_busy_ticks(), time.monotonic()
        kids0, self0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()
        result = subprocess.run(cmd, capture_output=True, env=self.env, timeout=self.args.duration + 120,
                                stdin=subprocess.DEVNULL)
        # Let the sessions end: backends that exit are then reaped (their CPU lands in the
        # postmaster's cutime) and the proxy has done its disconnect work.
        time.sleep(0.5)
        t1, host1, pg1 = time.monotonic(), host_busy_ticks(), server_ticks(postmaster)
        proxy1 = process_ticks(target.proxy.pid) if target.proxy else 0
        kids1, self1 = resource.getrusage(resource.RUSAGE_CHILDREN), os.times()

        out = result.stdout.decode(errors="replace")
        (self.workdir / f"{stem}.log").write_text(f"$ {' '.join(cmd)}\n{out}{result.stderr.decode(errors='replace')}")
        row = Row(section, rnd, target.name, w.name, result.returncode)
        if m := re.search(r"^tps = ([\d.]+)", out, re.M):
            row.tps = float(m.group(1))
        if m := re.search(r"^latency average = ([\d.]+) ms", out, re.M):
            row.lat_ms = float(m.group(1))
        if m := re.search(r"^number of transactions actually processed: (\d+)", out, re.M):
            row.txns = int(m.group(1))
        if m := re.search(r"^number of failed transactions: (\d+)", out, re.M):
            row.failed = int(m.group(1))
        if row.txns:
            per_tx = 1e6 / HZ / row.txns
            pgbench_ticks = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) * HZ
            own_ticks = (self1.user + self1.system - self0.user - self0.system) * HZ
            if target.proxy:
                row.proxy_us = (proxy1 - proxy0) * per_tx
            row.pg_us = (pg1 - pg0) * per_tx
            row.pgbench_us = pgbench_ticks * per_tx
            others = (host1 - host0) - (pg1 - pg0) - (proxy1 - proxy0) - pgbench_ticks - own_ticks
            row.other_pct = max(0.0, 100.0 * others / HZ / ((t1 - t0) * NCPU))
        if w.per_tx_log and row.ok:
            latencies: list[float] = []
            for path in txlog_dir.glob("tx*"):
                with open(path) as f:
                    latencies += [float(line.split()[2]) for line in f if line.strip()]
            if latencies:
                latencies.sort()
                row.p50_us, row.p99_us = percentile(latencies, 50), percentile(latencies, 99)
            if not self.args.out:
                shutil.rmtree(txlog_dir, ignore_errors=True)
        self.rows.append(row)
        self.tsv.write(row.tsv() + "\n")
        self.tsv.flush()
        cpu = "-" if row.proxy_us is None else f"{row.proxy_us:.1f}"
        pct = "" if row.p50_us is None else f" p50={row.p50_us:.0f}us p99={row.p99_us:.0f}us"
        log(f"  {section} r{rnd} {target.name:<14} {w.name:<12} tps={row.tps:<10.1f} lat={row.lat_ms:.3f}ms "
            f"us/tx proxy={cpu} pg={row.pg_us:.1f} pgbench={row.pgbench_us:.1f} other={row.other_pct:.0f}%{pct}"
            f"{'' if row.ok else f' FAILED rc={row.rc} failed={row.failed}'}")
        return row

    def rounds(self, section: str, targets: list[Target], workloads: list[Workload]) -> None:
        """Each round runs every workload on every target; the target order rotates by round."""
        for rnd in range(1, self.args.rounds + 1):
            shift = (rnd - 1) % len(targets)
            order = targets[shift:] + targets[:shift]
            for w in workloads:
                for target in order:
                    self.run(section, rnd, target, w)

    def warmup(self, targets: list[Target]) -> None:
        """Warm caches, pools and the server's buffers through every target; not recorded."""
        if self.args.warmup <= 0:
            return
        w = Workload("warmup", "select", "prepared", self.args.clients, self.args.jobs)
        for target in targets:
            cmd = self.pgbench_cmd(target, w, self.args.warmup, [])
            result = subprocess.run(cmd, capture_output=True, env=self.env, timeout=self.args.warmup + 60,
                                    stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                log(f"warm-up through {target.name} failed: {result.stderr.decode(errors='replace')}")

    # -- sections ----------------------------------------------------------------------------

    def main_targets(self) -> list[Target]:
        targets = [Target("direct", self.server.port)]
        bouncer = self.pgbouncer("pgbouncer")
        targets.append(Target("pgbouncer", bouncer.port, bouncer))
        plain = self.pgwarden("pgwarden", self.args.pgwarden_threads, False)
        targets.append(Target("pgwarden", plain.port, plain))
        if self.args.epoll_target:
            # The same with [proxy] io_uring = false: what a kernel or container without
            # io_uring gets, and what pgwarden's relay cost before it.
            epoll = self.pgwarden("pgwarden-epoll", self.args.pgwarden_threads, False, io_uring=False)
            targets.append(Target("pgwarden-epoll", epoll.port, epoll))
        policed = self.pgwarden("pgwarden+pol", self.args.pgwarden_threads, True)
        targets.append(Target("pgwarden+pol", policed.port, policed, tagged=True))
        return targets

    def throughput(self, targets: list[Target]) -> None:
        c, j = self.args.clients, self.args.jobs
        self.rounds("throughput", targets, [
            Workload("S-simple", "select", "simple", c, j),
            Workload("S-prepared", "select", "prepared", c, j),
            Workload("tpcb-ext", "tpcb", "extended", c, j),
            Workload(f"pipeline{PIPELINE_DEPTH}-ext", "pipeline", "extended", c, j),
            Workload(f"range{RANGE_ROWS}-prep", "range", "prepared", c, j),
        ])

    def latency(self, targets: list[Target]) -> None:
        self.rounds("latency", targets, [
            Workload("S-simple-c1", "select", "simple", 1, 1, per_tx_log=True),
            Workload("S-prepared-c1", "select", "prepared", 1, 1, per_tx_log=True),
        ])

    def threads(self) -> None:
        targets = []
        for n in (1, 2):
            proxy = self.pgwarden(f"pgwarden-{n}t", n, False)
            targets.append(Target(f"pgwarden-{n}t", proxy.port, proxy))
        self.warmup(targets)
        self.rounds("threads", targets, [Workload("S-simple", "select", "simple", self.args.clients, self.args.jobs)])
        for target in targets:
            assert target.proxy is not None
            self.stop_proxy(target.proxy)

    def memory_section(self) -> None:
        """A fresh proxy per measurement, so what earlier sessions left in its allocator does not
        hide the growth. RSS_0 is taken after one session came and went (code paths paged in)."""
        for n in self.args.mem_conns:
            for name in ("pgwarden", "pgbouncer"):
                proxy = (self.pgwarden(f"mem-{name}-{n}", self.args.pgwarden_threads, False) if name == "pgwarden"
                         else self.pgbouncer(f"mem-{name}-{n}"))
                try:
                    self.memory.append(self.measure_memory(name, proxy, n))
                finally:
                    self.stop_proxy(proxy)
                    # the server's backends of these sessions exit asynchronously
                    harness.wait_until(lambda: self.server.client_backends() <= 1, 60, "idle sessions to end")

    def measure_memory(self, name: str, proxy: Proxy, n: int) -> dict[str, object]:
        with psycopg.connect(dsn(proxy.port), autocommit=True) as conn:
            conn.execute("select 1").fetchone()
        time.sleep(0.5)
        rss0 = rss_kib(proxy.pid)
        conns: list[psycopg.Connection] = []

        def open_one(_: int) -> psycopg.Connection:
            conn = psycopg.connect(dsn(proxy.port, connect_timeout=30), autocommit=True)
            conn.execute("select 1").fetchone()
            return conn

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                conns = list(pool.map(open_one, range(n)))
            time.sleep(1.0)
            rss_n = rss_kib(proxy.pid)
            # all client backends but our admin connection (PgBouncer serves one session from the
            # server connection the warm-up session left in its pool)
            backends = self.server.client_backends() - 1
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    conn.close()
        per = (rss_n - rss0) / n
        log(f"  memory {name:<10} n={n:<5} rss0={rss0} KiB rss_n={rss_n} KiB -> {per:.1f} KiB/session "
            f"({backends} server sessions)")
        row = {"proxy": name, "n": n, "rss0_kib": rss0, "rssn_kib": rss_n, "per_session_kib": per,
               "server_sessions": backends}
        return row


# ---------------------------------------------------------------------------------------------
# Reporting


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def f(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


class Summary:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def group(self, section: str) -> tuple[list[str], list[str], dict[tuple[str, str], list[Row]]]:
        workloads: list[str] = []
        targets: list[str] = []
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in self.rows:
            if row.section != section:
                continue
            if row.workload not in workloads:
                workloads.append(row.workload)
            if row.target not in targets:
                targets.append(row.target)
            groups.setdefault((row.workload, row.target), []).append(row)
        order = ["direct", "pgbouncer", "pgwarden", "pgwarden-epoll", "pgwarden+pol"]
        targets.sort(key=lambda t: (order.index(t) if t in order else len(order), t))
        return workloads, targets, groups

    @staticmethod
    def stat(rows: list[Row], attr: str) -> float | None:
        return med([getattr(r, attr) for r in rows if r.ok and getattr(r, attr) is not None])

    @staticmethod
    def spread(rows: list[Row]) -> float | None:
        tps = [r.tps for r in rows if r.ok]
        return 100 * (max(tps) - min(tps)) / statistics.median(tps) if tps else None

    def throughput(self) -> list[str]:
        workloads, targets, groups = self.group("throughput")
        if not groups:
            return []
        out = ["| workload | target | TPS | spread % | mean latency ms | proxy CPU µs/tx | PG CPU µs/tx "
               "| other load % | bad runs |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for w in workloads:
            for t in targets:
                rows = groups.get((w, t), [])
                if not rows:
                    continue
                out.append(f"| {w} | {t} | {f(self.stat(rows, 'tps'), 0)} | {f(self.spread(rows))} "
                           f"| {f(self.stat(rows, 'lat_ms'), 3)} | {f(self.stat(rows, 'proxy_us'), 2)} "
                           f"| {f(self.stat(rows, 'pg_us'), 1)} | {f(self.stat(rows, 'other_pct'), 0)} "
                           f"| {sum(not r.ok for r in rows)} |")
        out += ["", "Ratios of medians:", "",
                "| workload | target | TPS / direct | TPS / PgBouncer | CPU / PgBouncer | mean latency added µs |",
                "|---|---|--:|--:|--:|--:|"]
        for w in workloads:
            direct, bouncer = groups.get((w, "direct"), []), groups.get((w, "pgbouncer"), [])
            for t in targets:
                rows = groups.get((w, t), [])
                if t == "direct" or not rows:
                    continue
                lat, dlat = self.stat(rows, "lat_ms"), self.stat(direct, "lat_ms")
                added = None if lat is None or dlat is None else 1000 * (lat - dlat)
                to_bouncer = t != "pgbouncer"
                out.append(f"| {w} | {t} | {ratio(self.stat(rows, 'tps'), self.stat(direct, 'tps'))} "
                           f"| {ratio(self.stat(rows, 'tps'), self.stat(bouncer, 'tps')) if to_bouncer else '-'} "
                           f"| {ratio(self.stat(rows, 'proxy_us'), self.stat(bouncer, 'proxy_us')) if to_bouncer else '-'} "
                           f"| {f(added, 0, sign=True)} |")
        return out

    def latency(self) -> list[str]:
        workloads, targets, groups = self.group("latency")
        if not groups:
            return []
        out = ["| workload | target | TPS | p50 µs | p99 µs | p50 added µs | p99 added µs | proxy CPU µs/tx "
               "| other load % | bad runs |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for w in workloads:
            direct = groups.get((w, "direct"), [])
            d50, d99 = self.stat(direct, "p50_us"), self.stat(direct, "p99_us")
            for t in targets:
                rows = groups.get((w, t), [])
                if not rows:
                    continue
                p50, p99 = self.stat(rows, "p50_us"), self.stat(rows, "p99_us")
                a50 = None if t == "direct" or p50 is None or d50 is None else p50 - d50
                a99 = None if t == "direct" or p99 is None or d99 is None else p99 - d99
                out.append(f"| {w} | {t} | {f(self.stat(rows, 'tps'), 0)} | {f(p50, 0)} | {f(p99, 0)} "
                           f"| {f(a50, 0, sign=True)} | {f(a99, 0, sign=True)} | {f(self.stat(rows, 'proxy_us'), 2)} "
                           f"| {f(self.stat(rows, 'other_pct'), 0)} | {sum(not r.ok for r in rows)} |")
        return out

    def threads(self) -> list[str]:
        workloads, targets, groups = self.group("threads")
        if not groups:
            return []
        out = ["| workload | pgwarden threads | TPS | spread % | mean latency ms | proxy CPU µs/tx | TPS / 1 thread "
               "| other load % | bad runs |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for w in workloads:
            base = self.stat(groups.get((w, "pgwarden-1t"), []), "tps")
            for t in targets:
                rows = groups.get((w, t), [])
                out.append(f"| {w} | {t.removeprefix('pgwarden-').removesuffix('t')} | {f(self.stat(rows, 'tps'), 0)} "
                           f"| {f(self.spread(rows))} | {f(self.stat(rows, 'lat_ms'), 3)} "
                           f"| {f(self.stat(rows, 'proxy_us'), 2)} | {ratio(self.stat(rows, 'tps'), base)} "
                           f"| {f(self.stat(rows, 'other_pct'), 0)} | {sum(not r.ok for r in rows)} |")
        return out

    def targets(self, memory: list[dict[str, object]]) -> list[str]:
        """Issue 7's targets, judged on these medians."""
        workloads, _, groups = self.group("throughput")
        lw, _, lgroups = self.group("latency")
        out = ["| target (issue 7) | measured | met |", "|---|---|:-:|"]

        def line(what: str, value: float | None, limit: float, fmt: str = "{:.2f}", lower_is_better: bool = True) -> None:
            if value is None:
                return
            met = value <= limit if lower_is_better else value >= limit
            out.append(f"| {what} | {fmt.format(value)} | {'yes' if met else 'no'} |")

        for w in ("S-simple", "S-prepared"):
            bouncer = self.stat(groups.get((w, "pgbouncer"), []), "proxy_us")
            for t, limit in (("pgwarden", 0.8), ("pgwarden+pol", 1.0)):
                mine = self.stat(groups.get((w, t), []), "proxy_us")
                if mine is not None and bouncer:
                    line(f"{w}: {t} CPU/tx ≤ {limit} × PgBouncer", mine / bouncer, limit)
        for w in workloads:
            bouncer = self.stat(groups.get((w, "pgbouncer"), []), "tps")
            for t in ("pgwarden", "pgwarden+pol"):
                mine = self.stat(groups.get((w, t), []), "tps")
                if mine is not None and bouncer:
                    line(f"{w}: {t} TPS ≥ PgBouncer's", mine / bouncer, 1.0, lower_is_better=False)
        for w in lw:
            d = self.stat(lgroups.get((w, "direct"), []), "p50_us")
            b = self.stat(lgroups.get((w, "pgbouncer"), []), "p50_us")
            mine = self.stat(lgroups.get((w, "pgwarden"), []), "p50_us")
            if None not in (d, b, mine):
                out.append(f"| {w}: pgwarden p50 added ≤ PgBouncer's | {mine - d:+.0f} µs vs {b - d:+.0f} µs "
                           f"| {'yes' if mine - d <= b - d else 'no'} |")
        for m in memory:
            if m["proxy"] == "pgwarden" and m["n"] >= 1000:
                line(f"idle session RSS at {m['n']} ≤ 32 KiB", m["per_session_kib"], 32.0, "{:.1f} KiB")
        return out if len(out) > 2 else []


def memory_table(memory: list[dict[str, object]]) -> list[str]:
    if not memory:
        return []
    out = ["| proxy | idle sessions | server sessions | RSS before KiB | RSS with sessions KiB | KiB per client+server session |",
           "|---|--:|--:|--:|--:|--:|"]
    for m in memory:
        out.append(f"| {m['proxy']} | {m['n']} | {m['server_sessions']} | {m['rss0_kib']} | {m['rssn_kib']} "
                   f"| {m['per_session_kib']:.1f} |")
    return out


def version_of(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=10)
        return (result.stdout or result.stderr).decode(errors="replace").strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved runs (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds per pgbench run (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s, 1 s warm-up")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--out", help="keep configs, logs and raw rows here (default: a temp dir, deleted)")
    p.add_argument("--clients", type=int, default=16, help="pgbench -c of the throughput and threads sections")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j of the throughput and threads sections")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--warmup", type=float, default=3, help="seconds of unrecorded warm-up per target")
    p.add_argument("--pgwarden-threads", type=int, default=0,
                   help="[proxy] threads of the compared pgwardens (default 0: one per core)")
    p.add_argument("--mem-conns", default="100,1000", help="idle session counts of the memory section")
    p.add_argument("--pgwarden", default=str(harness.pgwarden_binary()), help="binary (default $PGWARDEN_BIN)")
    p.add_argument("--pgbouncer", default="/usr/sbin/pgbouncer")
    p.add_argument("--no-epoll-target", dest="epoll_target", action="store_false",
                   help="leave out pgwarden-epoll (pgwarden with [proxy] io_uring = false)")
    p.add_argument("--pgbouncer-pool", choices=("fresh", "kept"), default="fresh",
                   help="fresh (default): end the server connections PgBouncer kept before every run, so "
                        "that every target starts with new backends; kept: leave them, so that PgBouncer's "
                        "runs reuse backends warmed up by earlier runs")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 1
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in args.only:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; sections: {', '.join(SECTIONS)}")
    args.mem_conns = [int(n) for n in args.mem_conns.split(",")]
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be at least 1")
    if not os.access(args.pgwarden, os.X_OK):
        p.error(f"pgwarden binary {args.pgwarden} missing; set PGWARDEN_BIN or --pgwarden")
    return args


def main() -> int:
    args = parse_args()
    started, started_at = time.monotonic(), datetime.datetime.now(datetime.timezone.utc)
    # 1000 idle sessions: 1000 sockets here, 2000 in the proxy (children inherit the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max(args.mem_conns) + 100
    if "memory" in args.only and resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        log(f"WARNING: open files limit below {needed}; the memory section may fail")

    if args.out:
        workdir = Path(args.out).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    os.chmod(workdir, 0o755)  # PgBouncer reads its files after dropping root

    busy = idle_check()
    load_start = loadavg()
    log(f"host {busy:.0f}% busy before start (other load), loadavg {load_start}; work dir {workdir}")
    if busy > 10:
        log("WARNING: the machine is busy with other work: expect noise")

    bench = Bench(args, workdir)
    # SIGTERM ends the run like Ctrl-C: the finally below stops everything we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        bench.start_server()
        if "throughput" in args.only or "latency" in args.only:
            targets = bench.main_targets()
            bench.verify_tag()
            bench.warmup(targets)
            if "throughput" in args.only:
                bench.throughput(targets)
            if "latency" in args.only:
                bench.latency(targets)
            for target in targets:
                if target.proxy is not None:
                    bench.stop_proxy(target.proxy)
        if "threads" in args.only:
            bench.threads()
        if "memory" in args.only:
            bench.memory_section()
    finally:
        bench.stop_all()
        bench.tsv.close()
    elapsed = time.monotonic() - started

    summary = Summary(bench.rows)
    if bench.memory:
        with open(workdir / "memory.tsv", "w") as mf:
            keys = list(bench.memory[0])
            mf.write("\t".join(keys) + "\n")
            for m in bench.memory:
                mf.write("\t".join(str(m[k]) for k in keys) + "\n")

    others = [r.other_pct for r in bench.rows if r.ok]
    lines = [
        f"## Proxy benchmark, {started_at:%Y-%m-%d %H:%M} UTC",
        "",
        f"- host: {NCPU} CPUs, Linux {platform.release()}; {version_of([str(harness.PG_BIN / 'postgres'), '-V'])}; "
        f"{version_of([args.pgbouncer, '--version'])}; {version_of([args.pgwarden, '--version'])} "
        f"({args.pgwarden})",
        f"- {args.rounds} round(s) × {args.duration:g} s per run, targets interleaved (order rotated each round); "
        f"scale {args.scale}; throughput -c {args.clients} -j {args.jobs}; pgwarden threads "
        f"{args.pgwarden_threads or 'one per core'}; PgBouncer session mode, "
        + ("its kept server connections ended before every run (every target starts with new backends)"
           if args.pgbouncer_pool == "fresh" else "its server connections kept from run to run"),
        f"- other load: {busy:.0f}% of all CPUs busy before start; loadavg {load_start} at start, {loadavg()} at end; "
        f"median other load during runs {f(med(others), 0)}% (max {f(max(others) if others else None, 0)}%)",
        f"- run time {elapsed / 60:.1f} min; command: `{' '.join(sys.argv)}`",
        "- pgwarden+pol: 10 admit-everything throttles (SELECTs and writes), 10 rules that never fire, "
        "nesting = savepoint, client from `/* client='bench' */` on every statement",
        "",
    ]
    for title, table in (
            (f"### Throughput (-c {args.clients} -j {args.jobs}), medians", summary.throughput()),
            ("### Single-client latency (-c 1 -j 1 -S), medians of per-run p50/p99 from per-transaction logs",
             summary.latency()),
            (f"### Worker threads (pgwarden, no policies, -c {args.clients} -j {args.jobs})", summary.threads()),
            ("### Idle session memory (fresh proxy; each session ran `select 1`; PgBouncer session mode also "
             "keeps one server connection per client)", memory_table(bench.memory)),
            ("### Targets", summary.targets(bench.memory))):
        if table:
            lines += [title, "", *table, ""]
    print("\n".join(lines))
    bad = sum(not r.ok for r in bench.rows)
    if args.out:
        log(f"raw rows: {workdir}/runs.tsv; logs in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {elapsed / 60:.1f} min; {len(bench.rows)} runs, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
