"""The PrometheusRule through promtool: its groups are valid rules, and every alert
fires on a synthetic bad series and stays quiet on a healthy one
(k8s/monitoring/tests/, promtool's rule-test files)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from promtool_support import RULES_NAME, on_ci, promtool, rule_test_files, rules, stage


@pytest.fixture(scope="module")
def promtool_exe() -> str:
    """promtool on PATH; on CI (CI=true) its absence fails, locally it skips."""
    path = shutil.which("promtool")
    if path is None:
        if on_ci():
            pytest.fail("promtool is not on PATH: .ci/run installs it (Debian package "
                        "prometheus)")
        pytest.skip("promtool is not on PATH (CI installs it; locally: apt-get install "
                    "prometheus)")
    return path


@pytest.fixture
def staged(tmp_path):
    stage(tmp_path)
    return tmp_path


def test_promtool_checks_the_rule_groups(promtool_exe, staged):
    run = promtool(promtool_exe, "check", "rules", RULES_NAME, cwd=staged)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules())} rules found" in run.stdout, run.stdout


def test_promtool_rule_tests_pass(promtool_exe, staged):
    run = promtool(promtool_exe, "test", "rules", *(f.name for f in rule_test_files()),
                   cwd=staged)
    assert run.returncode == 0, run.stdout + run.stderr


def cases() -> dict[str, dict[str, list[str]]]:
    """alert -> {"firing": [test names], "quiet": [test names]} over every rule test."""
    out: dict[str, dict[str, list[str]]] = {}
    for f in rule_test_files():
        doc = yaml.safe_load(f.read_text())
        # Each file must test the PrometheusRule itself, not a rules file of its own.
        assert doc["rule_files"] == [RULES_NAME], f"{f.name}: rule_files {doc['rule_files']}"
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                kind = "firing" if case.get("exp_alerts") else "quiet"
                where = f"{f.name}: {test.get('name', '?')} @ {case['eval_time']}"
                out.setdefault(case["alertname"], {"firing": [], "quiet": []})[kind].append(where)
    return out


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    found = cases()
    assert not set(found) - alerts, f"rule tests name unknown alerts: {set(found) - alerts}"
    missing = {a: [k for k in ("firing", "quiet") if not found.get(a, {}).get(k)]
               for a in sorted(alerts)}
    missing = {a: kinds for a, kinds in missing.items() if kinds}
    assert not missing, f"alerts without a promtool case in k8s/monitoring/tests/: {missing}"

