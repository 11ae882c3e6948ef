"""A short soak against the session stack (`imagegen loadtest --profile soak
--watch`): after its warm-up no process of the stack grows past 5% RSS, leaves files
or sockets open, or piles up Ray objects. README § Load testing has the long one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.serve


def test_a_short_soak_over_every_transport_leaks_nothing(stack, api_key, stack_settings,
                                                         tmp_path):
    out = tmp_path / "soak"
    env = {**os.environ, "IMAGEGEN_API_KEY": api_key}
    # The stack runs in this process's tree (local.start): watch it from here.
    cmd = [sys.executable, "-m", "serve.cli", "loadtest", "--host", stack,
           "--grpc-target", f"127.0.0.1:{stack_settings['grpc_port']}", "--metrics-url",
           f"http://127.0.0.1:{stack_settings['metrics_port']}/metrics", "--profile", "soak",
           "--users", "4", "--duration", "40", "--warmup", "15", "--watch", str(os.getpid()),
           "--transport", "mix", "--max-n", "2", "--quiet", "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                         check=False)
    soak = json.loads((out / "soak.json").read_text())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert soak["ok"] and not soak["problems"]
    names = " ".join(p["name"] for p in soak["processes"])
    # the stack's processes were seen, and the watch did not watch itself
    assert "raylet" in names and "ServeReplica:imagegen:Ingress" in names
    assert "tiny-draft" in names and "locust" not in names
    report = json.loads((out / "report.json").read_text())
    assert report["requests"] > 20 and report["failures"] == 0
    assert (out / "soak.png").read_bytes().startswith(b"\x89PNG")
