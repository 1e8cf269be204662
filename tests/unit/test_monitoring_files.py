"""The monitoring files in infra/ are well formed and name only metrics voteflow
(or the Redis exporter the deployments run) exports.

Prometheus and Grafana take a rule or a panel that names a metric nobody
exports and show nothing: a renamed metric would silently mute an alert or
empty a panel. These checks need no Prometheus; promtool, when installed,
checks the files as Prometheus will load them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.metrics import EdgeMetrics
from tests.support import REPO
from voteflow.settings import WORKER_METRICS_PORTS, Settings
from workers.metrics import WorkerMetrics

INFRA = REPO / "infra"
CONFIG = INFRA / "prometheus" / "prometheus.yml"
RULES = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "voteflow.json"
PROVISIONING = INFRA / "grafana" / "provisioning"
JOBS = {"voteflow-edge", "voteflow-worker", "redis"}
# The series of oliver006/redis_exporter (job "redis") the rules read: INFO's
# used_memory and maxmemory, and whether it reached Redis.
REDIS_EXPORTER = {"redis_up", "redis_memory_used_bytes", "redis_memory_max_bytes"}
REDIS_EXPORTER_PORT = 9121
SEVERITIES = {"critical", "warning"}

# The series prometheus-client writes for one metric family, by its type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# PromQL's functions and aggregations, and the keywords a parenthesis may follow.
PROMQL_CALLS = frozenset((
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes",
    "clamp", "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "group",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "limitk", "limit_ratio",
    "ln", "log10", "log2", "mad_over_time", "max", "max_over_time", "min", "min_over_time",
    "minute", "month", "predict_linear", "present_over_time", "quantile", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sgn", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar", "stdvar_over_time", "sum",
    "sum_over_time", "time", "timestamp", "topk", "vector", "year", "acos", "acosh", "asin",
    "asinh", "atan", "atanh", "cos", "cosh", "deg", "pi", "rad", "sin", "sinh", "tan", "tanh",
    "double_exponential_smoothing", "info", "by", "without", "on", "ignoring", "group_left",
    "group_right", "bool", "and", "or", "unless", "atan2",
))  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_JOB = re.compile(r'\bjob\s*(=~|=)\s*"([^"]*)"')
_NAME_IN_TEXT = re.compile(r"\bvoteflow_[a-z0-9_]+")


def exported_names() -> set[str]:
    """Every series name the edge and the workers can write, Prometheus's
    ``up``, and the Redis exporter's series the rules use."""
    names = {"up", *REDIS_EXPORTER}
    for metrics in (EdgeMetrics(), WorkerMetrics()):
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def metric_families() -> set[str]:
    """The names prose uses for metrics: a histogram by its own name, say."""
    return {
        family.name
        for metrics in (EdgeMetrics(), WorkerMetrics())
        for family in metrics.registry.collect()
    }


def _bare(expr: str) -> str:
    """The expression without string literals, label matchers and ranges, where
    names that are not metrics hide (a route or a Grafana variable)."""
    return _RANGE.sub("", _MATCHERS.sub("", _STRING.sub('""', expr)))


def referenced_metrics(expr: str) -> set[str]:
    return {
        name
        for name in _IDENT.findall(_bare(expr))
        if name.startswith(("voteflow_", "redis_")) or name == "up"
    }


def problems(expr: str, exported: set[str], jobs: set[str]) -> list[str]:
    """What is wrong with one PromQL expression, as far as can be told without Prometheus."""
    found = [f"{name} is not exported" for name in sorted(referenced_metrics(expr) - exported)]
    if not referenced_metrics(expr):
        found.append("names no voteflow metric")
    found += [
        f"unknown function {name}"
        for name in _CALL.findall(_bare(expr))
        if name not in PROMQL_CALLS
    ]
    unquoted = _STRING.sub('""', expr)
    for opening, closing in ("()", "[]", "{}"):
        if unquoted.count(opening) != unquoted.count(closing):
            found.append(f"unbalanced {opening}{closing}")
    for operator, value in _JOB.findall(expr):
        named = value.split("|") if operator == "=~" else [value]
        found += [f"job {job!r} is not scraped" for job in named if job not in jobs]
    return sorted(set(found))


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"]]


def _flatten(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _flatten(panel.get("panels", []))  # a collapsed row holds its panels


def panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [panel for panel in _flatten(dashboard["panels"]) if panel.get("type") != "row"]


def scrape_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in _load_yaml(CONFIG)["scrape_configs"]}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names()


