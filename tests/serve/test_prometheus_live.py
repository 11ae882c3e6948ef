"""The monitoring in k8s/monitoring against the real thing: a real Prometheus scrapes
the session stack's Ray metrics endpoint with the PodMonitor's relabelling (read from
podmonitor.yaml, so a change to it is exercised), loads the PrometheusRule's groups,
and during a short load every dashboard query and every rule expression is evaluated
through its HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.serve

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
SCRAPE_S = 2  # the PodMonitor says 15 s; 2 s keeps the test short (Ray reports every 1 s here)
# Set only by a model replica on CUDA (serve/deployments/model.py): a CPU node has none.
GPU_METRICS = {"imagegen_gpu_memory_bytes"}
GPU_PANELS = {"GPU memory reserved / total"}
# Counters that appear only once something went wrong (Ray exports no 0): a healthy
# stack has no series for them, and an alert on them is rightly empty.
AFTER_A_FAULT = {
    "imagegen_routing_config_errors_total": "a routing document refused",
    "imagegen_policy_config_errors_total": "a prompt policy file refused",
    "imagegen_template_config_errors_total": "a style library change refused",
} | {m: "a CUDA device" for m in GPU_METRICS}
# What Grafana puts for its built-in variables; the dashboard's own are matched whole.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
# The PodMonitor's relabel fields and the Prometheus scrape config's names for them.
RELABEL_FIELDS = {"sourceLabels": "source_labels", "separator": "separator",
                  "targetLabel": "target_label", "regex": "regex", "modulus": "modulus",
                  "replacement": "replacement", "action": "action"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "scheme",
                   "relabelings", "metricRelabelings"}
SELECTOR = re.compile(r"\b(imagegen_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


@pytest.fixture(scope="session")
def prometheus_exe() -> str:
    """prometheus on PATH, looked up before the stack starts; on CI (CI=true) its
    absence fails, locally it skips."""
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("prometheus is not on PATH: .ci/run installs it (Debian package "
                        "prometheus)")
        pytest.skip("prometheus is not on PATH (CI installs it; locally: apt-get install "
                    "prometheus)")
    return path


def _relabel(rule: dict) -> dict:
    unknown = set(rule) - set(RELABEL_FIELDS)
    assert not unknown, f"podmonitor.yaml: relabel fields {unknown} not translated here"
    out = {RELABEL_FIELDS[k]: v for k, v in rule.items()}
    if "action" in out:  # the operator takes Replace, LabelDrop...; Prometheus lowercase
        out["action"] = out["action"].lower()
    return out


def scrape_config(metrics_port: int) -> dict:
    """The PodMonitor's endpoint as a Prometheus scrape job for the local stack, with
    the target labels the operator would attach (namespace, pod, container)."""
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    (endpoint,) = doc["spec"]["podMetricsEndpoints"]
    assert not set(endpoint) - ENDPOINT_FIELDS, set(endpoint) - ENDPOINT_FIELDS
    assert endpoint["port"] == "metrics"  # KubeRay's name for Ray's metrics export port
    labels = {"namespace": "imagegen", "pod": "imagegen-head", "container": "ray-head"}
    return {
        "job_name": doc["metadata"]["name"],
        "scrape_interval": f"{SCRAPE_S}s",
        "scrape_timeout": f"{SCRAPE_S}s",
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "honor_labels": endpoint.get("honorLabels", False),
        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": labels}],
        "relabel_configs": [_relabel(r) for r in endpoint.get("relabelings", [])],
        "metric_relabel_configs": [_relabel(r) for r in endpoint.get("metricRelabelings", [])],
    }


def rule_groups() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return doc["spec"]["groups"]


def panels(items: list[dict]):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))  # a row's collapsed panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target, Grafana's variables substituted."""
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    own = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    out = []
    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in GRAFANA_BUILTINS.items():
                expr = expr.replace(name, value)
            for name, var in own.items():
                if var.get("type") != "datasource":
                    expr = re.sub(rf"\$\{{?{name}\b\}}?|\[\[{name}\]\]", _value(var), expr)
            assert "$" not in expr, f"panel {p['title']!r}: unknown variable in {expr}"
            out.append((p["title"], expr))
    return out


def _value(var: dict) -> str:
    """A dashboard variable's saved value; All (or none saved) matches every value."""
    value = (var.get("current") or {}).get("value")
    values = value if isinstance(value, list) else [value]
    return ".*" if value is None or "$__all" in values else "|".join(map(str, values))


