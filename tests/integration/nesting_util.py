# What the transaction-nesting, doom, idle-timeout and ORM tests share: clients driven one
# statement at a time (psql, psycopg2, psycopg 3 in the extended protocol) that report what
# the application saw, direct checks of what PostgreSQL committed, and pgwarden's metrics,
# log events and admin API.
from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg

import harness

# How long one statement may take before a client counts as hung (pgwarden lost track of
# what the server owes it). Every statement in these tests answers in milliseconds.
STEP_TIMEOUT = 2.0
# psql's first statement also waits for the process to start and connect.
PSQL_START_TIMEOUT = 10.0

# psycopg2 reports notices as text only; the SQLSTATEs PostgreSQL gives them.
_PSYCOPG2_NOTICE_STATES = {
    "there is already a transaction in progress": "25001",
    "there is no transaction in progress": "25P01",
}


def config(nesting: str = "warn", idle_timeout: str | None = None, extra: str = "") -> str:
    text = f'[transactions]\nnesting = "{nesting}"\n'
    if idle_timeout is not None:
        text += f'idle_timeout = "{idle_timeout}"\n'
    return text + extra


# ---- what PostgreSQL has committed -------------------------------------------------------


def create_table(pg_server: harness.PostgresServer, name: str) -> str:
    """A fresh `name (id int primary key, note text)`, owned by the test."""
    with pg_server.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


def committed_ids(pg_server: harness.PostgresServer, table: str) -> list[int]:
    """The rows any other session can see now, over a direct connection to PostgreSQL."""
    with pg_server.connect() as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def committed_notes(pg_server: harness.PostgresServer, table: str) -> list[str]:
    with pg_server.connect() as conn:
        return [row[0] for row in conn.execute(f"SELECT note FROM {table} ORDER BY note")]


# ---- pgwarden's metrics, log and admin API -----------------------------------------------


def admin_url(instance: harness.Pgwarden, path: str) -> str:
    return f"http://{instance.host}:{instance.admin_port}{path}"


def admin_get(instance: harness.Pgwarden, path: str) -> Any:
    with urllib.request.urlopen(admin_url(instance, path), timeout=5) as response:
        body = response.read()
    return json.loads(body) if path.startswith("/api/") else body.decode()


