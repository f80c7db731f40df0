# The operator-facing artefacts against the real thing: pgwarden's /metrics after a small
# workload passes `promtool check metrics`; the shipped Prometheus config and alert rules
# pass promtool; a real Prometheus scrapes pgwarden and every dashboard and alert query
# evaluates there and reads only metrics pgwarden exports; the systemd unit verifies.
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

import harness
import observability as obs

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
HTTP_TIMEOUT = 10  # seconds for one request to pgwarden's admin listener or Prometheus

# Names the workload's series carry, so they show up as label values.
OBSERVED_CONFIG = """
[metrics]
max_clients = 10

[[throttle]]
name = "obs-flood"
match = { application_name = "obs-flood" }
statements = ["insert"]
rate = 0.01
burst = 1
action = "reject"

[[rule]]
name = "obs-ddl-log"
match = { statements = ["ddl"] }
action = "log"
"""


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def scrape(proxy: harness.Pgwarden) -> str:
    status, body = http_get(f"http://{harness.HOST}:{proxy.admin_port}/metrics")
    assert status == 200, f"/metrics answered {status}: {body[:500]}"
    return body


def run_workload(proxy: harness.Target) -> None:
    """Selects, inserts, an update, a committed and a rolled-back transaction, a nested
    BEGIN, an error, parameters, psql, and writes a throttle may refuse."""
    table = f"obs_items_{uuid.uuid4().hex[:8]}"
    harness.psql(proxy, sql="select 1", env={"PGAPPNAME": "obs-psql"})
    with proxy.connect(application_name="obs-app") as conn:
        conn.execute(f"create table {table} (id int primary key, note text)")
        conn.execute(f"insert into {table} values (1, 'a'), (2, 'b')")
        conn.execute(f"update {table} set note = 'c' where id = 2")
        assert conn.execute(f"select count(*) from {table}").fetchone() == (2,)
        assert conn.execute(f"select note from {table} where id = %s", (2,)).fetchone() == ("c",)
        with conn.transaction():
            conn.execute(f"insert into {table} values (3, 'd')")
        conn.execute("begin")
        conn.execute(f"insert into {table} values (4, 'e')")
        conn.execute("rollback")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1 / 0")
        assert conn.execute(f"select count(*) from {table}").fetchone() == (3,)
    with proxy.connect(application_name="obs-nested") as conn:
        conn.execute("begin")
        conn.execute("begin")  # nested: PostgreSQL warns, pgwarden counts it
        conn.execute("commit")
    with proxy.connect(application_name="obs-flood") as conn:
        for row_id in (10, 11, 12):
            # The second and third may be refused by the throttle; how is not tested here.
            try:
                conn.execute(f"insert into {table} values (%s, 'flood')", (row_id,))
            except psycopg.Error:
                pass
    with proxy.connect(application_name="obs-app") as conn:
        conn.execute(f"drop table {table}")


@pytest.fixture
def observed(pgwarden_factory) -> harness.Pgwarden:
    """A pgwarden that has carried the workload."""
    proxy = pgwarden_factory(OBSERVED_CONFIG)
    run_workload(proxy)
    return proxy


# ---------------------------------------------------------------------------------------------
# promtool on the exposition, the rules and the config


@pytest.mark.proxy_only
def test_metrics_page_after_a_workload_passes_promtool(observed):
    page = scrape(observed)
    exposition = obs.parse_exposition(page)
    # The page is not trivially valid: it carries the workload's series.
    assert re.search(r'^pgwarden_statements_total\{kind="select",client="obs-app"\} [1-9]', page, re.M), page
    assert re.search(r'^pgwarden_statements_total\{kind="insert",client="obs-app"\} [1-9]', page, re.M)
    assert re.search(r'^pgwarden_bytes_total\{direction="client_to_server"\} [1-9]', page, re.M)
    assert exposition.families.get("pgwarden_statement_duration_seconds") == "histogram"
    assert exposition.has_samples("process_cpu_seconds_total")

    result = harness.run([PROMTOOL, "check", "metrics"], input=page.encode(), timeout=60)
    assert result.returncode == 0, (
        f"promtool check metrics exited {result.returncode}:\n{result.stdout.decode()}{result.stderr.decode()}")