class Prometheus:
    """A real `prometheus` on a loopback port with its own temporary TSDB."""

    def __init__(self, exe: str, workdir: Path, port: int, metrics_port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        rules = workdir / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [scrape_config(metrics_port)],
        }, sort_keys=False))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.logfile = workdir / "prometheus.log"

    def wait_ready(self, deadline_s: float = 20) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"prometheus exited: {self.logfile.read_text()}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready: {self.logfile.read_text()}")

    def api(self, path: str, **params) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def error(self, expr: str) -> str | None:
        """What Prometheus says is wrong with `expr` (parse or evaluation), or None."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        return None if body["status"] == "success" else body["error"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(prometheus_exe, stack, stack_settings, new_ports, tmp_path):
    server = Prometheus(prometheus_exe, tmp_path, new_ports()["metrics_port"],
                        stack_settings["metrics_port"])
    try:
        server.wait_ready()
        _wait_until(lambda: [t for t in server.api("targets")["activeTargets"]
                             if t["health"] == "up"], 15, "the stack's metrics target up")
        yield server
    finally:
        server.stop()


def _wait_until(check, deadline_s: float, what: str):
    end = time.monotonic() + deadline_s
    while True:
        if got := check():
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"not within {deadline_s} s: {what}")
        time.sleep(0.5)


def drive_load(stack: str, headers: dict[str, str], nonce: str,
               late_batch: str) -> dict[str, int]:
    """A few dozen requests of every kind the dashboard shows, a batch, and the
    backdated batch `late_batch` ending; label -> status."""
    calls: list[tuple[str, dict, dict]] = []
    for i in range(16):
        calls.append((f"draft{i}", {"prompt": f"a heron {nonce} {i}", "seed": i,
                                    "n": 1 + i % 2}, headers))
    for i in range(4):
        calls.append((f"final{i}", {"prompt": f"a pier {nonce} {i}", "tier": "final",
                                    "seed": i}, headers))
    calls += [
        ("invalid", {"prompt": "x", "steps": 99}, headers),  # 422 limit_exceeded
        ("unauthenticated", {"prompt": "x"}, {}),  # 401
        ("blocked", {"prompt": "a n.u.d.e figure"}, headers),  # 403 prompt_blocked
        ("unavailable", {"prompt": "x", "tier": "broken"}, headers),  # 503 model_unavailable
    ]
    with httpx.Client(base_url=stack, timeout=60) as client:
        def post(call):
            label, body, h = call
            return label, client.post("/v1/images", json=body, headers=h).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = dict(pool.map(post, calls))
        hit = {"prompt": f"a heron {nonce} 0", "seed": 0, "n": 1}  # draft0 again: cached
        again = client.post("/v1/images", json=hit, headers=headers)
        assert again.status_code == 200 and again.json()["cached"], again.text
        batch = client.post("/v1/batches", headers=headers, json={"requests": [
            {"prompt": f"a gull {nonce} {i}", "seed": i} for i in range(2)]})
        assert batch.status_code == 200, batch.text
        for bid in (batch.json()["id"], late_batch):
            _wait_until(lambda bid=bid: client.get(f"/v1/batches/{bid}", headers=headers)
                        .json()["state"] != "running", 30, f"batch {bid} ended")
    return statuses


def backdated_batch(state_url: str, nonce: str) -> str:
    """A batch created two minutes ago with a one-minute window, straight in the
    queue (the API takes windows of 60 s and up): the workers run it now, so it ends
    late; its second item is out of the model's limits (the API would have refused
    it), so it dead-letters at once. The id of its dead item."""
    from serve.batch.queue import Batch, item_id, open_queue

    async def create() -> None:
        queue = open_queue(state_url)
        await queue.create(Batch(id=f"late_{nonce}", principal="tester",  # conftest's key
                                 created=time.time() - 120, completion_window_s=60),
                           [{"prompt": f"a tern {nonce}", "seed": 1},
                            {"prompt": f"a tern {nonce}", "seed": 2, "steps": 99}])
        await queue.close()

    asyncio.run(create())
    return item_id(f"late_{nonce}", 1)


def purge(state_url: str, item: str) -> None:
    from serve.batch.queue import open_queue

    async def run() -> None:
        queue = open_queue(state_url)
        await queue.purge([item])
        await queue.close()

    asyncio.run(run())


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for each series selector in `expr`."""
    return [(name, MATCHER.findall(sel or "")) for name, sel in SELECTOR.findall(expr)]


def test_dashboard_and_rules_evaluate_on_a_real_prometheus(prometheus, stack, auth_headers,
                                                           stack_settings):
    nonce = uuid.uuid4().hex[:8]  # no cache hits from earlier tests' requests
    dead = backdated_batch(stack_settings["state_url"], nonce)
    try:
        _check(prometheus, drive_load(stack, auth_headers, nonce, f"late_{nonce}"))
    finally:
        purge(stack_settings["state_url"], dead)  # out of the session's dead-letter queue


