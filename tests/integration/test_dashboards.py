# The shipped Grafana dashboards and provisioning files as Grafana would load them: schema
# fields, the datasource variable, unique panel ids, a layout without overlaps, and metric
# names that pgwarden registers. Needs neither a server nor a pgwarden binary.
from __future__ import annotations

import re

import pytest

import observability as obs

EXPECTED_DASHBOARDS = {"pgwarden-overview", "pgwarden-throttling", "pgwarden-transactions"}
# Grafana 10's schema; older Grafana refuses nothing below it, newer migrates it on load.
MIN_SCHEMA_VERSION = 36
GRID_COLUMNS = 24

DASHBOARDS = obs.load_dashboards()


def dashboard_ids() -> list[str]:
    return [path.name for path in DASHBOARDS]


@pytest.fixture(params=list(DASHBOARDS), ids=dashboard_ids())
def dashboard(request):
    return request.param, DASHBOARDS[request.param]


def test_the_three_dashboards_ship_with_unique_uids_and_titles():
    uids = [d.get("uid") for d in DASHBOARDS.values()]
    titles = [d.get("title") for d in DASHBOARDS.values()]
    assert set(uids) == EXPECTED_DASHBOARDS
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)


def test_dashboard_has_the_fields_grafana_needs(dashboard):
    path, d = dashboard
    assert isinstance(d.get("uid"), str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), path
    assert isinstance(d.get("title"), str) and d["title"].strip()
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= MIN_SCHEMA_VERSION
    assert isinstance(d.get("panels"), list) and d["panels"]
    assert isinstance(d.get("templating", {}).get("list"), list)
    assert "pgwarden" in d.get("tags", [])
    # Provisioned dashboards must not carry a database id: Grafana would try to overwrite it.
    assert d.get("id") is None


def test_datasource_is_a_template_variable_used_by_every_query(dashboard):
    path, d = dashboard
    by_name = {v.get("name"): v for v in obs.variables(d)}
    ds = by_name.get("datasource")
    assert ds is not None, f"{path.name}: no `datasource` template variable"
    assert ds.get("type") == "datasource" and ds.get("query") == "prometheus"

    def uses_variable(reference) -> bool:
        return isinstance(reference, dict) and reference.get("uid") in ("${datasource}", "$datasource")

    problems = []
    for panel in obs.all_panels(d):
        if not panel.get("targets"):
            continue
        if not uses_variable(panel.get("datasource")):
            problems.append(f"panel {panel.get('id')} {panel.get('title')!r}: datasource {panel.get('datasource')!r}")
        for target in panel["targets"]:
            if "datasource" in target and not uses_variable(target["datasource"]):
                problems.append(f"panel {panel.get('id')} target {target.get('refId')}: {target['datasource']!r}")
    for variable in obs.variables(d):
        if variable.get("type") == "query" and not uses_variable(variable.get("datasource")):
            problems.append(f"variable ${variable.get('name')}: datasource {variable.get('datasource')!r}")
    assert not problems, f"{path.name}: queries not bound to $datasource:\n" + "\n".join(problems)


def test_panel_ids_are_unique_and_targets_well_formed(dashboard):
    path, d = dashboard
    panels = obs.all_panels(d)
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids), f"{path.name}: panel ids {ids}"
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"{path.name}: duplicate panel ids {duplicates}"
    for panel in panels:
        assert panel.get("type") and panel.get("title"), f"{path.name}: panel {panel.get('id')} lacks type or title"
        if panel["type"] in ("row", "text"):
            continue
        targets = panel.get("targets", [])
        assert targets, f"{path.name}: panel {panel['id']} {panel['title']!r} has no query"
        ref_ids = [t.get("refId") for t in targets]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), f"{path.name}: panel {panel['id']} refIds {ref_ids}"
        assert all(t.get("expr", "").strip() for t in targets), f"{path.name}: panel {panel['id']} has an empty query"


def test_panels_fit_the_grid_without_overlapping(dashboard):
    path, d = dashboard
    taken: dict[tuple[int, int], int] = {}
    for panel in obs.all_panels(d):
        pos = panel.get("gridPos") or {}
        x, y, w, h = (pos.get(k) for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) for v in (x, y, w, h)), f"{path.name}: panel {panel.get('id')} gridPos {pos}"
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= GRID_COLUMNS, \
            f"{path.name}: panel {panel.get('id')} gridPos {pos}"
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = taken.setdefault((cx, cy), panel["id"])
                assert other == panel["id"], f"{path.name}: panels {other} and {panel['id']} overlap at {cx},{cy}"


