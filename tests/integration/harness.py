# Integration-test harness: a throwaway PostgreSQL 15 server, pgwarden processes wired to it,
# and small helpers (psql, pgbench, backend and fd counts, bounded waits) the tests share.
from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("PGWARDEN_PG_BIN", "/usr/lib/postgresql/15/bin"))
# initdb refuses to run as root, so the server runs as this unprivileged account.
TEST_OS_USER = "pgwarden-test"
HOST = "127.0.0.1"

SCRAM_USER, SCRAM_PASSWORD = "scram_user", "scram_pw"
MD5_USER, MD5_PASSWORD = "md5_user", "md5_pw"
CLEARTEXT_USER, CLEARTEXT_PASSWORD = "cleartext_user", "cleartext_pw"  # hba method "password"

# Lines that mean a sanitizer caught something in the pgwarden process.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def direct_mode() -> bool:
    """PGWARDEN_DIRECT=1 points every `proxy` at the server itself, to prove the tests."""
    return os.environ.get("PGWARDEN_DIRECT", "") not in ("", "0")


def sanitized() -> bool:
    """True when pgwarden is the ASan/UBSan build (CTest sets PGWARDEN_SANITIZED=1)."""
    return os.environ.get("PGWARDEN_SANITIZED", "") not in ("", "0")


def scaled(normal: int, sanitized_count: int) -> int:
    """A load size: `normal`, or the smaller `sanitized_count` under the sanitizers."""
    return sanitized_count if sanitized() else normal


def keep_temp_dirs() -> bool:
    return os.environ.get("PGWARDEN_KEEP_TMP", "") not in ("", "0")


# Listening ports come from below the kernel's ephemeral range (32768-60999 by default): a
# port taken from that range can be handed to some outgoing connection between the moment
# it is picked and the moment the server binds it.
LISTEN_PORTS = (20000, 32000)
_taken: set[int] = set()  # handed out by this process already


def free_port() -> int:
    for _ in range(500):
        port = random.randint(*LISTEN_PORTS)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls `predicate` until it returns something truthy; fails after `timeout` seconds.

    Used only for state outside the test's control (server catalog, /proc), where there is
    no event to wait on."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def run(cmd: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, **kw)


def run_checked(cmd: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
    result = run(cmd, timeout=timeout, **kw)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        )
    return result


# ---------------------------------------------------------------------------------------------
# OS user and TLS material


def running_as_root() -> bool:
    return os.geteuid() == 0


