"""`imagegen bench all --quick` as an SRE runs it: a subprocess in the loopback
namespace, on its own ports and state, running the cheapest benchmarks and the
suite's newest ones (naive, coldstart, batching) in their reduced mode. Each must
write its JSON with the expected keys and finite figures; no timing is asserted.
(The whole suite in reduced mode takes several minutes: README § Benchmarks.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from serve.cli.bench_all import numbers
from serve.config import ROOT

pytestmark = pytest.mark.serve

SELECTION = ("policy", "state", "batching", "coldstart", "naive")
ROUTING = {"tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


def _finite(doc) -> bool:
    xs = numbers(doc)
    return bool(xs) and all(math.isfinite(x) for x in xs)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, served_models, new_ports):
    if os.environ.get("LOOPBACK_NS") != "1":
        pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")
    tmp = tmp_path_factory.mktemp("bench")
    lock, models = served_models
    routing = tmp / "routing.yaml"
    routing.write_text(yaml.safe_dump(ROUTING))
    config = tmp / "imagegen.yaml"
    config.write_text(yaml.safe_dump({
        "lock_file": str(lock), "model_dir": str(models), "routing_file": str(routing),
        "state_url": f"sqlite://{tmp / 'state.db'}", "storage_url": f"file://{tmp / 'images'}",
        "image_classifier": "none", "threads": 1}))
    ports = new_ports()
    out = tmp / "out"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "xdg")}
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", "--config", str(config), "bench", "all", "--quick",
         "--out", str(out), "--only", *SELECTION, "--port", str(ports["port"]),
         "--grpc-port", str(ports["grpc_port"]), "--metrics-port", str(ports["metrics_port"])],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    return proc, out


def _doc(suite, name: str) -> dict:
    proc, out = suite
    path = out / f"{name}.json"
    assert path.exists(), proc.stdout + proc.stderr + (out / f"{name}.log").read_text()
    return json.loads(path.read_text())


def test_the_suite_exits_0_with_one_line_per_benchmark(suite):
    proc, out = suite
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in SELECTION:
        assert any(line.startswith(f"{name} ") and " ok " in line for line in lines), proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] and summary["failed"] == []
    assert [b["name"] for b in summary["benches"]] == list(SELECTION)
    assert "Traceback" not in proc.stderr


def test_naive_has_every_system_and_its_ratios(suite):
    doc = _doc(suite, "naive")
    assert [r["system"] for r in doc["rows"]] == ["in-process", "naive", "imagegen"]
    for row in doc["rows"][1:]:
        assert _finite(row["added_ms"]) and _finite(row["ratio"])
    assert set(doc["imagegen_vs_naive"]) == {"p50_ms_c1_minus_naive",
                                             "throughput_x_naive_c16"}
    assert _finite(doc["imagegen_vs_naive"]) and _finite(doc["samples"])
    assert {s["mean_batch"] for s in doc["samples"] if s["system"] == "naive"} == {1}


def test_coldstart_times_the_process_and_each_model_load(suite):
    doc = _doc(suite, "coldstart")
    med = doc["serve"]["median"]
    assert set(med) == {"to_starting_s", "to_healthz_s", "to_readyz_s", "stop_s"}
    assert _finite(med) and med["to_starting_s"] <= med["to_healthz_s"] <= med["to_readyz_s"]
    assert {r["model"] for r in doc["loads"]} == {"tiny-draft", "tiny-final", "tiny-spare"}
    assert doc["skipped"] == ["broken"]  # its files fail to load: reported, not measured
    for r in doc["loads"]:
        assert r["bytes"] > 0 and _finite(r)
        assert {"cold_s", "hot_s", "bound_cold_s", "bound_hot_s", "cold_x_bound",
                "hot_x_bound"} <= set(r)
    assert _finite(doc["read_bandwidth_mb_s"])


def test_batching_has_the_curve(suite):
    doc = _doc(suite, "batching")
    by = [(p["where"], p["batch"]) for p in doc["points"]]
    assert by == [("in-process", b) for b in (1, 2, 4, 8)]  # --quick: no stack rows
    for p in doc["points"]:
        assert _finite({k: v for k, v in p.items() if k != "profile_s_per_image"})
    first = [p for p in doc["points"] if p["batch"] == 1]
    assert all(p["x_first"] == 1.0 for p in first)


@pytest.mark.parametrize("name, keys", [("policy", {"terms", "compile_s", "rows", "render"}),
                                        ("state", {"keys", "backends"})])
def test_the_cheap_ones_write_their_figures(suite, name, keys):
    doc = _doc(suite, name)
    assert keys <= set(doc) and _finite(doc)
