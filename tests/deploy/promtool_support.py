"""The PrometheusRule as promtool reads it, and its rule tests.

promtool takes a plain rules file (`groups:`), not the operator's custom resource,
so `spec.groups` of k8s/monitoring/prometheusrule.yaml is written out as
`rules.yaml` beside copies of the rule tests in k8s/monitoring/tests/, which load it
by that name. By hand (from the repository root):

    .venv/bin/python tests/deploy/promtool_support.py    # check rules, then test rules
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULE_TESTS = MONITORING / "tests"
RULES_NAME = "rules.yaml"  # what every rule test's `rule_files` names


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true")


def rule_groups() -> list[dict]:
    """spec.groups of the PrometheusRule."""
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule", doc["kind"]
    return doc["spec"]["groups"]


def rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"]]


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS.glob("*.yaml"))


def stage(into: Path) -> Path:
    """Write rules.yaml and copy the rule tests into `into`; return the rules file."""
    into.mkdir(parents=True, exist_ok=True)
    out = into / RULES_NAME
    out.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    for f in rule_test_files():
        shutil.copy(f, into / f.name)
    return out


def promtool(exe: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def main() -> int:
    exe = shutil.which("promtool")
    if exe is None:
        print("promtool is not on PATH (Debian: apt-get install prometheus)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="imagegen-rules-") as tmp:
        here = Path(tmp)
        stage(here)
        for args in (("check", "rules", RULES_NAME),
                     ("test", "rules", *(f.name for f in rule_test_files()))):
            run = promtool(exe, *args, cwd=here)
            sys.stdout.write(run.stdout + run.stderr)
            if run.returncode:
                return run.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
