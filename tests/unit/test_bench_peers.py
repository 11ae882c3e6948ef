"""`imagegen bench serve --peers`: the pure parts (samples -> table, the one-replica
policy, the peers' pins, the options). Nothing is installed or started here."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from autoscaling.policies import Policy
from serve.cli import bench_peers as bp
from serve.cli.main import parser

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"in-process": "in-process pipeline", "litserve": "LitServe",
          "bentoml": "BentoML", "imagegen": "imagegen"}


def _samples(rows: dict[str, list[tuple[float, float]]]) -> list[bp.Sample]:
    return [bp.Sample(system, r, p50, ips, 8.0)
            for system, per_round in rows.items()
            for r, (p50, ips) in enumerate(per_round)]


def test_summarize_pairs_each_round_with_its_own_baseline():
    samples = _samples({
        "in-process": [(40.0, 40.0), (50.0, 50.0), (44.0, 44.0)],
        "litserve": [(48.0, 36.0), (60.0, 45.0), (51.0, 40.0)],
    })
    base, lit = bp.summarize(samples, LABELS)
    assert base.added_ms is None and base.ratio is None
    assert base.p50_ms == bp.Spread(44.0, 40.0, 50.0)
    assert lit.p50_ms == bp.Spread(51.0, 48.0, 60.0)
    # Per round: +8, +10, +7 ms; 0.9, 0.9, 40/44.
    assert lit.added_ms == bp.Spread(8.0, 7.0, 10.0)
    assert lit.ratio.median == pytest.approx(0.9)
    assert lit.ratio.lo == pytest.approx(0.9) and lit.ratio.hi == pytest.approx(40 / 44)


def test_summarize_keeps_label_order_and_skips_systems_not_measured():
    samples = _samples({"imagegen": [(50.0, 30.0)], "in-process": [(45.0, 40.0)]})
    rows = bp.summarize(samples, LABELS)
    assert [r.system for r in rows] == ["in-process", "imagegen"]
    assert rows[1].added_ms == bp.Spread(5.0, 5.0, 5.0)
    assert rows[1].ratio.median == pytest.approx(0.75)


def test_summarize_ignores_rounds_without_a_baseline():
    samples = _samples({"in-process": [(40.0, 40.0)], "bentoml": [(50.0, 20.0), (90.0, 5.0)]})
    _, bento = bp.summarize(samples, LABELS)
    assert bento.p50_ms == bp.Spread(70.0, 50.0, 90.0)  # both rounds' own figures
    assert bento.added_ms == bp.Spread(10.0, 10.0, 10.0)  # only the paired round


def test_no_baseline_no_ratio():
    rows = bp.summarize(_samples({"imagegen": [(50.0, 30.0)]}), LABELS)
    assert bp.table(rows).splitlines()[2] == "| imagegen | 50.0 ms | - | 30.0 | - |"


def test_median_of_an_even_number_of_rounds():
    assert bp.Spread.of([4.0, 1.0, 3.0, 2.0]) == bp.Spread(2.5, 1.0, 4.0)


def test_table_is_the_issues_markdown():
    samples = _samples({"in-process": [(44.0, 40.6), (44.4, 41.1)],
                        "imagegen": [(52.1, 35.6), (51.8, 35.8)]})
    lines = bp.table(bp.summarize(samples, LABELS)).splitlines()
    assert lines[0] == ("| system | c=1 p50 | added over in-process | c=16 images/s | "
                        "x in-process batched |")
    assert lines[1] == "| --- | --- | --- | --- | --- |"
    assert lines[2] == ("| in-process pipeline | 44.2 ms (44.0 to 44.4) | - | "
                        "40.9 (40.6 to 41.1) (batch 8) | 1 |")
    assert lines[3] == ("| imagegen | 52.0 ms (51.8 to 52.1) | +7.8 ms (+7.4 to +8.1) | "
                        "35.7 (35.6 to 35.8) | 0.87 (0.87 to 0.88) |")


def test_a_single_round_prints_no_range():
    samples = _samples({"in-process": [(40.0, 40.0)], "litserve": [(47.5, 36.0)]})
    row = bp.table(bp.summarize(samples, LABELS)).splitlines()[3]
    assert row == "| LitServe | 47.5 ms | +7.5 ms | 36.0 | 0.90 |"


def test_one_replica_policy_loads_and_leaves_the_rest_alone():
    doc = yaml.safe_load((ROOT / "autoscaling" / "policy.yaml").read_text())
    out = bp.one_replica_policy(doc, "tiny-draft")
    policy = Policy.model_validate(out)
    draft = policy.for_model("tiny-draft")
    assert draft.cpu_threads == 1
    assert (draft.autoscaling.min_replicas, draft.autoscaling.max_replicas) == (1, 1)
    assert out["ingress"] == doc["ingress"] and out["defaults"] == doc["defaults"]
    assert doc["models"]["tiny-draft"]["autoscaling"]["max_replicas"] == 2  # not mutated


@pytest.mark.parametrize("doc", [{}, {"models": None}, {"models": {"other": {}}}])
def test_one_replica_policy_adds_a_model_the_file_does_not_name(doc):
    out = bp.one_replica_policy(doc, "tiny-draft")
    assert out["models"]["tiny-draft"] == {
        "cpu_threads": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


def _constraints() -> dict[str, str]:
    return bp.pins(ROOT / "constraints.txt")


def test_peers_run_the_pipeline_stack_constraints_txt_pins():
    peers, ours = bp.pins(), _constraints()
    assert peers["litserve"] == "0.2.19" and peers["bentoml"] == "1.4.40"
    assert "torchvision" not in peers
    shared = set(peers) - {"litserve", "bentoml"}
    assert {"torch", "diffusers", "transformers"} <= shared
    assert {name: peers[name] for name in shared} == {name: ours[name] for name in shared}


def test_labels_name_the_pinned_versions():
    names = bp.labels("tiny-draft")
    assert list(names) == ["in-process", "litserve", "bentoml", "imagegen"]
    assert names["litserve"] == "LitServe 0.2.19, 5 ms batch wait"
    assert names["bentoml"] == "BentoML 1.4.40, adaptive batching"
    assert names["imagegen"] == "imagegen (policy: tiny-draft 1 replica, cpu_threads 1)"


def _args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["bench", "serve", *argv])


def test_defaults():
    args = _args("--peers")
    assert (args.rounds, args.peers_venv, args.peer_port) == (5, bp.DEFAULT_VENV, 8200)
    assert bp.DEFAULT_VENV == ROOT / ".peers-venv"
    assert bp.check_args(args) is None
    assert bp.check_args(_args()) is None  # plain bench serve: nothing to check


@pytest.mark.parametrize(("argv", "needle"), [
    (["--setup"], "--setup creates the peers venv"),
    (["--peers", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--peers", "--requests", "0"], "--requests must be at least 1"),
    (["--peers", "--threads", "2"], "--threads 2"),
    (["--peers", "--peer-port", "80"], "--peer-port must be from 1024"),
    (["--peers", "--peer-port", "8125"], "overlaps imagegen's ports"),
])
def test_bad_options_are_one_line(argv, needle):
    error = bp.check_args(_args(*argv))
    assert error is not None and needle in error and "\n" not in error


def test_threads_one_is_allowed():
    assert bp.check_args(_args("--peers", "--threads", "1")) is None


def test_missing_venv_is_a_hint_not_a_traceback(tmp_path, capsys):
    args = _args("--peers", "--peers-venv", str(tmp_path / "nope"))
    assert bp.run(args, settings=None) == 2
    out = capsys.readouterr().out
    assert "no peers venv" in out and "--peers --setup" in out


def test_setup_refuses_inside_the_loopback_namespace(monkeypatch, capsys):
    monkeypatch.setenv("LOOPBACK_NS", "1")
    assert bp.run(_args("--peers", "--setup"), settings=None) == 2
    assert "needs the network" in capsys.readouterr().out


@pytest.mark.parametrize(("data", "batch"), [
    ({"batch_images": 3}, 3),
    ({"imagegen": {"batch_images": 5}}, 5),
    ([{"batch_images": 8}], 8),
])
def test_every_systems_body_names_its_batch(data, batch):
    assert bp._batch_of(data) == batch


def test_peer_env_puts_the_repo_and_one_thread_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = bp.peer_env(tmp_path / "venv", {"x": 1}, tmp_path)
    assert env["PYTHONPATH"].split(":") == [str(bp.PEERS_DIR), str(ROOT)]
    assert env["OMP_NUM_THREADS"] == "1" and env["PEER_SPEC"] == '{"x": 1}'
    assert env["PATH"].startswith(str(tmp_path / "venv" / "bin"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_peers_venv_carries_what_importing_the_engine_needs():
    # The peers import serve.engines.diffusers_engine and serve.imaging.encode from the
    # checkout: each distribution that brings in must be pinned for the peers venv, or
    # be a dependency of one that is (a fresh interpreter: this one imported more).
    code = ("import json, sys; before = set(sys.modules); "
            "import serve.engines.diffusers_engine, serve.imaging.encode; "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    dists = metadata.packages_distributions()
    needed = {_norm(d) for m in json.loads(out) if m != "serve" for d in dists.get(m, [])}
    pinned = set(bp.pins())
    carried = set(pinned)
    for name in pinned - {"litserve", "bentoml"}:  # not in this venv; the rest are
        for req in metadata.requires(name) or []:
            if "extra ==" not in req:
                carried.add(_norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    assert needed - {_norm(n) for n in carried} == set()
