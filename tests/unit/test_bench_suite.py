"""The bench suite's pure parts: `bench all`'s selection, child command lines, headline
lines and the JSON number walk; the batching curve's ratios and the lock profile's
prediction; `bench naive`'s comparison with imagegen. Nothing is started here."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from serve.cli import bench_all, bench_batching, bench_naive
from serve.cli import bench_peers as bp
from serve.cli.main import parser

ROOT = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["bench", "all", *argv])


def test_every_benchmark_subcommand_but_all_is_in_the_suite():
    sub = next(a for a in parser()._subparsers._group_actions[0].choices["bench"]._actions
               if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - {"all"} - set(bench_all.NOT_IN_SUITE) == set(bench_all.QUICK)
    assert set(bench_all.PORT_FLAGS) <= set(bench_all.QUICK)


@pytest.mark.parametrize("only, skip, expected", [
    (None, [], list(bench_all.QUICK)),
    (["naive", "policy"], [], ["policy", "naive"]),  # QUICK's order, not the caller's
    (None, ["serve", "capacity"], [n for n in bench_all.QUICK if n not in ("serve", "capacity")]),
    (["state"], ["state"], []),
])
def test_selected_keeps_the_suite_order(only, skip, expected):
    assert bench_all.selected(only, skip) == expected


def test_each_quick_command_parses_as_its_own_subcommand(tmp_path):
    args = _args("--quick", "--port", "20100", "--grpc-port", "20200", "--metrics-port", "20300")
    for name in bench_all.QUICK:
        argv = bench_all.command(name, args, tmp_path / f"{name}.json")
        assert argv[1:3] == ["-m", "serve.cli"]
        child = parser().parse_args(argv[3:])  # the child's own parser accepts it all
        assert child.bench_command == name and child.json == tmp_path / f"{name}.json"
        if name in bench_all.PORT_FLAGS:
            assert child.port == 20100


def test_a_full_run_adds_no_reduced_flags_and_passes_the_config(tmp_path):
    config = tmp_path / "imagegen.yaml"
    args = parser().parse_args(["--config", str(config), "bench", "all"])
    argv = bench_all.command("policy", args, tmp_path / "policy.json")
    assert argv[3:] == ["--config", str(config), "bench", "policy", "--json",
                        str(tmp_path / "policy.json")]


def test_numbers_walks_every_number_but_bools():
    assert bench_all.numbers({"a": 1, "b": [2.5, {"c": True, "d": "x"}], "e": None}) == [1.0, 2.5]


def _spread(x: float) -> dict:
    return {"median": x, "lo": x, "hi": x}


@pytest.mark.parametrize("name, data, expected", [
    ("serve", {"ratios": {"added_p50_ms_c1": 5.25, "throughput_ratio_c1": 0.9,
                          "throughput_ratio_c32": 1.1, "throughput_ratio_c8": 1.0}},
     "HTTP +5.2 ms at c=1, 1.10x in-process at c=32"),
    ("naive", {"rows": [{"system": "in-process"},
                        {"system": "naive", "added_ms": _spread(29.0), "ratio": _spread(0.21)},
                        {"system": "imagegen", "added_ms": _spread(6.0), "ratio": _spread(1.1)}]},
     "naive +29.0 ms / 0.21x; imagegen +6.0 ms / 1.10x (c=1 added / c=16 x in-process batched)"),
    ("batching", {"points": [
        {"where": "in-process", "batch": 1, "images_per_s": 20.0, "x_first": 1.0},
        {"where": "in-process", "batch": 8, "images_per_s": 44.0, "x_first": 2.2},
        {"where": "stack", "batch": 8, "images_per_s": 30.0, "x_first": 3.0}]},
     "in-process batch 8 44.0 img/s, 2.20x batch 1"),
    ("coldstart", {"serve": {"median": {"to_readyz_s": 21.04}},
                   "loads": [{"model": "tiny-draft", "cold_s": 0.31, "cold_x_bound": 300.0}]},
     "spawn to /readyz 21.0 s; tiny-draft load 0.31 s cold (300x bound)"),
    ("cache", {"hit, b64_json": {"p50_ms": 2.5, "ratio_to_miss": 0.05}},
     "hit p50 2.50 ms, 0.050x a miss"),
    ("flood", {"outcomes": [{"code": "ok", "count": 60},
                            {"code": "overloaded", "count": 40, "p95_ms": 12.0}]},
     "60 served, 40 refused (503 p95 12.0 ms)"),
    ("batch", {"interactive alone": {"p95_ms": 100.0},
               "interactive + batch": {"p95_ms": 115.0}},
     "interactive p95 with a batch 1.15x alone"),
    ("state", {"backends": {"sqlite": {"auth p50 ms": 0.1234}}}, "sqlite auth p50 0.123 ms"),
    # no headline for capacity, or an unexpected shape: the count of figures
    ("capacity", {"rates": [1, 2], "p95": {"x": 3.0}}, "3 figures"),
    ("serve", {"ratios": {}}, "0 figures"),
])
def test_headline(name, data, expected):
    assert bench_all.headline(name, data) == expected


def test_headline_prints_a_non_finite_figure_as_it_is():
    data = {"hit, b64_json": {"p50_ms": math.inf, "ratio_to_miss": math.nan}}
    assert bench_all.headline("cache", data) == "hit p50 inf ms, nanx a miss"


def test_summary_line_names_a_failure_and_its_reason():
    o = bench_all.Outcome("naive", 1, 12.34, None, "x.log", "FAILED: exit 1: boom")
    assert bench_all.summary_line(o) == "naive     FAIL    12.3 s  FAILED: exit 1: boom"


def _point(batch: int, ips: float) -> bench_batching.CurvePoint:
    return bench_batching.CurvePoint("in-process", batch, 8, ips, 1 / ips, 10.0, batch)


def test_ratios_to_first():
    assert bench_batching.ratios_to_first([_point(1, 20.0), _point(2, 30.0),
                                           _point(8, 44.0)]) == [1.0, 1.5, 2.2]
    assert bench_batching.ratios_to_first([]) == []


def test_profile_prediction_is_the_lock_profile_at_its_own_size():
    from serve.lockfile import load_lock

    entry = load_lock(ROOT / "models.lock").get("tiny-draft")
    profile = entry.profiles["cpu"]
    spm = profile.seconds_per_megapixel
    b = min(spm)
    assert bench_batching.profile_s_per_image(entry, "cpu", b) == pytest.approx(
        spm[b] * profile.width * profile.height / 1e6)
    assert bench_batching.profile_s_per_image(entry, "cpu", 999) is None
    assert bench_batching.profile_s_per_image(entry, "no-such-device", b) is None


def test_vs_naive_compares_the_medians():
    samples = [bp.Sample("in-process", 0, 40.0, 40.0, 8), bp.Sample("naive", 0, 70.0, 8.0, 1),
               bp.Sample("imagegen", 0, 46.0, 36.0, 7.5)]
    labels = {k: k for k in ("in-process", "naive", "imagegen")}
    rows = bp.summarize(samples, labels)
    got = bench_naive.vs_naive(rows)
    assert got == {"p50_ms_c1_minus_naive": -24.0, f"throughput_x_naive_c{bp.LOADED}": 4.5}
    assert bench_naive.vs_naive(rows[:2]) == {}  # no imagegen row (--skip-imagegen)


def test_ports_of_a_benchmark_include_the_direct_ingress_proxies():
    args = _args("--port", "20100", "--grpc-port", "20200")
    assert bench_all.ports_of("policy", args, 8080) == []
    assert bench_all.ports_of("cache", args, 8080) == [20100, 20108, 8080]
    assert bench_all.ports_of("serve", args, 8080) == [20100, 20108, 8080, 20200, 20208]
    args = _args("--port", "20100", "--grpc-port", "0", "--metrics-port", "20300")
    assert bench_all.ports_of("serve", args, 8080) == [20100, 20108, 20300]


def test_wait_free_returns_the_ports_still_taken():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert bench_all.wait_free([taken], deadline_s=0.2) == [taken]
    assert bench_all.wait_free([taken], deadline_s=5) == []
