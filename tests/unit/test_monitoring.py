"""The Grafana dashboard and PrometheusRule use only series the service exports,
with labels those series carry; the PodMonitor maps Ray's names to ours."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from serve.telemetry.metrics import CATALOGUE, RAY_NAMESPACE

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
# Labels Prometheus itself attaches to every scraped series (target labels) or
# that Ray adds per process; `le` belongs to histogram buckets.
SCRAPE_LABELS = {"pod", "namespace", "instance", "job", "container", "WorkerId", "NodeAddress"}
NAME = re.compile(r"\b(imagegen_[a-z0-9_]+)\b(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def series(name: str) -> tuple[str, set[str]]:
    """(catalogue name, labels it may carry) for an exported series name."""
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and base in CATALOGUE and CATALOGUE[base].kind == "histogram":
            extra = {"le"} if suffix == "_bucket" else set()
            return base, set(CATALOGUE[base].labels) | extra
    assert name in CATALOGUE, f"{name} is not a series the service exports"
    assert CATALOGUE[name].kind != "histogram", f"{name}: use _bucket/_count/_sum"
    return name, set(CATALOGUE[name].labels)


def check(expr: str) -> set[str]:
    names = NAME.findall(expr)
    assert names, expr
    allowed: set[str] = set(SCRAPE_LABELS)
    used = set()
    for name, selector in names:
        base, labels = series(name)
        used.add(base)
        allowed |= labels
        for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", selector):
            assert key in labels | SCRAPE_LABELS, f"{name} has no label {key!r} ({expr})"
    for group in GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in allowed, f"grouping by unknown label {label!r} in {expr}"
    return used


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_uses_exported_series(expr):
    check(expr)


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_uses_exported_series(rule):
    check(rule["expr"])
    assert rule["labels"]["severity"] in {"page", "warn"}
    assert rule["annotations"]["summary"]


def test_dashboard_and_alerts_cover_what_sres_asked_for():
    used = set().union(*map(check, dashboard_exprs()))
    alerts = {r["alert"] for r in rules()}
    assert {"imagegen_images_total", "imagegen_requests_total", "imagegen_cost_units_total",
            "imagegen_request_duration_seconds", "imagegen_gpu_memory_bytes",
            "imagegen_fallback_active", "imagegen_blocked_total",
            "imagegen_quota_units_total"} <= used
    assert {"ImagegenErrorRateSpike", "ImagegenDraftP95OverSLO", "ImagegenFinalP95OverSLO",
            "ImagegenGPUMemoryNearExhaustion", "ImagegenFallbackActiveTooLong",
            "ImagegenDeadLetterGrowth", "ImagegenQuotaRejectionsSpike"} <= alerts


def test_every_alert_has_a_runbook_line():
    readme = (MONITORING.parents[1] / "README.md").read_text()
    runbook = readme.split("**Runbook.**", 1)[1].split("\n## ", 1)[0]
    missing = [r["alert"] for r in rules() if f"*{r['alert']}" not in runbook]
    assert not missing, f"README § Operating, Runbook: no line for {missing}"


def test_podmonitor_gives_ray_exported_series_their_own_names():
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    (relabel,) = doc["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]
    pattern = re.compile(f"^(?:{relabel['regex']})$")  # Prometheus anchors regexes
    replacement = relabel["replacement"].replace("$1", r"\1")
    for name in CATALOGUE:
        exported = RAY_NAMESPACE + name
        assert pattern.sub(replacement, exported) == name
    assert not pattern.match("ray_serve_num_http_requests_total")