def test_the_checker_reports_a_metric_nobody_exports(exported: set[str]) -> None:
    expr = 'sum(rate(voteflow_votes_acepted_total{route="/voteflow_fake"}[$__rate_interval]))'
    assert problems(expr, exported, JOBS) == ["voteflow_votes_acepted_total is not exported"]
    assert problems("sum(rate(voteflow_votes_accepted_total[5m]))", exported, JOBS) == []
    assert "voteflow_http_request_seconds_bucket" in exported
    assert "voteflow_http_requests_total" in exported  # labelled, so no sample before use
    assert problems('up{job="voteflow-edges"} == 0', exported, JOBS) == [
        "job 'voteflow-edges' is not scraped"
    ]
    assert problems("histogram_quantil(0.95, voteflow_batch_size_bucket)", exported, JOBS) == [
        "unknown function histogram_quantil"
    ]


def test_scrape_config_has_every_job_on_its_default_port() -> None:
    config = _load_yaml(CONFIG)
    jobs = scrape_jobs()
    assert set(jobs) == JOBS
    defaults = Settings()
    ports = {
        "voteflow-edge": defaults.port,
        # One worker per host (container) in these deployments: the range's first.
        "voteflow-worker": WORKER_METRICS_PORTS[0],
        "redis": REDIS_EXPORTER_PORT,
    }
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for static in job["static_configs"] for t in static["targets"]]
        assert targets, name
        assert all(target.endswith(f":{ports[name]}") for target in targets), (name, targets)
    assert [CONFIG.parent / path for path in config["rule_files"]] == [RULES]


def test_every_alert_rule_names_exported_metrics(exported: set[str]) -> None:
    known = exported | metric_families()
    for rule in rules():
        assert problems(rule["expr"], exported, JOBS) == [], rule["alert"]
        for text in rule["annotations"].values():
            named = {name for name in _NAME_IN_TEXT.findall(text) if name not in known}
            assert not named, (rule["alert"], named)


def test_every_alert_rule_has_a_duration_a_severity_and_a_summary() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_cover_what_operators_are_paged_for() -> None:
    exprs = " ".join(rule["expr"] for rule in rules())
    for name in (
        "voteflow_http_requests_total",
        "voteflow_http_request_seconds_bucket",
        "voteflow_stream_backlog",
        "voteflow_dead_letters_total",
        "voteflow_end_to_end_lag_seconds_bucket",
    ):
        assert name in referenced_metrics(exprs), name
    down = {rule["expr"] for rule in rules() if referenced_metrics(rule["expr"]) == {"up"}}
    assert {job for expr in down for _, job in _JOB.findall(expr)} == JOBS


def test_an_alert_fires_before_redis_reaches_maxmemory_and_when_it_has_none() -> None:
    by_metrics = [
        (rule, referenced_metrics(rule["expr"]))
        for rule in rules()
        if "redis_memory_max_bytes" in referenced_metrics(rule["expr"])
    ]
    thresholds = []
    for rule, names in by_metrics:
        if names == {"redis_memory_used_bytes", "redis_memory_max_bytes"}:
            # used / max, dividing only where a maxmemory is set.
            match = re.fullmatch(
                r"redis_memory_used_bytes / \(redis_memory_max_bytes > 0\) > (0\.\d+)",
                rule["expr"].strip(),
            )
            assert match, rule["alert"]
            thresholds.append((float(match.group(1)), rule["labels"]["severity"]))
    # A warning well before full, then a page just before full.
    assert sorted(thresholds) == [(0.8, "warning"), (0.95, "critical")]
    assert any(rule["expr"].strip() == "redis_memory_max_bytes == 0" for rule, _ in by_metrics)


def test_the_checker_reports_a_redis_exporter_series_it_does_not_know(
    exported: set[str],
) -> None:
    assert problems("redis_memory_maxx_bytes > 0", exported, JOBS) == [
        "redis_memory_maxx_bytes is not exported"
    ]


def test_every_dashboard_panel_has_a_title_and_queries_exported_metrics(
    exported: set[str],
) -> None:
    found = panels()
    assert found
    for panel in found:
        assert panel.get("title", "").strip(), panel.get("id")
        targets = panel.get("targets", [])
        assert targets, panel["title"]
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert problems(target["expr"], exported, JOBS) == [], (panel["title"], target)
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_imports_on_any_grafana() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["id"] is None  # an id would overwrite another dashboard on import
    assert dashboard["uid"] == "voteflow"
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = (v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ids = [panel["id"] for panel in _flatten(dashboard["panels"])]
    assert len(ids) == len(set(ids))


def test_provisioning_loads_the_dashboard_from_a_file() -> None:
    (datasource,) = _load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True  # what the dashboard's variable starts on
    (provider,) = _load_yaml(PROVISIONING / "dashboards" / "voteflow.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


@pytest.mark.parametrize(
    "args",
    [("check", "rules", str(RULES)), ("check", "config", str(CONFIG))],
    ids=["rules", "config"],
)
def test_promtool_accepts_the_prometheus_files(args: tuple[str, ...]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not on PATH (Debian package 'prometheus'); "
            "the metric-name checks in this file ran without it"
        )
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