def ensure_test_os_user() -> pwd.struct_passwd:
    """Creates the unprivileged server account once; parallel CTest runs race for it."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(TEST_OS_USER)
    with open("/tmp/pgwarden-test-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(TEST_OS_USER)
        run_checked(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                     "--shell", "/usr/sbin/nologin", TEST_OS_USER])
    return pwd.getpwnam(TEST_OS_USER)


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path      # for PostgreSQL; CN localhost, SAN localhost + 127.0.0.1
    server_key: Path
    proxy_cert: Path       # for pgwarden's client side; same names
    proxy_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A private CA and two leaf certificates for localhost/127.0.0.1, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    run_checked(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "3",
                 "-subj", "/CN=pgwarden integration test CA"])
    ext = directory / "leaf.ext"
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def leaf(name: str) -> tuple[Path, Path]:
        key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
        run_checked(["openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"])
        run_checked(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                     "-CAcreateserial", "-out", str(cert), "-days", "3", "-extfile", str(ext)])
        os.chmod(key, 0o600)
        return cert, key

    server_cert, server_key = leaf("server")
    proxy_cert, proxy_key = leaf("proxy")
    return TlsFiles(ca_cert, server_cert, server_key, proxy_cert, proxy_key)


# ---------------------------------------------------------------------------------------------
# Connection targets: the server itself, or a pgwarden in front of it. Tests only use
# host/port/dsn/connect, so either can stand where a "proxy" is expected.


class Target:
    host: str = HOST
    port: int = 0
    pid: int | None = None  # pgwarden's pid; None for the server itself

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **kw: Any) -> str:
        kw.setdefault("connect_timeout", 10)
        return make_conninfo(host=self.host, port=self.port, user=user, dbname=dbname, **kw)

    def connect(self, user: str = "postgres", dbname: str = "postgres", autocommit: bool = True,
                **kw: Any) -> psycopg.Connection:
        return psycopg.connect(self.dsn(user=user, dbname=dbname, **kw), autocommit=autocommit)

    def connect2(self, user: str = "postgres", dbname: str = "postgres", **kw: Any):
        """A psycopg2 connection (the libpq PQfn/large-object path)."""
        import psycopg2
        return psycopg2.connect(self.dsn(user=user, dbname=dbname, **kw))

    def connect_error(self, **kw: Any) -> str:
        """Asserts that connecting fails and returns libpq's message. The exception is dropped
        here so the failed PGconn (and any socket libpq still holds) is freed at once."""
        try:
            self.connect(**kw).close()
        except psycopg.OperationalError as e:
            return str(e)
        raise AssertionError(f"connecting with {kw} succeeded")

    def fd_count(self) -> int | None:
        return None if self.pid is None else len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_listing(self) -> list[str]:
        """What each open fd is (socket:[inode], pipe, file), for failure messages."""
        if self.pid is None:
            return []
        listing = []
        for fd in sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                listing.append(f"{fd} -> {os.readlink(f'/proc/{self.pid}/fd/{fd}')}")
        return listing


class PostgresServer(Target):
    """PostgreSQL 15 in a temp dir: trust for postgres, scram/md5 roles, TLS on, 200 connections."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pgwarden-it-pg-"))
        self.data = self.base / "data"
        self.log_path = self.base / "server.log"
        self.port = free_port()
        self.tls: TlsFiles | None = None
        self._started = False

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", TEST_OS_USER, "--", *cmd] if running_as_root() else cmd

    def start(self) -> None:
        if running_as_root():
            account = ensure_test_os_user()
            os.chown(self.base, account.pw_uid, account.pw_gid)
        os.chmod(self.base, 0o755)
        self.tls = make_tls_files(self.base / "tls")
        if running_as_root():
            for path in (self.tls.server_cert, self.tls.server_key):
                os.chown(path, account.pw_uid, account.pw_gid)
        for path in (self.tls.ca_cert, self.tls.server_cert, self.tls.proxy_cert, self.tls.proxy_key):
            os.chmod(path, 0o644 if path.suffix == ".crt" else 0o600)
        os.chmod(self.base / "tls", 0o755)

        run_checked(self._as_server_user([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                                          "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
                                          "--no-instructions"]), timeout=120)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"""
# pgwarden integration tests
listen_addresses = '{HOST}'
port = {self.port}
unix_socket_directories = '{self.base}'
max_connections = 200
ssl = on
ssl_cert_file = '{self.tls.server_cert}'
ssl_key_file = '{self.tls.server_key}'
ssl_ca_file = '{self.tls.ca_cert}'
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
""")
        # "host" lines match TLS and plain connections alike. The last line lets tests create
        # roles of their own (say, for policy matching) without touching this file.
        (self.data / "pg_hba.conf").write_text(f"""
local all all trust
host all postgres {HOST}/32 trust
host all {SCRAM_USER} {HOST}/32 scram-sha-256
host all {MD5_USER} {HOST}/32 md5
host all {CLEARTEXT_USER} {HOST}/32 password
host all all {HOST}/32 trust
""")
        for attempt in range(3):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                run_checked(self._as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                                                  str(self.log_path), "-w", "-t", "30", "start"]), timeout=40)
                break
            except RuntimeError:
                # Another process (a test file running alongside) took the port between
                # free_port() and the server's bind: try another, as Pgwarden.start does.
                lost_port = False
                if self.log_path.exists():
                    with open(self.log_path, "rb") as log:
                        log.seek(log_size)
                        lost_port = b"Address already in use" in log.read()
                if not lost_port or attempt == 2:
                    raise
                self.port = free_port()
                with open(self.data / "postgresql.conf", "a") as conf:
                    conf.write(f"port = {self.port}  # the one before was taken\n")
        self._started = True
        wait_until(self._accepts_queries, 30, "PostgreSQL to accept connections", interval=0.1)
        with self.connect() as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
            conn.execute("RESET password_encryption")
            conn.execute(f"CREATE ROLE {CLEARTEXT_USER} LOGIN PASSWORD '{CLEARTEXT_PASSWORD}'")
            conn.execute(f"GRANT ALL ON SCHEMA public TO {SCRAM_USER}, {MD5_USER}, {CLEARTEXT_USER}")

    def _accepts_queries(self) -> bool:
        try:
            with psycopg.connect(self.dsn(connect_timeout=2, sslmode="disable")) as conn:
                return conn.execute("select 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self._started:
            run(self._as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                      "-t", "30", "stop"]), timeout=40)
            self._started = False
        if not keep_temp_dirs():
            shutil.rmtree(self.base, ignore_errors=True)

    def connect(self, user: str = "postgres", dbname: str = "postgres", autocommit: bool = True,
                **kw: Any) -> psycopg.Connection:
        # Administrative connections skip TLS: cheaper, and they never test anything.
        kw.setdefault("sslmode", "disable")
        return super().connect(user=user, dbname=dbname, autocommit=autocommit, **kw)

    def query_one(self, sql: str, params: Any = None) -> Any:
        """First column of the first row (None without one); for statements without rows too."""
        with self.connect() as conn:
            cur = conn.execute(sql, params)
            if cur.description is None:
                return None
            row = cur.fetchone()
            return None if row is None else row[0]

    def client_backends(self, application_name: str | None = None) -> int:
        """Client backends other than the one asking."""
        sql = ("select count(*) from pg_stat_activity where backend_type = 'client backend'"
               " and pid <> pg_backend_pid()")
        if application_name is None:
            return self.query_one(sql)
        return self.query_one(sql + " and application_name = %s", (application_name,))

    def backend_pids(self, application_name: str, state: str | None = None) -> list[int]:
        sql = "select pid from pg_stat_activity where application_name = %s"
        params: list[Any] = [application_name]
        if state is not None:
            sql += " and state = %s"
            params.append(state)
        with self.connect() as conn:
            return [row[0] for row in conn.execute(sql, params)]


