# Shared pieces of the statement-interception tests: the rules they run under, the tables
# they write, a stand-in for the rules made of triggers (so PGWARDEN_DIRECT=1 can prove the
# expectations against PostgreSQL itself), and clients that show every message or result.
from __future__ import annotations

import re
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

import harness
import pgwire

AUDIT_MESSAGE = "pgwarden: writes to audit are not allowed"
REPORTING_MESSAGE = "pgwarden: reporting is read-only"
SECRETS_MESSAGE = "pgwarden: icpt_secrets is off limits"
ITEMS_NOTICE = "pgwarden: icpt_items updated"
TOO_LARGE_MESSAGE = "pgwarden: statement too large"
MAX_STATEMENT_BYTES = 1024  # "1kB" below

# Rules in the order RulePolicy tries them: the first rejecting rule decides.
CONFIG = f"""
[proxy]
max_statement_bytes = "1kB"

[[rule]]
name = "no-audit-writes"
match = {{ statements = ["insert", "update", "delete"], tables = ["audit.*"] }}
action = "reject"
sqlstate = "42501"
message = "{AUDIT_MESSAGE}"

[[rule]]
name = "reporting-reads-only"
match = {{ application_name = ["reporting*"], statements = ["write"] }}
action = "reject"
sqlstate = "25006"
message = "{REPORTING_MESSAGE}"

[[rule]]
name = "no-secrets"
match = {{ tables = ["icpt_secrets"] }}
action = "reject"
message = "{SECRETS_MESSAGE}"

[[rule]]
name = "notice-item-updates"
match = {{ statements = ["update"], tables = ["public.icpt_items"] }}
action = "notice"
message = "{ITEMS_NOTICE}"

[[rule]]
name = "log-item-deletes"
match = {{ statements = ["delete"], tables = ["icpt_items"] }}
action = "log"
"""

SCHEMA_SQL = """
drop schema if exists audit cascade;
drop table if exists public.icpt_items, public.icpt_secrets;
drop function if exists public.icpt_items_rules();
create schema audit;
create table audit.log (id int);
create table public.icpt_items (id int);
create table public.icpt_secrets (id int);
insert into public.icpt_secrets values (7);
"""

# With PGWARDEN_DIRECT=1 the server stands in for pgwarden: statement-level BEFORE triggers
# raise what the rules would (same SQLSTATE, message and place in the statement sequence)
# for the statements the emulated tests send. Through pgwarden they are absent, so a
# statement pgwarden wrongly lets through shows up as a committed row, not a trigger error.
DIRECT_RULES_SQL = f"""
create function audit.icpt_reject() returns trigger language plpgsql as $$
begin
    raise exception using errcode = '42501', message = '{AUDIT_MESSAGE}';
end $$;
create trigger icpt_reject before insert or update or delete on audit.log
    for each statement execute function audit.icpt_reject();
create function public.icpt_items_rules() returns trigger language plpgsql as $$
begin
    if current_setting('application_name') like 'reporting%' then
        raise exception using errcode = '25006', message = '{REPORTING_MESSAGE}';
    end if;
    if tg_op = 'UPDATE' then
        raise notice using message = '{ITEMS_NOTICE}';  -- SQLSTATE 00000, as pgwarden sends
    end if;
    return null;
end $$;
create trigger icpt_items_rules before insert or update or delete on public.icpt_items
    for each statement execute function public.icpt_items_rules();
"""


def reset_schema(pg_server: harness.PostgresServer) -> None:
    with pg_server.connect() as conn:
        conn.execute(SCHEMA_SQL)
        if harness.direct_mode():
            conn.execute(DIRECT_RULES_SQL)


def committed(pg_server: harness.PostgresServer, table: str) -> list[int]:
    """The ids committed in `table`, seen from a direct connection to PostgreSQL."""
    return pg_server.query_one(f"select coalesce(array_agg(id order by id), '{{}}') from {table}")


def assert_healthy(target: harness.Target, *connections: psycopg.Connection) -> None:
    """`SELECT 1` still works on each connection, and pgwarden's log shows no mispredicted
    transaction state and no crashed session."""
    for conn in connections:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_clean_log(target)


def assert_clean_log(target: harness.Target) -> None:
    if not isinstance(target, harness.Pgwarden):
        return  # the server itself has no such log
    bad = [line for line in target.log_text().splitlines()
           if '"tx_state_mismatch"' in line or '"session_crashed"' in line]
    assert not bad, "pgwarden logged:\n" + "\n".join(bad)


def log_events(target: harness.Pgwarden, event: str) -> list[str]:
    return [line for line in target.log_text().splitlines() if f'"event":"{event}"' in line]


