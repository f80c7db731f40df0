# What the fault-injection and "nothing lost" tests share: PostgreSQL killed and started
# again on the same port and data directory, pgwarden restarted on the same ports, the
# admin health checks as status codes, and pgwarden's memory and fds read from /proc.
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import harness

HTTP_TIMEOUT = 5


# ---- admin health checks -----------------------------------------------------------------


def admin_status(instance: harness.Pgwarden, path: str) -> int:
    """HTTP status of GET `path` on pgwarden's admin listener."""
    url = f"http://{instance.host}:{instance.admin_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def admin_get(instance: harness.Pgwarden, path: str) -> str:
    url = f"http://{instance.host}:{instance.admin_port}{path}"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.read().decode()


def wait_readyz(instance: harness.Pgwarden, status: int, timeout: float) -> None:
    harness.wait_until(lambda: admin_status(instance, "/readyz") == status, timeout,
                       f"/readyz to answer {status}", interval=0.05)


# ---- pgwarden's process, from /proc ------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def restart_on_same_ports(instance: harness.Pgwarden, timeout: float = 20) -> None:
    """SIGTERM (asserting a clean exit, as the fixture's teardown does), then the same binary,
    config and log file again on the same listen and admin ports, so clients reconnect to
    the address they know. Harness.Pgwarden.start() would pick new ports."""
    port, admin_port = instance.port, instance.admin_port
    instance.stop()
    instance.port, instance.admin_port = port, admin_port
    with open(instance.log_path, "ab") as log:
        instance.proc = subprocess.Popen(instance.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
    instance.pid = instance.proc.pid
    instance.wait_ready("query", timeout)


# ---- PostgreSQL killed and brought back ---------------------------------------------------


def postmaster_pid(server: harness.PostgresServer) -> int:
    """The first line of postmaster.pid."""
    return int((server.data / "postmaster.pid").read_text().splitlines()[0])


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the postmaster's backends and auxiliary processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; ppid follows the state.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_postmaster(server: harness.PostgresServer) -> tuple[float, list[int]]:
    """SIGKILL to the postmaster, as the OOM killer would send it. Returns the monotonic time
    of the kill and the pids of the processes it left (its backends, which notice the
    postmaster's death and exit on their own)."""
    pid = postmaster_pid(server)
    orphans = children_of(pid)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return killed_at, orphans


def wait_gone(pids: list[int], timeout: float) -> None:
    """Waits until every one of `pids` has exited; SIGKILLs the stragglers after `timeout`
    (a backend that holds the old shared memory would stop the new postmaster from starting)
    and then fails, naming them."""
    try:
        harness.wait_until(lambda: not any(alive(p) for p in pids), timeout,
                           "the killed postmaster's processes to exit")
    except AssertionError:
        stragglers = [p for p in pids if alive(p)]
        for p in stragglers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"processes of the killed postmaster still alive after {timeout}s: {stragglers}")


def start_postgres_again(server: harness.PostgresServer, timeout: float = 30) -> None:
    """pg_ctl start on the same data directory (and so the same port); crash recovery runs
    first. The server's session fixture stops it as usual afterwards."""
    # The killed postmaster may linger as a zombie (a container's init need not reap it);
    # its pid still "exists", so the new postmaster would refuse to start over the lock file.
    # Both lock files (data directory and Unix socket) name it.
    for lock in (server.data / "postmaster.pid", server.base / f".s.PGSQL.{server.port}.lock"):
        if lock.exists() and not alive(int(lock.read_text().splitlines()[0])):
            lock.unlink()
    harness.run_checked(server._as_server_user([str(harness.PG_BIN / "pg_ctl"), "-D", str(server.data),
                                                 "-l", str(server.log_path), "-w", "-t", str(int(timeout)),
                                                 "start"]), timeout=timeout + 10)
    harness.wait_until(server._accepts_queries, timeout, "PostgreSQL to accept connections again", interval=0.1)
