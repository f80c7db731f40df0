# What the write-throttling tests share: [[throttle]] config text, the admin API and metrics
# as numbers, the rate-limit error as fields, and committed rows seen from the server itself.
from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

import psycopg

import harness

REJECT_SQLSTATE = "53400"
REJECT_MESSAGE = "pgwarden: write rate limit exceeded"
HTTP_TIMEOUT = 10


def throttle_rule(name: str, **fields: Any) -> str:
    """One [[throttle]] table. Strings are quoted, dicts become inline tables, lists arrays."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))
    lines = ["[[throttle]]", f"name = {value(name)}"]
    lines += [f"{key} = {value(v)}" for key, v in fields.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Admin listener


def admin_url(proxy: harness.Pgwarden, path: str) -> str:
    return f"http://{harness.HOST}:{proxy.admin_port}{path}"


def admin_get(proxy: harness.Pgwarden, path: str) -> str:
    with urllib.request.urlopen(admin_url(proxy, path), timeout=HTTP_TIMEOUT) as response:
        return response.read().decode()


def admin_post(proxy: harness.Pgwarden, path: str) -> dict:
    request = urllib.request.Request(admin_url(proxy, path), data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return json.loads(response.read().decode())


def throttles(proxy: harness.Pgwarden) -> dict[str, dict]:
    """GET /api/throttles, by rule name."""
    return {rule["name"]: rule for rule in json.loads(admin_get(proxy, "/api/throttles"))}


def bucket_levels(proxy: harness.Pgwarden, rule: str) -> dict[str, float]:
    """Tokens each bucket of `rule` holds now (negative: owed), by bucket key."""
    return {b["key"]: b["tokens"] for b in throttles(proxy)[rule]["buckets"]}


_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(proxy: harness.Pgwarden, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` on /metrics, as (labels, value)."""
    samples = []
    for line in admin_get(proxy, "/metrics").splitlines():
        found = _SAMPLE.match(line)
        if found and found.group(1) == name:
            labels = dict(_LABEL.findall(found.group(2) or ""))
            samples.append((labels, float(found.group(3))))
    return samples


def metric(proxy: harness.Pgwarden, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 without any)."""
    return sum(value for have, value in metric_samples(proxy, name)
               if all(have.get(k) == v for k, v in labels.items()))


def metric_label_values(proxy: harness.Pgwarden, name: str, label: str) -> set[str]:
    return {labels[label] for labels, _ in metric_samples(proxy, name) if label in labels}


def wait_for_metric(proxy: harness.Pgwarden, name: str, at_least: float, timeout: float = 10,
                    **labels: str) -> float:
    return harness.wait_until(lambda: (v := metric(proxy, name, **labels)) >= at_least and v, timeout,
                              f"{name}{labels} >= {at_least}", interval=0.02)


# ---------------------------------------------------------------------------------------------
# The rate-limit error


@dataclass
class Rejection:
    sqlstate: str | None
    message: str | None
    detail: str | None
    hint: str | None

    @property
    def retry_after_ms(self) -> int:
        found = re.fullmatch(r"retry after (\d+) ms", self.hint or "")
        assert found, f"hint {self.hint!r} is not 'retry after N ms'"
        return int(found.group(1))

    def assert_rate_limited(self, rule: str, client: str) -> None:
        assert (self.sqlstate, self.message, self.detail) == (
            REJECT_SQLSTATE, REJECT_MESSAGE, f"rule {rule}, client {client}"), self
        assert self.retry_after_ms >= 1


def rejection_of(error: psycopg.Error) -> Rejection:
    diag = error.diag
    return Rejection(diag.sqlstate, diag.message_primary, diag.message_detail, diag.message_hint)


def expect_rejection(action: Callable[[], Any]) -> Rejection:
    """Runs `action`, which must fail with a server-side error; returns that error's fields."""
    try:
        action()
    except psycopg.errors.DatabaseError as e:
        return rejection_of(e)
    raise AssertionError("the statement succeeded; expected an error")


# ---------------------------------------------------------------------------------------------
# Tables, seen from a direct connection


def create_table(pg_server: harness.PostgresServer, table: str) -> None:
    with pg_server.connect() as conn:
        conn.execute(f"drop table if exists {table}")
        conn.execute(f"create table {table} (id int, who text)")


def committed_ids(pg_server: harness.PostgresServer, table: str, who: str | None = None) -> list[int]:
    """Ids committed in `table` (optionally those written by `who`), in order."""
    where = "" if who is None else " where who = %s"
    return pg_server.query_one(f"select coalesce(array_agg(id order by id), '{{}}') from {table}{where}",
                               None if who is None else (who,))


def timed(action: Callable[[], Any]) -> float:
    """Seconds `action` took."""
    start = time.monotonic()
    action()
    return time.monotonic() - start
