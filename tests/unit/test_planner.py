"""Planner: reduction to M/M/c, minimal replicas meeting the SLO, the node cap and
priorities, GPU choice, memory, cost, sweeps, and the plots."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from pydantic import ValidationError

from autoscaling.inputs import PlanInputs, Profile, RevisionSpec, SizeMix, TierLoad
from autoscaling.planner import (
    performance,
    plan,
    sweep_load,
    sweep_slo,
)
from autoscaling.plots import plot_cost_vs_slo, plot_latency_vs_load
from autoscaling.policies import NodeType

ONE_MP = SizeMix(weight=1, width=1000, height=1000, images=1, steps=30)
MIX = [
    SizeMix(weight=6, width=512, height=512, images=1, steps=20),
    SizeMix(weight=3, width=1024, height=1024, images=1, steps=30),
    SizeMix(weight=1, width=1024, height=1024, images=4, steps=30),
]


def profile(spmp=None, *, batch=1, cv=0.0, gpus=1.0, memory=20.0, steps=30) -> Profile:
    return Profile(steps=steps, seconds_per_megapixel=spmp or {1: 1.0}, peak_memory_gb=memory,
                   gpus_per_replica=gpus, max_batch_images=batch, service_cv=cv)


def node(max_nodes=100, gpus=8, cost=80.0, memory=80.0) -> NodeType:
    return NodeType(gpus_per_node=gpus, gpu_memory_gb=memory, cost_per_hour=cost,
                    max_nodes=max_nodes)


def one_revision(rate, slo, prof, *, mix=None, lo=0, hi=1000, nodes=None, target=0.85):
    """Tier "final" served by revision "r" on "h100"."""
    return PlanInputs(
        tiers={"final": TierLoad(revision="r", rate_rps=rate, priority=3, slo_p95_s=slo)},
        revisions={"r": RevisionSpec(profiles={"h100": prof}, min_replicas=lo, max_replicas=hi)},
        nodes=nodes or {"h100": node()},
        mix=mix or [ONE_MP],
        target_utilisation=target,
    )


# --- no batching, exponential service: exactly M/M/c -------------------------------


def erlang_c_direct(c: int, a: float) -> float:
    a = Fraction(a)
    below = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) * c / (c - a)
    return float(top / (below + top))


def mmc_response_tail(c, lam, mu, t):
    cc, theta = erlang_c_direct(c, lam / mu), c * mu - lam
    if theta == mu:
        both = (1 + mu * t) * math.exp(-mu * t)
    else:
        both = (theta * math.exp(-mu * t) - mu * math.exp(-theta * t)) / (theta - mu)
    return (1 - cc) * math.exp(-mu * t) + cc * both


MMC = [(1, 0.5, 1.0), (2, 1.0, 1.0), (4, 3.0, 1.0), (10, 8.0, 1.0), (12, 10.0, 1.0),
       (16, 30.0, 2.0), (50, 45.0, 1.0)]


@pytest.mark.parametrize(("c", "lam", "mu"), MMC)
def test_no_batching_exponential_is_mmc(c, lam, mu):
    # one 1 MP image at the profile's steps, 1/mu seconds per MP, exponential noise
    inputs = one_revision(lam, 10.0, profile({1: 1 / mu}, cv=1.0))
    perf = performance(inputs, "r", c)
    cc, theta = erlang_c_direct(c, lam / mu), c * mu - lam
    assert perf.p_wait == pytest.approx(cc, rel=1e-9)
    assert perf.mean_wait_s == pytest.approx(cc / theta, rel=1e-9)
    assert perf.p95_wait_s == pytest.approx(max(0.0, math.log(cc / 0.05) / theta), rel=1e-9)
    assert perf.mean_latency_s == pytest.approx(cc / theta + 1 / mu, rel=1e-9)
    assert mmc_response_tail(c, lam, mu, perf.p95_s) == pytest.approx(0.05, rel=1e-7)
    assert mmc_response_tail(c, lam, mu, perf.p50_s) == pytest.approx(0.5, rel=1e-7)
    assert perf.utilisation == pytest.approx(lam / (c * mu), rel=1e-12)
    assert perf.busy == pytest.approx(lam / (c * mu), rel=1e-12)
    assert perf.mean_batch_images == 1.0


@pytest.mark.parametrize(
    ("mix", "spmp", "steps", "want"),
    [
        (SizeMix(weight=1, width=1000, height=1000, images=1, steps=30), 0.5, 30, 0.5),
        (SizeMix(weight=1, width=1000, height=1000, images=1, steps=15), 0.5, 30, 0.25),
        (SizeMix(weight=1, width=2000, height=1000, images=1, steps=30), 0.5, 30, 1.0),
        (SizeMix(weight=1, width=1024, height=1024, images=1, steps=50), 0.2, 25, 0.4194304),
        (SizeMix(weight=1, width=1000, height=1000, images=2, steps=30), 0.5, 30, 1.0),
    ],
)
def test_lone_request_takes_its_work_times_spmp(mix, spmp, steps, want):
    # nearly no load: no waits, every request alone, deterministic service
    inputs = one_revision(1e-6, 10.0, profile({1: spmp, 2: spmp}, batch=2, steps=steps),
                          mix=[mix])
    perf = performance(inputs, "r", 1)
    assert perf.p50_s == pytest.approx(want, rel=1e-6)
    assert perf.p95_s == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    ("spmp", "images", "want"),
    [({1: 1.0, 8: 0.3}, 1, 1.0), ({1: 1.0, 8: 0.3}, 8, 0.3), ({1: 1.0, 8: 0.3}, 4.5, 0.65),
     ({2: 0.8, 4: 0.6}, 1, 0.8), ({2: 0.8, 4: 0.6}, 16, 0.6), ({4: 0.5}, 2, 0.5)],
)
def test_spmp_interpolates_and_holds_flat(spmp, images, want):
    assert profile(spmp, batch=8).spmp(images) == pytest.approx(want)


@pytest.mark.parametrize(
    ("memory", "gpu_memory", "gpus", "batch", "want"),
    [
        ({1: 10.0, 8: 80.0}, 40.0, 1.0, 8, 4),  # 10 GB per image: 4 fit in 40 GB
        ({1: 10.0, 8: 80.0}, 40.0, 2.0, 8, 8),  # two GPUs per replica: all 8 fit
        ({1: 10.0, 2: 20.0}, 80.0, 1.0, 16, 8),  # extrapolated past the last measure
        (30.0, 80.0, 1.0, 6, 6),
        (90.0, 80.0, 1.0, 6, 0),  # does not fit at all
    ],
)
def test_usable_batch_fits_memory(memory, gpu_memory, gpus, batch, want):
    prof = Profile(steps=30, seconds_per_megapixel={1: 1.0}, peak_memory_gb=memory,
                   gpus_per_replica=gpus, max_batch_images=batch)
    assert prof.usable_batch(node(memory=gpu_memory)) == want


# --- replicas: the smallest count meeting the SLO and the target ------------------------

SIZING = [
    pytest.param(10.0, 5.0, profile({1: 1.0}, cv=1.0), None, "util", id="mmc-util-binds"),
    pytest.param(10.0, 3.2, profile({1: 1.0}, cv=1.0), None, "slo", id="mmc-slo-binds"),
    pytest.param(10.0, 1.1, profile({1: 1.0}), None, "slo", id="mdc"),
    pytest.param(20.0, 4.0, profile({1: 1.0, 8: 0.4}, batch=8), None, "util", id="batch8"),
    pytest.param(20.0, 3.5, profile({1: 1.0, 8: 0.4}, batch=8), None, "slo", id="batch8-tight"),
    pytest.param(30.0, 0.3, profile({1: 0.1, 2: 0.07, 4: 0.055, 8: 0.05}, batch=8, cv=0.3),
                 MIX, "slo", id="batch8-mix"),
    pytest.param(200.0, 2.0, profile({1: 0.5, 4: 0.3}, batch=4, cv=0.1), None, "util",
                 id="big-pool"),
]


@pytest.mark.parametrize(("rate", "slo", "prof", "mix", "binding"), SIZING)
def test_planned_replicas_meet_slo_and_are_minimal(rate, slo, prof, mix, binding):
    inputs = one_revision(rate, slo, prof, mix=mix)
    planned = plan(inputs).revisions["r"]
    assert planned.meets_slo
    assert planned.perf.p95_s <= slo
    assert planned.perf.utilisation <= inputs.target_utilisation
    fewer = performance(inputs, "r", planned.replicas - 1)
    missed = {"slo": not fewer.p95_s <= slo, "util": fewer.utilisation > 0.85}
    assert missed[binding]


@pytest.mark.parametrize(("lo", "hi", "want", "meets"), [(6, 100, 6, True), (0, 3, 3, False)])
def test_replicas_bounded_by_min_and_max(lo, hi, want, meets):
    inputs = one_revision(1.0, 3.0, profile({1: 1.0}), lo=lo, hi=hi)
    inputs = inputs.model_copy(update={"tiers": {"final": inputs.tiers["final"].model_copy(
        update={"rate_rps": 5.0 if not meets else 1.0})}})
    p = plan(inputs)
    assert p.revisions["r"].replicas == want
    assert p.revisions["r"].meets_slo is meets
    assert p.slo_misses == (() if meets else ("final",))


def test_no_traffic_gets_min_replicas():
    p = plan(one_revision(0.0, 1.0, profile(), lo=2))
    assert p.revisions["r"].replicas == 2
    assert p.revisions["r"].perf.utilisation == 0.0


# --- the cap and priorities ---------------------------------------------------------


def three_tiers(max_nodes: int, mins=(0, 0, 0)) -> PlanInputs:
    prof = profile({1: 1.0})
    revisions = {name: RevisionSpec(profiles={"h100": prof}, min_replicas=lo)
                 for name, lo in zip(("r-final", "r-draft", "r-batch"), mins, strict=True)}
    tiers = {
        "final": TierLoad(revision="r-final", rate_rps=4.0, priority=3, slo_p95_s=1.5),
        "draft": TierLoad(revision="r-draft", rate_rps=3.0, priority=2, slo_p95_s=1.5),
        "batch": TierLoad(revision="r-batch", rate_rps=5.0, priority=1, slo_p95_s=1.5),
    }
    return PlanInputs(tiers=tiers, revisions=revisions, nodes={"h100": node(max_nodes, gpus=4)},
                      mix=[ONE_MP])


@pytest.mark.parametrize("max_nodes", [0, 1, 2, 3, 4, 5, 100])
def test_cap_is_never_exceeded_and_priority_decides(max_nodes):
    required = {r: p.required_replicas for r, p in plan(three_tiers(100)).revisions.items()}
    p = plan(three_tiers(max_nodes))
    assert p.nodes <= max_nodes
    assert p.gpus <= max_nodes * 4
    budget = max_nodes * 4
    want = {}
    for rev in ("r-final", "r-draft", "r-batch"):  # highest priority first
        want[rev] = min(required[rev], budget)
        budget -= want[rev]
    assert {r: x.replicas for r, x in p.revisions.items()} == want
    assert p.fits_cap == (want == required)
    short = {"r-final": "final", "r-draft": "draft", "r-batch": "batch"}
    assert set(p.slo_misses) == {short[r] for r in want if want[r] < required[r]}
    assert p.spare_nodes == max_nodes - p.nodes
    assert p.spare_gpus == pytest.approx(max_nodes * 4 - p.gpus)


def test_mins_come_before_higher_priority_growth():
    p = plan(three_tiers(2, mins=(1, 1, 2)))
    got = {r: x.replicas for r, x in p.revisions.items()}
    assert got["r-draft"] >= 1
    assert got["r-batch"] >= 2
    assert sum(got.values()) == 8


def test_replicas_that_do_not_tile_are_packed_within_cap():
    # 3-GPU and 2-GPU replicas on 6-GPU nodes: the GPU count fits, packing decides
    prof3, prof2 = profile({1: 1.0}, gpus=3.0), profile({1: 1.0}, gpus=2.0)
    inputs = PlanInputs(
        tiers={"final": TierLoad(revision="a", rate_rps=1.5, priority=2, slo_p95_s=1.5),
               "draft": TierLoad(revision="b", rate_rps=1.5, priority=1, slo_p95_s=1.5)},
        revisions={"a": RevisionSpec(profiles={"g": prof3}),
                   "b": RevisionSpec(profiles={"g": prof2})},
        nodes={"g": node(max_nodes=2, gpus=6)},
        mix=[ONE_MP],
    )
    p = plan(inputs)
    assert p.nodes <= 2
    assert p.revisions["a"].replicas == p.revisions["a"].required_replicas


# --- GPU choice and cost -------------------------------------------------------------


def two_gpus(slo: float) -> PlanInputs:
    return PlanInputs(
        tiers={"final": TierLoad(revision="r", rate_rps=4.0, priority=1, slo_p95_s=slo)},
        revisions={"r": RevisionSpec(profiles={
            "a10": profile({1: 2.0}),  # slow and cheap
            "h100": profile({1: 0.5}),  # fast and dear
        })},
        nodes={"a10": node(gpus=4, cost=8.0), "h100": node(gpus=8, cost=100.0)},
        mix=[ONE_MP],
    )


@pytest.mark.parametrize(("slo", "gpu"), [(5.0, "a10"), (1.9, "h100")])
def test_cheapest_gpu_that_meets_slo(slo, gpu):
    p = plan(two_gpus(slo))
    assert p.revisions["r"].gpu == gpu
    assert p.revisions["r"].meets_slo
    assert p.pools["h100" if gpu == "a10" else "a10"].nodes == 0


def test_cost_nodes_and_headroom():
    inputs = one_revision(9.0, 1.5, profile({1: 1.0}, gpus=2.0),
                          nodes={"h100": node(max_nodes=5, gpus=8, cost=100.0)})
    p = plan(inputs)
    r = p.revisions["r"]
    assert r.gpus == 2.0 * r.replicas
    assert p.nodes == math.ceil(r.gpus / 8)
    assert p.cost_per_hour == pytest.approx(100.0 * p.nodes)
    assert p.cost_per_image == pytest.approx(p.cost_per_hour / (9.0 * 3600))
    assert p.spare_nodes == 5 - p.nodes
    assert p.spare_gpus == pytest.approx(40 - r.gpus)
    assert p.gpu_utilisation == pytest.approx(r.perf.busy * r.gpus / (8 * p.nodes))


# --- validation ----------------------------------------------------------------------


def raw_inputs() -> dict:
    return {
        "tiers": {"final": {"revision": "r", "rate_rps": 1, "priority": 1, "slo_p95_s": 2}},
        "revisions": {"r": {"profiles": {"h100": {
            "steps": 30, "seconds_per_megapixel": {1: 1.0, 4: 0.5}, "peak_memory_gb": 20,
            "gpus_per_replica": 1, "max_batch_images": 4}}}},
        "nodes": {"h100": {"gpus_per_node": 8, "gpu_memory_gb": 80, "cost_per_hour": 90,
                           "max_nodes": 2}},
        "mix": [{"weight": 1, "width": 512, "height": 512, "images": 1, "steps": 30}],
    }


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["tiers"]["final"].update(revision="ghost"), "unknown revision 'ghost'"),
        (lambda d: d["revisions"]["r"]["profiles"]["h100"].update(gpus_per_replica=3),
         "3.0 GPUs per replica do not tile a 8-GPU node"),
        (lambda d: d["revisions"]["r"]["profiles"]["h100"].update(
            seconds_per_megapixel={1: 1.0, 4: 0.2}), "batch of 4 images"),
        (lambda d: d["revisions"]["r"].update(profiles={"a10": d["revisions"]["r"]["profiles"]
                                                        ["h100"]}), "no profile for any"),
        (lambda d: d["revisions"]["r"].update(min_replicas=5, max_replicas=2),
         "min_replicas 5 > max_replicas 2"),
        (lambda d: d["tiers"]["final"].update(slo=2), "Extra inputs are not permitted"),
        (lambda d: d["nodes"]["h100"].update(max_nodes=-1), "max_nodes"),
        (lambda d: d.update(target_utilisation=1.5), "target_utilisation"),
    ],
)
def test_bad_inputs_rejected(mutate, match):
    data = raw_inputs()
    mutate(data)
    with pytest.raises(ValidationError, match=match):
        PlanInputs.model_validate(data)


def test_raw_inputs_are_valid():
    assert PlanInputs.model_validate(raw_inputs()).tiers["final"].revision == "r"


# --- sweeps and plots ---------------------------------------------------------------


def test_sweep_load_latency_rises_to_saturation():
    inputs = one_revision(20.0, 4.0, profile({1: 1.0, 8: 0.4}, batch=8))
    points = sweep_load(inputs, "r", [2, 5, 10, 20, 24, 25, 30], replicas=10)
    p95 = [p.p95_s for p in points]
    assert p95 == sorted(p95)
    # 10 replicas x 8 images / 3.2 s: 25 requests/s at most
    assert [p.stable for p in points] == [True] * 5 + [False] * 2


def test_sweep_slo_cost_falls_as_slo_loosens():
    inputs = one_revision(10.0, 2.0, profile({1: 1.0}),
                          nodes={"h100": node(max_nodes=16, gpus=1, cost=10.0)})
    points = sweep_slo(inputs, [1.05, 1.2, 1.5, 3.0])
    costs = [p.cost_per_hour for p in points]
    assert costs == sorted(costs, reverse=True)
    assert costs[0] > costs[-1]
    assert all(p.slo_misses == () and p.fits_cap for p in points)


@pytest.mark.parametrize("cap", [16, 1000])
def test_unreachable_slo_takes_only_the_utilisation_target(cap):
    # a request takes 1 s, so no pool meets 0.9 s: more replicas would only cost
    inputs = one_revision(10.0, 0.9, profile({1: 1.0}), hi=cap)
    p = plan(inputs)
    assert p.revisions["r"].replicas == 12  # 10 req/s x 1 s / 0.85
    assert p.slo_misses == ("final",)
    assert p.fits_cap


def test_plots_write_png(tmp_path):
    inputs = one_revision(10.0, 3.0, profile({1: 1.0}, cv=1.0))
    loads = sweep_load(inputs, "r", [2, 6, 10, 12, 20])
    slos = sweep_slo(inputs, [1.2, 2.0, 3.0])
    for path in (plot_latency_vs_load(loads, 3.0, tmp_path / "load.png"),
                 plot_cost_vs_slo(slos, tmp_path / "slo.png")):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 5000