class DirectTarget(Target):
    """The server itself standing in for a pgwarden (PGWARDEN_DIRECT=1)."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self.port = server.port

    def stop(self) -> None:
        pass

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.server.log_path, lines)


def pgwarden_binary() -> Path:
    return Path(os.environ.get("PGWARDEN_BIN", REPO / "build" / "proxy" / "pgwarden"))


def io_mode() -> str:
    """How the pgwarden under test relays: "io_uring" (its default) or "epoll", chosen by
    PGWARDEN_TEST_IO so that CTest can run some areas a second time on the epoll path."""
    return os.environ.get("PGWARDEN_TEST_IO", "io_uring")


def with_io_mode(config_text: str) -> str:
    """The config with `[proxy] io_uring = false` added when the tests run on epoll."""
    if io_mode() != "epoll":
        return config_text
    lines = config_text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*\[proxy\]\s*(#.*)?", line):
            lines.insert(i + 1, "io_uring = false")
            return "\n".join(lines) + "\n"
    return "[proxy]\nio_uring = false\n" + config_text


class Pgwarden(Target):
    """One pgwarden process: a config file from text, free ports, its output in a log file."""

    def __init__(self, workdir: Path, upstream_port: int, config_text: str = "",
                 upstream: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "pgwarden.toml"
        self.config_path.write_text(with_io_mode(config_text))
        self.log_path = workdir / "pgwarden.log"
        self.upstream = upstream or f"{HOST}:{upstream_port}"
        self.extra_args = extra_args
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        return [str(pgwarden_binary()), "-c", str(self.config_path),
                "--listen", f"{HOST}:{self.port}", "--upstream", self.upstream,
                "--admin-listen", f"{HOST}:{self.admin_port}",
                "--log-format", "json", "--log-level", "debug", *self.extra_args]

    def start(self, wait: str | None = "query", timeout: float = 20) -> "Pgwarden":
        """wait: "query" (a `select 1` through it works), "tcp" (it accepts), or None."""
        binary = pgwarden_binary()
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"pgwarden binary {binary} missing; build it or set PGWARDEN_BIN")
        for attempt in range(3):
            self.port, self.admin_port = free_port(), free_port()
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            self.pid = self.proc.pid
            if wait is None:
                return self
            try:
                self.wait_ready(wait, timeout)
                return self
            except RuntimeError:
                # Another process took a port in the meantime: try others.
                with open(self.log_path, "rb") as log:
                    log.seek(log_size)
                    lost_port = b"Address already in use" in log.read()
                if not lost_port or self.alive() or attempt == 2:
                    raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, mode: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"pgwarden exited early with code {self.proc.returncode} (log: {self.log_path})")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                if mode == "tcp":
                    return
                # prefer: works whether pgwarden's client-side TLS is off, allowed or required.
                with psycopg.connect(self.dsn(connect_timeout=3, sslmode="prefer"), autocommit=True) as conn:
                    if conn.execute("select 1").fetchone() == (1,):
                        return
            except (OSError, psycopg.Error) as e:
                last_error = e
            time.sleep(0.05)
        raise RuntimeError(f"pgwarden not ready after {timeout}s (last error: {last_error}; log: {self.log_path})")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, bounded wait; asserts a clean exit and a sanitizer-clean log."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"pgwarden did not exit within {timeout}s of SIGTERM\n{self.log_tail()}")
        self.returncode = self.proc.returncode
        self.proc = None
        findings = self.sanitizer_findings()
        assert not findings, "sanitizer reports in pgwarden's output:\n" + "\n".join(findings)
        assert self.returncode == 0, f"pgwarden exited with {self.returncode} after SIGTERM\n{self.log_tail()}"

    def sanitizer_findings(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if any(m in line for m in SANITIZER_MARKERS)]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)


# ---------------------------------------------------------------------------------------------
# Command-line clients


def _client_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)  # PG* variables were cleared by conftest.py
    env["PGCONNECT_TIMEOUT"] = "10"
    env.update(extra or {})
    return env


def psql(target: Target, *args: str, sql: str | None = None, input: bytes | None = None,
         user: str = "postgres", dbname: str = "postgres", env: dict[str, str] | None = None,
         timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", target.host, "-p", str(target.port),
           "-U", user, "-d", dbname]
    if sql is not None:
        cmd += ["-c", sql]
    cmd += list(args)
    result = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=_client_env(env),
                            check=False, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"psql failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return result


def psql_popen(target: Target, *args: str, user: str = "postgres", dbname: str = "postgres",
               env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", target.host, "-p", str(target.port),
           "-U", user, "-d", dbname, *args]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_client_env(env))


def pgbench(target: Target, *args: str, dbname: str = "postgres", user: str = "postgres",
            timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["pgbench", "-h", target.host, "-p", str(target.port), "-U", user, *args, dbname]
    result = subprocess.run(cmd, capture_output=True, timeout=timeout, env=_client_env(None), check=False,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"pgbench failed ({result.returncode}):\n{result.stdout.decode(errors='replace')}\n"
                             f"{result.stderr.decode(errors='replace')}")
    return result