# ---------------------------------------------------------------------------------------------
# Raw protocol: every message, read fast enough for results of 10^5 rows.


@dataclass
class Message:
    kind: str
    body: bytes

    def error(self) -> dict[str, str]:
        return pgwire.error_fields(self.body)


def raw_session(target: harness.Target, **options: str) -> pgwire.RawConnection:
    raw = pgwire.RawConnection(target.host, target.port, timeout=20)
    result = raw.startup("postgres", **options)
    assert result.error is None, result.error
    return raw


def assert_runs_read(raw: pgwire.RawConnection, statement: str, value: bytes) -> None:
    """Binds `statement` to the unnamed portal and runs it: one row, ending in `value`."""
    raw.bind("", statement)
    raw.execute("")
    raw.sync()
    messages = read_until_ready(raw)
    assert summary(messages) == ["2", "D*1", "C", "Z:I"]
    assert messages[1].body.endswith(value)


def read_until_ready(raw: pgwire.RawConnection, count: int = 1) -> list[Message]:
    """Messages up to and including the `count`-th ReadyForQuery."""
    data = bytearray(raw._buffer)
    raw._buffer = b""
    messages: list[Message] = []
    offset = 0
    while True:
        while len(data) - offset >= 5:
            length = struct.unpack_from("!I", data, offset + 1)[0]
            if len(data) - offset < 1 + length:
                break
            kind = chr(data[offset])
            messages.append(Message(kind, bytes(data[offset + 5:offset + 1 + length])))
            offset += 1 + length
            if kind == "Z":
                count -= 1
                if count == 0:
                    raw._buffer = bytes(data[offset:])
                    return messages
        del data[:offset]
        offset = 0
        try:
            chunk = raw.sock.recv(1 << 20)
        except socket.timeout:
            raise AssertionError(f"no ReadyForQuery within the timeout; got {summary(messages)[-20:]}") from None
        if not chunk:
            raise AssertionError(f"connection closed; got {summary(messages)[-20:]}")
        data += chunk


def summary(messages: list[Message]) -> list[str]:
    """Message kinds, with the SQLSTATE of errors/notices and the status of ReadyForQuery,
    runs of DataRows collapsed: ["T", "D*3", "C", "E:42501", "Z:I"]."""
    out: list[str] = []
    for m in messages:
        if m.kind in "EN":
            label = f"{m.kind}:{m.error().get('C')}"
        elif m.kind == "Z":
            label = f"Z:{m.body.decode()}"
        else:
            label = m.kind
        if label == "D" and out and out[-1].startswith("D*"):
            out[-1] = f"D*{int(out[-1][2:]) + 1}"
        elif label == "D":
            out.append("D*1")
        else:
            out.append(label)
    return out


# ---------------------------------------------------------------------------------------------
# libpq in pipeline mode (libpq_pipeline.c)

LIBPQ_SOURCE = Path(__file__).with_name("libpq_pipeline.c")


def build_libpq_pipeline(directory: Path) -> Path:
    binary = directory / "libpq_pipeline"
    harness.run_checked(["cc", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(LIBPQ_SOURCE),
                         "-I/usr/include/postgresql", "-lpq"], timeout=120)
    return binary


def libpq_pipeline(binary: Path, target: harness.Target, *steps: str, timeout: float = 30,
                   **conninfo: str) -> list[str]:
    """Runs the steps (see libpq_pipeline.c) and returns its output lines."""
    conninfo.setdefault("sslmode", "disable")
    result = subprocess.run([str(binary), target.dsn(**conninfo), *steps], capture_output=True,
                            timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    lines = result.stdout.decode(errors="replace").splitlines()
    assert result.returncode == 0, f"libpq_pipeline exited {result.returncode}: {lines}\n{result.stderr!r}"
    return lines


# ---------------------------------------------------------------------------------------------
# psql running a script on one connection


def psql_script(target: harness.Target, script: str, **kw) -> tuple[list[str], list[str]]:
    """Runs `script` (errors do not stop it; terse messages) and returns (stdout lines,
    stderr ERROR/WARNING/NOTICE lines without psql's "psql:<stdin>:N: " prefix)."""
    result = harness.psql(target, "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=terse",
                          input=script.encode(), check=False, **kw)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    messages = []
    for line in result.stderr.decode(errors="replace").splitlines():
        found = re.search(r"(ERROR|WARNING|NOTICE):  .*", line)
        if found:
            messages.append(found.group(0))
    return result.stdout.decode(errors="replace").splitlines(), messages