def test_alert_rules_pass_promtool():
    result = harness.run([PROMTOOL, "check", "rules", str(obs.PROMETHEUS_DIR / "alerts.yml")])
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(obs.alert_names_in_file())} rules found" in output


def test_alert_rules_cover_what_operators_must_hear_about():
    text = (obs.PROMETHEUS_DIR / "alerts.yml").read_text()
    for needed in ("pgwarden_throttle_rejected_total", "pgwarden_doomed_transactions_total",
                   'up{job="pgwarden"} == 0', "pgwarden_upstream_connect_errors_total",
                   "pgwarden_nested_begin_total", 'result="failure"'):
        assert needed in text, f"alerts.yml has no rule on {needed}"
    names = obs.alert_names_in_file()
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"


def test_prometheus_config_passes_promtool(tmp_path: Path):
    # The shipped file as is (its rule file resolves next to it), and the test's edited copy.
    shutil.copy(obs.PROMETHEUS_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(obs.PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    copy = tmp_path / "test-prometheus.yml"
    copy.write_text(obs.prometheus_test_config("127.0.0.1:19187", tmp_path / "alerts.yml"))
    for config in (tmp_path / "prometheus.yml", copy):
        result = harness.run([PROMTOOL, "check", "config", str(config)])
        output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, f"{config.name}:\n{output}"
        assert "SUCCESS: 1 rule files found" in output, output


# ---------------------------------------------------------------------------------------------
# A real Prometheus scraping a real pgwarden


class Prometheus:
    """A throwaway Prometheus in a temp dir, on a free loopback port."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "prometheus.log"
        self.port = harness.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{harness.HOST}:{self.port}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address={harness.HOST}:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{harness.tail(self.log_path)}")
            try:
                return http_get(f"{self.url}/-/ready")[0] == 200
            except OSError:
                return False

        harness.wait_until(ready, timeout, "Prometheus to be ready", interval=0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return {"status": "error", "error": f"HTTP {status}: {body[:300]}"}

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def scalar(self, expr: str) -> float | None:
        """The value of a query that returns at most one sample."""
        answer = self.query(expr)
        result = answer.get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if answer.get("status") == "success" and result else None


@pytest.fixture
def prometheus_factory(tmp_path_factory):
    started: list[Prometheus] = []

    def start(config_text: str) -> Prometheus:
        instance = Prometheus(tmp_path_factory.mktemp("prometheus"), config_text)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.stop()


def check_query(prometheus: Prometheus, where: str, expr: str, exposition: obs.Exposition,
                expect_data: bool) -> list[str]:
    """Problems with one expression: an evaluation error, a metric pgwarden does not export,
    or no result although every metric it reads has series."""
    problems = []
    answer = prometheus.query(expr)
    if answer.get("status") != "success":
        return [f"{where}: {answer.get('errorType', '')} {answer.get('error')}\n    {expr}"]
    names, patterns = obs.metric_names(expr)
    exported = True
    for name in sorted(names - obs.SYNTHETIC_METRICS):
        if exposition.family_of(name) is None:
            problems.append(f"{where}: reads {name}, which pgwarden's /metrics does not export\n    {expr}")
        exported = exported and exposition.has_samples(name)
    for pattern in patterns:
        matching = [n for n in exposition.sample_names | set(exposition.families) if re.fullmatch(pattern, n)]
        if not matching:
            problems.append(f"{where}: no exported metric matches {pattern!r}\n    {expr}")
        exported = exported and any(exposition.has_samples(n) for n in matching)
    if expect_data and exported and not problems and not answer["data"]["result"]:
        problems.append(f"{where}: no data although every metric it reads has series (a label typo?)\n    {expr}")
    return problems


@pytest.mark.proxy_only
def test_every_dashboard_and_alert_query_evaluates_in_prometheus(observed, prometheus_factory, tmp_path: Path):
    rules_copy = tmp_path / "alerts.yml"
    shutil.copy(obs.PROMETHEUS_DIR / "alerts.yml", rules_copy)
    prometheus = prometheus_factory(
        obs.prometheus_test_config(f"{harness.HOST}:{observed.admin_port}", rules_copy))

    # A few scrapes, so that rate() over the dashboards' windows has two samples or more.
    try:
        harness.wait_until(lambda: prometheus.scalar('min(up{job="pgwarden"})') == 1, 60,
                           "Prometheus to scrape pgwarden successfully")
    except AssertionError as e:
        targets = prometheus.api("targets").get("data", {}).get("activeTargets", [])
        raise AssertionError(f"{e}\ntargets: {[(t.get('scrapeUrl'), t.get('lastError')) for t in targets]}") from None
    harness.wait_until(lambda: (prometheus.scalar('min(count_over_time(up{job="pgwarden"}[1m]))') or 0) >= 3, 60,
                       "three scrapes of pgwarden")
    # Every alert rule evaluated at least once.
    never = "0001-01-01T00:00:00Z"

    def rules() -> list[dict]:
        groups = prometheus.api("rules").get("data", {}).get("groups", [])
        return [rule for group in groups for rule in group["rules"]]

    harness.wait_until(lambda: rules() and all(r.get("lastEvaluation", never) != never for r in rules()), 60,
                       "every alert rule to be evaluated")

    exposition = obs.parse_exposition(scrape(observed))
    problems: list[str] = []

    loaded = rules()
    assert sorted(r["name"] for r in loaded) == sorted(obs.alert_names_in_file())
    for rule in loaded:
        where = f"alerts.yml: {rule['name']}"
        if rule.get("health") != "ok" or rule.get("lastError"):
            problems.append(f"{where}: health {rule.get('health')}: {rule.get('lastError')}")
        # Alerts compare against thresholds, so an empty result is the normal, quiet case.
        problems += check_query(prometheus, where, rule["query"], exposition, expect_data=False)

    dashboards = obs.load_dashboards()
    assert dashboards
    evaluated = 0
    for path, dashboard in dashboards.items():
        for query in obs.dashboard_queries(path, dashboard):
            expr = obs.substitute_variables(query.expr, dashboard)
            problems += check_query(prometheus, query.where, expr, exposition, expect_data=True)
            evaluated += 1
    assert evaluated > 30  # all three dashboards were read
    assert not problems, (f"{len(problems)} problems:\n" + "\n".join(problems) +
                          f"\n\nPrometheus log ({prometheus.log_path}):\n{harness.tail(prometheus.log_path, 20)}")


# ---------------------------------------------------------------------------------------------
# systemd


def test_systemd_unit_notifies_reloads_and_outlasts_the_shutdown_timeout(tmp_path: Path):
    text = obs.SYSTEMD_UNIT.read_text()
    settings = re.findall(r"(?m)^([A-Za-z]+)=(.*)$", text)
    values = {}
    for key, value in settings:
        values.setdefault(key, []).append(value.strip())
    assert values["Type"] == ["notify"]
    assert values["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert values["KillSignal"] == ["SIGTERM"]
    # Longer than the default [proxy] shutdown_timeout (30s), so draining is not cut short.
    stop = re.fullmatch(r"(\d+)s", values["TimeoutStopSec"][0])
    assert stop and int(stop.group(1)) > 30

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists the executables exist; point them at the one the tests use.
    copy = tmp_path / "pgwarden.service"
    copy.write_text(text.replace("/usr/local/bin/pgwarden", str(harness.pgwarden_binary().resolve())))
    if not os.access(harness.pgwarden_binary(), os.X_OK):
        copy.write_text(text.replace("/usr/local/bin/pgwarden", "/bin/true"))
    result = harness.run([analyze, "verify", str(copy)], timeout=60)
    output = (result.stdout.decode() + result.stderr.decode()).strip()
    assert result.returncode == 0 and not output, output
