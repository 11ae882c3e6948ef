"""The budget policy on real local Ray Serve: two deployments draw replicas from 3
fake GPUs (a custom resource); the higher priority wins them back, and the
replicas holding fake GPUs never exceed the budget. Runs in its own process with
its own Ray instance (the session stack's Serve is imperatively deployed; this app
is deployed through the Serve config, as a RayService would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.config import ROOT

pytestmark = pytest.mark.serve
HERE = Path(__file__).resolve().parent


def test_budget_policy_holds_replicas_under_the_cap_by_priority():
    if os.environ.get("LOOPBACK_NS") != "1":
        pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, str(HERE / "budget_run.py")], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(proc.stdout.splitlines())
                              if line.startswith('{"phase1"')))
    assert summary["phase1"]["lo"]["RUNNING"] == 2  # lo took the free GPU...
    assert summary["phase1"]["hi"]["RUNNING"] == 1
    final = summary["final"]
    assert final["hi"].get("RUNNING") == 2  # ...and gave it back to hi (priority 3)
    assert final["lo"].get("RUNNING") == 1 and "STOPPING" not in final["lo"]
    assert summary["peak"] <= 3, summary  # never beyond the 3 fake GPUs