def _check(prom: Prometheus, statuses: dict[str, int]) -> None:
    assert {k: v for k, v in statuses.items() if v != 200} == {
        "invalid": 422, "unauthenticated": 401, "blocked": 403, "unavailable": 503}, statuses

    # The PodMonitor's relabelling ran: our names, none of Ray's prefixed ones, and
    # Ray's own series kept theirs.
    assert prom.query('count({__name__=~"imagegen_.+"})')
    assert not prom.query('count({__name__=~"ray_imagegen_.+"})')
    assert prom.query('count({__name__=~"ray_serve_.+"})')

    queries = dashboard_queries()
    rule_exprs = [(r.get("alert") or r["record"], r["expr"])
                  for g in rule_groups() for r in g["rules"]]
    invalid = [f"  {where!r}: {err}\n    {e}" for where, e in queries + rule_exprs
               if (err := prom.error(e))]
    assert not invalid, "queries Prometheus refuses:\n" + "\n".join(invalid)
    gpu = [(t, e) for t, e in queries if {m for m, _ in selectors(e)} & GPU_METRICS]
    # Named here, never found by emptiness; valid (above), no data on a CPU node.
    assert {t for t, _ in gpu} == GPU_PANELS, gpu
    need = [(t, e) for t, e in queries if t not in GPU_PANELS]
    empty = _poll_for_data(prom, [e for _, e in need], deadline_s=30)
    assert not empty, "dashboard queries without data:\n" + "\n".join(
        f"  {t!r}: {e}" for t, e in need if e in empty) + _scrapes(prom)

    problems = [p for group in rule_groups() for rule in group["rules"]
                for p in _rule_problems(prom, rule)]
    assert not problems, "\n".join(problems) + _scrapes(prom)
    _assert_prometheus_evaluated_every_rule(prom)
    _assert_alerts_fire_as_they_should(prom)


def _poll_for_data(prom: Prometheus, exprs: list[str], deadline_s: float) -> set[str]:
    """The exprs still without data at the deadline (every rate() needs two samples
    after the load)."""
    end = time.monotonic() + deadline_s
    empty = set(exprs)
    while empty:
        empty = {e for e in empty if not prom.query(e)}
        if not empty or time.monotonic() > end:
            break
        time.sleep(1)
    return empty


def _scrapes(prom: Prometheus) -> str:
    """For a failure's message: how the scrapes went."""
    def one(expr: str) -> str:
        got = prom.query(expr)
        return got[0]["value"][1] if got else "none"

    return (f"\n(scrapes in the last 5 min: {one('sum_over_time(up[5m])')} up of "
            f"{one('count_over_time(up[5m])')}, slowest "
            f"{one('max_over_time(scrape_duration_seconds[5m])')} s)")


def seen(prom: Prometheus, selector: str) -> bool:
    """Whether the selector had a sample in the last 5 minutes (an instant query
    would miss a series over one late scrape, marked stale)."""
    return bool(prom.query(f"last_over_time({selector}[5m])"))


def _rule_problems(prom: Prometheus, rule: dict) -> list[str]:
    """An alert may be empty (healthy) but each series it reads must exist, with the
    labels it matches on, unless it only appears after a fault; a recording rule must
    return data."""
    name = rule.get("alert") or rule["record"]
    result = prom.query(rule["expr"])  # status success: it parses and evaluates
    metrics = {m for m, _ in selectors(rule["expr"])}
    if "record" in rule:
        return [] if result or metrics & set(AFTER_A_FAULT) else [f"{name}: no data"]
    problems = []
    for metric, matchers in selectors(rule["expr"]):
        if metric in AFTER_A_FAULT:
            continue
        sel = metric + ("{" + ",".join(f'{k}{op}"{v}"' for k, op, v in matchers) + "}"
                        if matchers else "")
        if seen(prom, sel):
            continue
        if not seen(prom, metric):
            problems.append(f"{name}: no series {metric}")
            continue
        for label, _, _ in matchers:
            if not seen(prom, f'{metric}{{{label}!=""}}'):
                problems.append(f"{name}: {metric} has no label {label!r}")
    return problems


def _assert_prometheus_evaluated_every_rule(prom: Prometheus) -> None:
    want = {r.get("alert") or r["record"] for g in rule_groups() for r in g["rules"]}

    def evaluated():
        got = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
        return got if set(got) == want and all(
            r["health"] != "unknown" for r in got.values()) else None

    got = _wait_until(evaluated, 10, "Prometheus evaluated every rule")
    bad = {n: r.get("lastError") for n, r in got.items() if r["health"] != "ok"}
    assert not bad, bad


def _assert_alerts_fire_as_they_should(prom: Prometheus) -> None:
    """The backdated batch's dead letter and late end fire their alerts (neither has
    a `for`); a tier on its fallback (the stack's `broken` tier) does not fire the
    30-minute alert on a Prometheus a minute old."""
    def firing() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]
                if a["state"] == "firing"}

    want = {"ImagegenDeadLetterGrowth", "ImagegenBatchWindowMissed"}
    got = _wait_until(lambda: firing() if want <= firing() else None, 15,
                      f"{want} firing")
    if prom.query("max_over_time(imagegen_fallback_active[5m]) == 1"):
        assert "ImagegenFallbackActiveTooLong" not in got
