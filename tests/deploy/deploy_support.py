"""What the tests/deploy modules share (imported by name: a module called `conftest`
would be another folder's when pytest collects tests/unit first)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")


def build(kubectl: str, path: Path) -> list[dict]:
    """`kubectl kustomize PATH` as a list of objects."""
    run = subprocess.run([kubectl, "kustomize", str(path)], check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]
