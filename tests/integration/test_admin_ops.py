# Operator-facing behaviour of pgwarden: the admin API (client list, bearer token, doom),
# config reload that refuses a broken file and keeps the running rules, and SIGTERM drain.
from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest

import harness
import pgwire
from nesting_util import committed_ids, create_table, metric

pytestmark = pytest.mark.proxy_only

TOKEN = "s3cret"
T = "admin_ops_t"


def http(instance: harness.Pgwarden, method: str, path: str, token: str | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{instance.host}:{instance.admin_port}{path}", method=method,
                                     data=body if body is not None else (b"" if method == "POST" else None))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def clients(instance: harness.Pgwarden, token: str | None = None) -> list[dict[str, Any]]:
    status, body = http(instance, "GET", "/api/clients", token)
    assert status == 200, body
    return json.loads(body)


def only_client(instance: harness.Pgwarden, application_name: str, token: str | None = None) -> dict[str, Any]:
    listed = [c for c in clients(instance, token) if c["application_name"] == application_name]
    assert len(listed) == 1, f"expected one session named {application_name!r}, got {listed}"
    return listed[0]


@pytest.fixture
def table(pg_server):
    return create_table(pg_server, T)


def test_clients_lists_transaction_and_token_guards_api(pgwarden_factory):
    proxy = pgwarden_factory(f'[admin]\ntoken = "{TOKEN}"\n')
    with proxy.connect(application_name="ops-lister") as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        listed = only_client(proxy, "ops-lister", TOKEN)
        assert listed["state"] == "in_transaction"
        assert listed["user"] == "postgres"
        assert listed["database"] == "postgres"
        assert isinstance(listed["id"], int)
        age = listed["transaction_age_seconds"]
        assert isinstance(age, (int, float)) and 0 <= age < 30, listed
        conn.execute("COMMIT")
        assert only_client(proxy, "ops-lister", TOKEN)["state"] != "in_transaction"

    for path in ("/api/clients", "/api/throttles"):
        assert http(proxy, "GET", path)[0] == 401
        assert http(proxy, "GET", path, "wrong")[0] == 401
        assert http(proxy, "GET", path, TOKEN)[0] == 200
    assert http(proxy, "POST", "/api/reload")[0] == 401
    # Scrapes and health checks stay open.
    assert http(proxy, "GET", "/metrics")[0] == 200
    assert http(proxy, "GET", "/healthz")[0] == 200


def test_doom_unknown_and_real_client(pgwarden_factory, pg_server, table):
    proxy = pgwarden_factory()
    assert http(proxy, "POST", "/api/clients/987654/doom")[0] == 404
    assert http(proxy, "POST", "/api/clients/abc/doom")[0] == 400
    with proxy.connect(application_name="ops-victim") as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {T} VALUES (1)")
        victim = only_client(proxy, "ops-victim")
        status, body = http(proxy, "POST", f"/api/clients/{victim['id']}/doom")
        assert status == 200, body
        assert only_client(proxy, "ops-victim")["doomed_reason"] is not None
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"INSERT INTO {T} VALUES (2)")
        assert refused.value.sqlstate == "25006"
        conn.execute("ROLLBACK")
    assert committed_ids(pg_server, T) == []


def reject_rule(name: str, table_name: str) -> str:
    return (f'[[rule]]\nname = "{name}"\nmatch = {{ statements = ["insert"], tables = ["{table_name}"] }}\n'
            f'action = "reject"\nsqlstate = "42501"\nmessage = "pgwarden: {name}"\n')


def test_reload_refuses_broken_file_then_applies_fixed_one(pgwarden_factory, pg_server, table):
    other = create_table(pg_server, "admin_ops_other")
    proxy = pgwarden_factory(reject_rule("first", T))

    def insert_sqlstate(conn: psycopg.Connection, table_name: str, n: int) -> str | None:
        try:
            conn.execute(f"INSERT INTO {table_name} VALUES ({n})")
        except psycopg.Error as e:
            return e.sqlstate
        return None

    with proxy.connect() as conn:
        assert insert_sqlstate(conn, T, 1) == "42501"
        failures_before = metric(proxy, "pgwarden_config_reloads_total", result="failure")

        proxy.config_path.write_text("[[rule]\nthis is = = not toml\n")
        status, body = http(proxy, "POST", "/api/reload")
        assert status != 200, body
        assert metric(proxy, "pgwarden_config_reloads_total", result="failure") == failures_before + 1
        assert insert_sqlstate(conn, T, 2) == "42501"
        assert insert_sqlstate(conn, other, 1) is None

        proxy.config_path.write_text(reject_rule("first", T) + reject_rule("second", other))
        status, body = http(proxy, "POST", "/api/reload")
        assert status == 200, body
        assert json.loads(body)["ok"] is True
        assert insert_sqlstate(conn, other, 2) == "42501"
        assert insert_sqlstate(conn, T, 3) == "42501"
    assert committed_ids(pg_server, T) == []
    assert committed_ids(pg_server, other) == [1]


def test_sigterm_drains_open_transaction_and_ends_idle_sessions(pgwarden_factory, pg_server, table):
    proxy = pgwarden_factory('[proxy]\nshutdown_timeout = "10s"\n')
    busy = proxy.connect(application_name="ops-busy")
    # A raw client sees the FATAL's fields; libpq drops the SQLSTATE of an unsolicited error.
    idle = pgwire.RawConnection(proxy.host, proxy.port, timeout=5)
    try:
        assert idle.startup("postgres", application_name="ops-idle").error is None
        busy.execute("BEGIN")
        busy.execute(f"INSERT INTO {T} VALUES (1)")

        proxy.signal(signal.SIGTERM)
        kind, payload = idle.read_message()
        assert kind == "E", (kind, payload)
        fields = pgwire.error_fields(payload)
        assert (fields.get("S"), fields.get("C")) == ("FATAL", "57P01"), fields
        assert idle.at_eof()

        proxy.connect_error(connect_timeout=3)

        busy.execute(f"INSERT INTO {T} VALUES (2)")
        busy.execute("COMMIT")
        assert committed_ids(pg_server, T) == [1, 2]
        assert proxy.proc is not None
        try:
            returncode = proxy.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("pgwarden still running 5 s after its last transaction committed")
        assert returncode == 0
    finally:
        busy.close()
        idle.close()