def test_every_variable_a_query_uses_is_defined(dashboard):
    path, d = dashboard
    defined = {v.get("name") for v in obs.variables(d)} | set(obs.BUILTIN_VARIABLES)
    for query in obs.dashboard_queries(path, d):
        used = set(re.findall(r"\$\{?([A-Za-z0-9_]+)", query.expr))
        assert used <= defined, f"{query.where}: undefined variables {sorted(used - defined)} in {query.expr}"
        rendered = obs.substitute_variables(query.expr, d)
        assert "$" not in rendered, f"{query.where}: left unrendered: {rendered}"


def registered_metric_names() -> set[str]:
    """The names pgwarden registers, read from its source: the integration test checks the
    live /metrics page; this catches a typo without building anything."""
    names = set()
    for source in ("metrics/proxy_metrics.cpp", "metrics/process.cpp"):
        text = (obs.REPO / source).read_text()
        names |= set(re.findall(r'"((?:pgwarden|process)_[a-z0-9_]+)"', text))
    return names


def family(name: str, registered: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in registered:
            return name[: -len(suffix)]
    return name


def test_dashboards_read_only_metrics_pgwarden_registers(dashboard):
    path, d = dashboard
    registered = registered_metric_names()
    assert "pgwarden_statements_total" in registered  # the source layout this test reads
    problems = []
    for query in obs.dashboard_queries(path, d):
        names, patterns = obs.metric_names(obs.substitute_variables(query.expr, d))
        for name in names - obs.SYNTHETIC_METRICS:
            if family(name, registered) not in registered:
                problems.append(f"{query.where}: {name}")
        for pattern in patterns:
            if not any(re.fullmatch(pattern, n) for n in registered):
                problems.append(f"{query.where}: no metric matches {pattern!r}")
    assert not problems, "metrics pgwarden does not register:\n" + "\n".join(problems)


# What each dashboard is for, as metric names its panels must read.
REQUIRED_METRICS = {
    "pgwarden-overview": {"pgwarden_client_connections", "pgwarden_server_connections", "pgwarden_statements_total",
                          "pgwarden_statement_duration_seconds_bucket", "pgwarden_bytes_total"},
    "pgwarden-throttling": {"pgwarden_throttle_delayed_total", "pgwarden_throttle_rejected_total",
                            "pgwarden_throttle_delay_seconds_bucket", "pgwarden_throttle_delay_seconds_sum"},
    "pgwarden-transactions": {"pgwarden_transactions_total", "pgwarden_nested_begin_total",
                              "pgwarden_doomed_transactions_total", "pgwarden_doomed_writes_rejected_total",
                              "pgwarden_idle_transaction_rollbacks_total", "pgwarden_lint_findings_total"},
}


def test_each_dashboard_covers_its_subject(dashboard):
    path, d = dashboard
    exprs = [obs.substitute_variables(q.expr, d) for q in obs.dashboard_queries(path, d)]
    read = set().union(*(obs.metric_names(e)[0] for e in exprs))
    missing = REQUIRED_METRICS[d["uid"]] - read
    assert not missing, f"{path.name} never reads {sorted(missing)}"
    joined = "\n".join(exprs)
    if d["uid"] == "pgwarden-overview":
        assert re.search(r"histogram_quantile\(0\.99,.*pgwarden_statement_duration_seconds_bucket", joined)
        assert "sum by (kind)" in joined
    if d["uid"] == "pgwarden-throttling":
        assert "sum by (rule, client)" in joined and "sum by (rule)" in joined
    if d["uid"] == "pgwarden-transactions":
        for grouping in ("sum by (outcome)", "sum by (mode)", "sum by (reason)", "sum by (finding)"):
            assert grouping in joined, f"{path.name}: no panel {grouping}"


def test_metric_name_extraction_reads_what_prometheus_would():
    # The name checks above are only as good as this small lexer.
    names, patterns = obs.metric_names(
        'histogram_quantile(0.99, sum by (kind, le) (rate(a_bucket{job=~"x|y", kind!="le"}[5m] offset 1h)))'
        ' / on (kind) group_left (le) b_total > bool 3 and time() - c unless {__name__=~"d_.*"}')
    assert names == {"a_bucket", "b_total", "c"}
    assert patterns == ["d_.*"]


def test_grafana_provisioning_files_point_at_prometheus_and_the_dashboards():
    yaml = pytest.importorskip("yaml")
    datasources = yaml.safe_load((obs.PROVISIONING_DIR / "datasources" / "pgwarden.yml").read_text())
    assert datasources["apiVersion"] == 1
    [prometheus] = [ds for ds in datasources["datasources"] if ds["type"] == "prometheus"]
    assert prometheus["url"].startswith("http") and prometheus["access"] == "proxy"
    # $__rate_interval is derived from it; it must equal the shipped scrape interval.
    scrape = re.search(r"(?m)^\s*scrape_interval:\s*(\S+)", (obs.PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert prometheus["jsonData"]["timeInterval"] == scrape.group(1)

    providers = yaml.safe_load((obs.PROVISIONING_DIR / "dashboards" / "pgwarden.yml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