def admin_post(instance: harness.Pgwarden, path: str, body: bytes = b"") -> tuple[int, Any]:
    request = urllib.request.Request(admin_url(instance, path), data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def client_id(instance: harness.Pgwarden, application_name: str) -> int:
    """The admin API's id of the one session with this application_name."""
    ids = [c["id"] for c in admin_get(instance, "/api/clients") if c["application_name"] == application_name]
    assert len(ids) == 1, f"expected one session named {application_name!r}, found {ids}"
    return ids[0]


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(instance: harness.Pgwarden, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`; 0 when there are none."""
    total = 0.0
    for line in admin_get(instance, "/metrics").splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        have = dict(_LABEL.findall(match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def log_events(instance: harness.Pgwarden, event: str) -> list[dict[str, str]]:
    events = []
    for line in instance.log_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            events.append(entry)
    return events


def wait_for_events(instance: harness.Pgwarden, event: str, count: int, timeout: float = 5) -> list[dict[str, str]]:
    """At least `count` log lines of `event` (the log is written asynchronously)."""
    return harness.wait_until(lambda: (e := log_events(instance, event)) and len(e) >= count and e,
                              timeout, f"{count} '{event}' log line(s)")


# ---- clients driven statement by statement -----------------------------------------------


@dataclass
class Outcome:
    """What an application saw for one statement."""
    result: str                  # the command tag ("INSERT 0 1", "SELECT 1") or "ERROR <sqlstate>"
    status: str | None           # libpq's transaction status afterwards (IDLE, INTRANS, INERROR); None for psql
    value: str | None = None     # first column of the first row, as text
    notices: list[str] = field(default_factory=list)  # SQLSTATEs of notices and warnings
    message: str = ""            # the error's primary message


class Session:
    """One client connection; `run` executes a statement and reports what the client saw."""
    name = "?"
    reports_status = True

    def run(self, sql: str) -> Outcome:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Watchdog:
    """Unblocks a client stuck in a libpq call after `timeout` seconds by shutting its socket
    down, so that a lost response fails the test instead of hanging it."""

    def __init__(self, fileno: int, timeout: float) -> None:
        self.fileno = fileno
        self.fired = False
        self.timer = threading.Timer(timeout, self._fire)

    def _fire(self) -> None:
        self.fired = True
        try:
            sock = socket.socket(fileno=os.dup(self.fileno))
        except OSError:
            return
        with sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def _status_name(value: int) -> str:
    return {0: "IDLE", 1: "ACTIVE", 2: "INTRANS", 3: "INERROR", 4: "UNKNOWN"}[int(value)]


class PsycopgSession(Session):
    """psycopg 3 in the extended protocol: `prepared` (named statements, prepare=True),
    `pipeline` (each statement in its own pipeline: Parse/Bind/Describe/Execute/Sync) or
    `extended` (unnamed statement, binary results). A plain execute() without parameters
    would go as a simple Query, which psql and psycopg2 already cover."""

    def __init__(self, target: harness.Target, style: str, **conninfo: Any) -> None:
        self.name = f"psycopg-{style}"
        self.style = style
        self.conn = target.connect(**conninfo)
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.sqlstate or "?"))

    def run(self, sql: str) -> Outcome:
        self.notices.clear()
        cur = self.conn.cursor()
        error: psycopg.Error | None = None
        with Watchdog(self.conn.fileno(), STEP_TIMEOUT) as dog:
            try:
                if self.style == "pipeline":
                    with self.conn.pipeline():
                        cur.execute(sql)
                elif self.style == "prepared":
                    cur.execute(sql, prepare=True)
                else:
                    cur.execute(sql, binary=True)
            except psycopg.Error as e:
                error = e
        if dog.fired:
            raise AssertionError(f"{self.name}: no complete answer to {sql!r} within {STEP_TIMEOUT}s "
                                 f"(last error: {error!r})")
        status = _status_name(self.conn.info.transaction_status)
        if error is not None:
            return Outcome(f"ERROR {error.sqlstate}", status, None, list(self.notices),
                           error.diag.message_primary or str(error))
        value = None
        if cur.description is not None:
            row = cur.fetchone()
            value = None if row is None else str(row[0])
        return Outcome(cur.statusmessage or "", status, value, list(self.notices))

    def close(self) -> None:
        self.conn.close()


class Psycopg2Session(Session):
    """psycopg2 in autocommit mode: every statement goes as the application wrote it, in the
    simple query protocol."""
    name = "psycopg2"

    def __init__(self, target: harness.Target, **conninfo: Any) -> None:
        self.conn = target.connect2(**conninfo)
        self.conn.autocommit = True

    def run(self, sql: str) -> Outcome:
        import psycopg2
        before = len(self.conn.notices)
        cur = self.conn.cursor()
        error: Exception | None = None
        with Watchdog(self.conn.fileno(), STEP_TIMEOUT) as dog:
            try:
                cur.execute(sql)
            except psycopg2.Error as e:
                error = e
        if dog.fired:
            raise AssertionError(f"psycopg2: no complete answer to {sql!r} within {STEP_TIMEOUT}s ({error!r})")
        notices = []
        for text in self.conn.notices[before:]:
            primary = text.split(":", 1)[1].strip() if ":" in text else text.strip()
            notices.append(_PSYCOPG2_NOTICE_STATES.get(primary, "?"))
        status = _status_name(self.conn.info.transaction_status)
        if error is not None:
            return Outcome(f"ERROR {error.pgcode}", status, None, notices,
                           (error.diag.message_primary or str(error)))
        value = None
        if cur.description is not None:
            row = cur.fetchone()
            value = None if row is None else str(row[0])
        return Outcome(cur.statusmessage or "", status, value, notices)

    def close(self) -> None:
        self.conn.close()


_TAG = re.compile(r"^(?:[A-Z]+(?: [A-Z]+)*)(?: \d+)*$")


class PsqlSession(Session):
    """psql reading statements from a pipe, one at a time, in the simple query protocol.
    After each statement it echoes a marker with :SQLSTATE, so each answer is framed
    exactly; warnings arrive on the merged stderr as 'WARNING:  <sqlstate>'."""
    name = "psql"
    reports_status = False

    def __init__(self, target: harness.Target, user: str = "postgres", dbname: str = "postgres",
                 application_name: str | None = None) -> None:
        env = dict(os.environ, PGCONNECT_TIMEOUT="10")
        if application_name is not None:
            env["PGAPPNAME"] = application_name
        self.proc = subprocess.Popen(
            ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=sqlstate",
             "-h", target.host, "-p", str(target.port), "-U", user, "-d", dbname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.buffer = b""
        # Connected once the first marker comes back.
        self.run("SELECT 1", timeout=PSQL_START_TIMEOUT)

    def _read_segment(self, sql: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while not re.search(rb"@@ [^\n]*\n", self.buffer):
            remaining = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                self.proc.kill()
                raise AssertionError(f"psql: no complete answer to {sql!r} within {timeout}s; "
                                     f"output so far: {self.buffer!r}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"psql exited while running {sql!r}; output: {self.buffer!r}")
            self.buffer += chunk
        start = self.buffer.index(b"@@ ")
        end = self.buffer.index(b"\n", start)
        segment = self.buffer[:end].decode(errors="replace").splitlines()
        self.buffer = self.buffer[end + 1:]
        return segment

    def run(self, sql: str, timeout: float = STEP_TIMEOUT) -> Outcome:
        assert "\n" not in sql
        self.proc.stdin.write(f"{sql};\n\\echo @@ :SQLSTATE\n".encode())
        self.proc.stdin.flush()
        lines = self._read_segment(sql, timeout)
        sqlstate = lines.pop()[3:].strip()
        notices, rows = [], []
        for line in lines:
            match = re.match(r"^(WARNING|NOTICE|INFO):\s+(\S+)$", line)
            if match:
                notices.append(match.group(2))
            elif not line.startswith("ERROR:"):
                rows.append(line)
        if sqlstate != "00000":
            return Outcome(f"ERROR {sqlstate}", None, None, notices)
        if len(rows) == 1 and _TAG.match(rows[0]):
            return Outcome(rows[0], None, None, notices)
        return Outcome(f"SELECT {len(rows)}", None, rows[0] if rows else None, notices)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc.stdout.close()


# The clients every nesting scenario runs with: two in the simple protocol, two in the
# extended protocol (named prepared statements; pipeline mode with unnamed ones).
CLIENTS = ["psql", "psycopg2", "psycopg-prepared", "psycopg-pipeline"]


def open_session(kind: str, target: harness.Target, application_name: str | None = None) -> Session:
    if kind == "psql":
        return PsqlSession(target, application_name=application_name)
    extra = {} if application_name is None else {"application_name": application_name}
    if kind == "psycopg2":
        return Psycopg2Session(target, **extra)
    assert kind.startswith("psycopg-"), kind
    return PsycopgSession(target, kind.split("-", 1)[1], **extra)


# ---- scripts with expectations -----------------------------------------------------------


@dataclass
class Step:
    sql: str
    result: str                       # expected tag or "ERROR <sqlstate>"
    status: str | None = None         # expected transaction status (checked where the client reports it)
    value: str | None = None          # expected first value, for reads
    notices: tuple[str, ...] = ()     # expected notice SQLSTATEs, in order


@dataclass
class Checkpoint:
    """What a direct connection to PostgreSQL sees committed at this point of the script."""
    committed: list[int]


def run_script(session: Session, script: list, check_committed: Callable[[], list[int]]) -> list[str]:
    """Runs `script` (Steps and Checkpoints) and returns a list of mismatches, one line each,
    so that a failing test shows everything that went wrong, in order."""
    problems = []
    for index, item in enumerate(script):
        if isinstance(item, Checkpoint):
            seen = check_committed()
            if seen != item.committed:
                problems.append(f"#{index} committed (direct): expected {item.committed}, got {seen}")
            continue
        got = session.run(item.sql)
        where = f"#{index} {item.sql!r}"
        if got.result != item.result:
            problems.append(f"{where}: expected {item.result}, got {got.result} {got.message}".rstrip())
        if session.reports_status and item.status is not None and got.status != item.status:
            problems.append(f"{where}: transaction status expected {item.status}, got {got.status}")
        if item.value is not None and got.value != item.value:
            problems.append(f"{where}: value expected {item.value!r}, got {got.value!r}")
        if list(item.notices) != got.notices:
            problems.append(f"{where}: notices expected {list(item.notices)}, got {got.notices}")
    return problems
