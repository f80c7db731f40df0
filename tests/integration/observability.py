# What the observability tests share: the shipped dashboards and alert rules, the PromQL in
# them with Grafana's variables filled in, the metric names that PromQL reads, and a parser
# for pgwarden's /metrics page.
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "configs" / "grafana" / "dashboards"
PROVISIONING_DIR = REPO / "configs" / "grafana" / "provisioning"
PROMETHEUS_DIR = REPO / "configs" / "prometheus"
SYSTEMD_UNIT = REPO / "configs" / "systemd" / "pgwarden.service"

# What Grafana puts in place of its built-in variables when the tests evaluate a query.
# The windows are long enough to hold several 1 s scrapes of a Prometheus started moments ago.
BUILTIN_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

# Series Prometheus makes itself for every target; dashboards and alerts may read them.
SYNTHETIC_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                     "scrape_samples_post_metric_relabeling", "scrape_series_added"}

# Words in PromQL that look like metric names but are not.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}


@dataclass
class Query:
    where: str  # "dashboard.json: panel 'title' (id 3) target A", for failure messages
    expr: str   # as written, with variables
    kind: str   # "panel" or "variable"


def load_dashboards() -> dict[Path, dict]:
    return {path: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])


def variable_query_text(variable: dict) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else str(query)


def label_values_selector(query: str) -> str | None:
    """The series selector in Grafana's `label_values(SELECTOR, label)`, as PromQL."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query, re.S)
    return match.group(1) if match else None


def dashboard_queries(path: Path, dashboard: dict) -> list[Query]:
    """Every PromQL expression the dashboard runs: panel targets and query variables."""
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(Query(f"{path.name}: panel {panel.get('title')!r} (id {panel.get('id')}) "
                                     f"target {target.get('refId')}", target["expr"], "panel"))
    for variable in variables(dashboard):
        if variable.get("type") != "query":
            continue
        text = variable_query_text(variable)
        selector = label_values_selector(text)
        queries.append(Query(f"{path.name}: variable ${variable.get('name')}", selector or text, "variable"))
    return queries


def substitute_variables(expr: str, dashboard: dict) -> str:
    """Grafana's rendering of `expr` with every dashboard variable set to "All" (its
    allValue) and the built-ins to fixed windows. Unknown variables are left as they are,
    so Prometheus rejects the query and the test names it."""
    values = dict(BUILTIN_VARIABLES)
    for variable in variables(dashboard):
        if variable.get("type") == "query":
            values[variable["name"]] = variable.get("allValue") or ".*"

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|\$([A-Za-z0-9_]+)", replace, expr)


def metric_names(expr: str) -> tuple[set[str], list[str]]:
    """The metric names a PromQL expression reads, and the regexes of any
    {__name__=~"..."} selectors. A small lexer, enough for the expressions we ship: string
    literals, label matchers, range and subquery brackets, grouping clauses and function
    calls are taken out before what is left is read as names."""
    name_patterns = re.findall(r'__name__\s*=~\s*"((?:[^"\\]|\\.)*)"', expr)
    exact_names = re.findall(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"', expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set(exact_names)
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        # Durations after `offset` (5m) start with a digit and never match; so do numbers.
        names.add(word)
    return names, name_patterns


@dataclass
class Exposition:
    families: dict[str, str]     # family name -> type, from # TYPE lines
    sample_names: set[str]       # names that have at least one sample line
    text: str

    def family_of(self, name: str) -> str | None:
        """The family a sample name belongs to (histograms add _bucket, _sum, _count)."""
        if name in self.families:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base and self.families.get(base) == "histogram":
                return base
        return None

    def has_samples(self, name: str) -> bool:
        return name in self.sample_names


def parse_exposition(text: str) -> Exposition:
    families: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind.strip()
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return Exposition(families, samples, text)


def prometheus_test_config(scrape_target: str, rules_path: Path) -> str:
    """The shipped prometheus.yml with a 1 s scrape and rule interval, pointed at a test's
    pgwarden. Each edit must apply exactly once: if the shipped file changes shape, the
    test says so instead of testing something else."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    edits = [
        (r"(?m)^(\s*scrape_interval:\s*)15s\b", r"\g<1>1s"),
        (r"(?m)^(\s*evaluation_interval:\s*)15s\b", r"\g<1>1s"),
        (r'"127\.0\.0\.1:9187"', f'"{scrape_target}"'),
        (r"(?m)^(\s*-\s*)alerts\.yml\s*$", rf"\g<1>{rules_path}"),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise AssertionError(f"prometheus.yml: expected one match of {pattern!r}, found {count}")
    return text


def alert_names_in_file() -> list[str]:
    return re.findall(r"(?m)^\s*-\s*alert:\s*(\S+)\s*$", (PROMETHEUS_DIR / "alerts.yml").read_text())
