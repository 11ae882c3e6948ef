"""`imagegen loadtest` as an SRE runs it (a subprocess running locust headless)
against the session's stack: a 10-second smoke over HTTP, the OpenAI route and gRPC
exits 0 with no failure and writes its report; an SLO no stack can meet (p95 under
1 ms) exits 1. Figures are read from locust's --json-file output (its final CSV can
miss the last second); no timing is asserted beyond the impossible bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.serve


@pytest.fixture
def loadtest(stack, stack_settings, api_key, tmp_path):
    env = {**os.environ, "IMAGEGEN_API_KEY": api_key}

    def run(*args: str, out: str) -> tuple[subprocess.CompletedProcess, dict, list]:
        proc = subprocess.run(
            [sys.executable, "-m", "serve.cli", "loadtest", "--host", stack, "--grpc-target",
             f"127.0.0.1:{stack_settings['grpc_port']}", "--out", str(tmp_path / out),
             "--quiet", *args],
            check=False, capture_output=True, text=True, timeout=90, env=env)
        folder = tmp_path / out
        report = json.loads((folder / "report.json").read_text()) if (
            folder / "report.json").exists() else {}
        stats = json.loads((folder / "stats.json").read_text()) if (
            folder / "stats.json").exists() else []
        return proc, report, stats

    run.folder = tmp_path
    return run


def test_smoke_over_every_transport_passes_and_writes_its_report(loadtest):
    proc, report, stats = loadtest("--profile", "smoke", "--transport", "mix", "--users", "3",
                                   "--mix", "draft=2,final=1", out="smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stats and sum(e["num_failures"] for e in stats) == 0
    by_type = {}
    for e in stats:
        by_type[e["method"]] = by_type.get(e["method"], 0) + e["num_requests"]
    assert set(by_type) == {"HTTP", "OpenAI", "gRPC"} and all(n > 0 for n in by_type.values())
    assert {e["name"] for e in stats} <= {"draft", "final", "draft 429", "draft 503",
                                          "final 429", "final 503"}
    assert report["ok"] and report["failures"] == 0
    assert report["requests"] == sum(e["num_requests"] for e in stats)
    png = loadtest.folder / "smoke" / "loadtest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (loadtest.folder / "smoke" / "locust_stats_history.csv").exists()
    assert "SLO met" in proc.stdout and "Traceback" not in proc.stderr


def test_an_impossible_slo_fails_the_run(loadtest):
    proc, report, stats = loadtest("--profile", "smoke", "--duration", "3", "--mix", "draft=1",
                                   "--slo-p95-draft-ms", "1", out="impossible")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sum(e["num_requests"] for e in stats) > 0
    assert sum(e["num_failures"] for e in stats) == 0  # every request answered: only the SLO
    (p95,) = [c for c in report["checks"] if c["what"] == "p95_ms[draft]"]
    assert not p95["ok"] and p95["measured"] > 1 and not report["ok"]
    assert "MISSED p95_ms[draft]" in proc.stdout
