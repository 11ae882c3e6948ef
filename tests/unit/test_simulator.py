"""Simulator: trace files, exact continuous-batching behaviour on tiny traces,
agreement with the planner at planned points, and the autoscaler under a budget."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from autoscaling.inputs import PlanInputs, Profile, RevisionSpec, SizeMix, TierLoad
from autoscaling.planner import plan
from autoscaling.policies import NodeType
from autoscaling.simulator import (
    Arrival,
    AutoscalerConfig,
    Placement,
    SimConfig,
    load_trace,
    poisson_arrivals,
    simulate,
)

ONE_MP = SizeMix(weight=1, width=1000, height=1000, images=1, steps=30)
MIX = [
    SizeMix(weight=6, width=512, height=512, images=1, steps=20),
    SizeMix(weight=3, width=1024, height=1024, images=1, steps=30),
    SizeMix(weight=1, width=1024, height=1024, images=4, steps=30),
]


def profile(spmp=None, *, batch=1, cv=0.0, gpus=1.0) -> Profile:
    return Profile(steps=30, seconds_per_megapixel=spmp or {1: 1.0}, peak_memory_gb=10,
                   gpus_per_replica=gpus, max_batch_images=batch, service_cv=cv)


def one_revision(rate, slo, prof, *, mix=None, max_nodes=100) -> PlanInputs:
    return PlanInputs(
        tiers={"final": TierLoad(revision="r", rate_rps=rate, priority=1, slo_p95_s=slo)},
        revisions={"r": RevisionSpec(profiles={"h100": prof})},
        nodes={"h100": NodeType(gpus_per_node=8, gpu_memory_gb=80, cost_per_hour=80.0,
                                max_nodes=max_nodes)},
        mix=mix or [ONE_MP],
    )


def at(*times: float, n: int = 1, tier: str = "final") -> list[Arrival]:
    return [Arrival(t, tier, 1000, 1000, n) for t in times]


# --- traces ----------------------------------------------------------------------

CSV = "time_s,tier,width,height,n,steps\n0.5,final,512,512,1,20\n0.1,draft,1024,768,2,\n"
JSONL = ('{"time_s": 0.5, "tier": "final", "width": 512, "height": 512, "n": 1, "steps": 20}\n'
         '\n{"time_s": 0.1, "tier": "draft", "width": 1024, "height": 768, "n": 2}\n')
WANT = [Arrival(0.1, "draft", 1024, 768, 2, None), Arrival(0.5, "final", 512, 512, 1, 20)]


@pytest.mark.parametrize(("name", "text"), [("t.csv", CSV), ("t.jsonl", JSONL)])
def test_load_trace(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert load_trace(path) == WANT


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("t.csv", "time_s,tier,width,height,n\n1,final,512,512,0\n", r"t.csv:2: .*n >= 1"),
        ("t.csv", "time_s,tier,width,height\n1,final,512,512\n", r"t.csv:2: .*'n'"),
        ("t.csv", "time_s,tier,width,height,n,seed\n1,a,1,1,1,7\n", "unknown columns"),
        ("t.jsonl", '{"time_s": -1, "tier": "a", "width": 1, "height": 1, "n": 1}\n',
         r"t.jsonl:1: .*time_s >= 0"),
        ("t.jsonl", '{"time_s": 1, "tier": "a", "width": "x", "height": 1, "n": 1}\n',
         r"t.jsonl:1: "),
        ("t.txt", "", "unknown trace format"),
    ],
)
def test_bad_trace_names_file_and_line(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_poisson_arrivals_rate_mix_and_seed():
    inputs = one_revision(20.0, 5.0, profile(), mix=MIX)
    arrivals = poisson_arrivals(inputs, 1000.0, seed=3)
    assert arrivals == poisson_arrivals(inputs, 1000.0, seed=3)
    assert arrivals != poisson_arrivals(inputs, 1000.0, seed=4)
    assert len(arrivals) == pytest.approx(20_000, rel=0.03)
    assert [a.time_s for a in arrivals] == sorted(a.time_s for a in arrivals)
    four = sum(a.n == 4 for a in arrivals) / len(arrivals)
    assert four == pytest.approx(0.1, abs=0.01)


def test_unknown_trace_tier_rejected():
    inputs = one_revision(1.0, 5.0, profile())
    with pytest.raises(ValueError, match="'nope'"):
        simulate(inputs, {"r": Placement("h100", 1)}, SimConfig(duration_s=10), at(1, tier="nope"))


# --- continuous batching, exactly ------------------------------------------------------

# One replica; 1 MP images; spmp 1.0 s alone, 0.5 s each in a batch of 4, linear
# between (0.833 at 2, 0.667 at 3); deterministic. So a batch of 2 takes 5/3 s, of 3
# takes 2 s, of 4 takes 2 s.
BATCHING = [
    pytest.param(at(0.0, 5.0), [1.0, 1.0], id="lone-requests-never-wait"),
    pytest.param(at(0.0, 0.1, 0.2, 0.3), [1.0, 2.9, 2.8, 2.7], id="queued-form-one-batch"),
    pytest.param(at(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), [1.0, 2.9, 2.8, 2.7, 2.6, 3.5],
                 id="batch-capped-at-four"),
    # at 1 s the 3-image request runs without the 2-image one (5 > 4): 1 -> 3 -> 4.67 s
    pytest.param(at(0.0) + at(0.1, n=3) + at(0.2, n=2), [1.0, 2.9, 3.0 + 5 / 3 - 0.2],
                 id="request-never-split"),
    pytest.param(at(0.0, n=6), [3.0], id="heavier-than-batch-runs-alone"),
]


@pytest.mark.parametrize(("arrivals", "latencies"), BATCHING)
def test_continuous_batching(arrivals, latencies):
    inputs = one_revision(1.0, 9.0, profile({1: 1.0, 4: 0.5}, batch=4))
    result = simulate(inputs, {"r": Placement("h100", 1)}, SimConfig(duration_s=10), arrivals)
    stats = result.tiers["final"]
    assert stats.completed == len(latencies)
    assert stats.p50_s == pytest.approx(statistics.median(latencies))
    assert stats.mean_s == pytest.approx(statistics.mean(latencies))
    assert stats.p99_s <= max(latencies) + 1e-9
    assert result.revisions["r"].busy <= 1.0


@pytest.mark.parametrize(
    ("config", "completed", "dropped", "timed_out"),
    [
        (SimConfig(duration_s=10), 6, 0, 0),
        # 0 runs, 0.1 and 0.2 wait, 0.3 and 0.4 find 2 queued; at 1.0 the batch that
        # ends first takes 0.1, so the arrival at 1.0 finds room
        (SimConfig(duration_s=10, queue_limit_images=2), 4, 2, 0),
        (SimConfig(duration_s=10, timeout_s=0.95), 2, 0, 4),  # 1 s later, all but one late
    ],
)
def test_queue_limit_and_timeout(config, completed, dropped, timed_out):
    inputs = one_revision(1.0, 9.0, profile())
    result = simulate(inputs, {"r": Placement("h100", 1)}, config, at(0, 0.1, 0.2, 0.3, 0.4, 1.0))
    stats = result.tiers["final"]
    assert (stats.completed, stats.dropped, stats.timed_out) == (completed, dropped, timed_out)


def test_arrivals_after_duration_are_left_out():
    inputs = one_revision(1.0, 9.0, profile())
    result = simulate(inputs, {"r": Placement("h100", 1)}, SimConfig(duration_s=10),
                      at(1.0, 9.9, 10.0, 50.0))
    assert result.tiers["final"].completed == 2


def test_tier_granted_no_replicas_goes_unserved():
    prof = profile()
    inputs = PlanInputs(
        tiers={"final": TierLoad(revision="a", rate_rps=3.0, priority=2, slo_p95_s=2.0),
               "batch": TierLoad(revision="b", rate_rps=1.0, priority=1, slo_p95_s=2.0)},
        revisions={"a": RevisionSpec(profiles={"h100": prof}),
                   "b": RevisionSpec(profiles={"h100": prof})},
        nodes={"h100": NodeType(gpus_per_node=4, gpu_memory_gb=80, cost_per_hour=40.0,
                                max_nodes=1)},
        mix=[ONE_MP],
    )
    planned = plan(inputs)
    assert (planned.revisions["a"].replicas, planned.revisions["b"].replicas) == (4, 0)
    result = simulate(inputs, planned, SimConfig(duration_s=200, seed=1))
    assert result.tiers["batch"].completed == 0
    assert result.tiers["batch"].unserved == pytest.approx(200, rel=0.2)
    assert result.tiers["final"].unserved == 0


def test_fixed_pool_gpu_seconds_and_cost():
    inputs = one_revision(1.0, 9.0, profile(gpus=2.0))
    result = simulate(inputs, {"r": Placement("h100", 3)}, SimConfig(duration_s=100, seed=1))
    assert result.gpu_seconds == pytest.approx(3 * 2 * 100)
    assert result.cost == pytest.approx(600 / 3600 * 80.0 / 8)


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_same_result(seed):
    inputs = one_revision(8.0, 9.0, profile({1: 1.0, 4: 0.5}, batch=4, cv=0.5))
    config = SimConfig(duration_s=300, seed=seed)
    runs = [simulate(inputs, {"r": Placement("h100", 3)}, config) for _ in range(2)]
    assert runs[0] == runs[1]
    other = simulate(inputs, {"r": Placement("h100", 3)}, config.model_copy(update={"seed": 99}))
    assert other.tiers != runs[0].tiers


# --- against the planner ------------------------------------------------------------

AGREEMENT = [
    pytest.param(10.0, 5.0, profile({1: 1.0}, cv=1.0), None, id="mmc"),
    pytest.param(10.0, 3.2, profile({1: 1.0}, cv=1.0), None, id="mmc-slo"),
    pytest.param(10.0, 1.2, profile({1: 1.0}), None, id="mdc"),
    pytest.param(10.0, 5.0, profile({1: 1.0}), None, id="mdc-util"),
    pytest.param(0.8, 10.0, profile({1: 1.0}), None, id="md1"),
    pytest.param(0.8, 10.0, profile({1: 1.0}, cv=0.5), None, id="mg1"),
    pytest.param(20.0, 3.5, profile({1: 1.0, 8: 0.4}, batch=8), None, id="batch8"),
    pytest.param(20.0, 4.0, profile({1: 1.0, 8: 0.4}, batch=8), None, id="batch8-full"),
    pytest.param(20.0, 10.0, profile({1: 1.0, 8: 0.4}, batch=8, cv=1.0), None,
                 id="batch8-exponential"),
    pytest.param(30.0, 0.3, profile({1: 0.1, 2: 0.07, 4: 0.055, 8: 0.05}, batch=8, cv=0.3),
                 MIX, id="batch8-mix"),
    pytest.param(30.0, 0.4, profile({1: 0.1, 2: 0.07, 4: 0.055, 8: 0.05}, batch=8, cv=0.3),
                 MIX, id="batch8-mix-loose"),
]


@pytest.mark.parametrize(("rate", "slo", "prof", "mix"), AGREEMENT)
def test_simulated_p95_matches_planner_at_planned_point(rate, slo, prof, mix):
    inputs = one_revision(rate, slo, prof, mix=mix)
    planned = plan(inputs)
    # ~60k requests after warm-up: the p95 estimate itself is good to a few percent
    config = SimConfig(duration_s=3000 * 20 / rate, warmup_s=100, seed=1)
    simulated = simulate(inputs, planned, config).tiers["final"]
    predicted = planned.revisions["r"].perf.p95_s
    assert simulated.p95_s == pytest.approx(predicted, rel=0.15)


def test_an_hour_at_20_rps_runs_in_seconds():
    inputs = one_revision(20.0, 5.0, profile({1: 0.05, 8: 0.03}, batch=8, cv=0.1), mix=MIX)
    started = time.perf_counter()
    result = simulate(inputs, {"r": Placement("h100", 2)}, SimConfig(duration_s=3600, seed=2))
    assert result.tiers["final"].completed == pytest.approx(72_000, rel=0.02)
    assert time.perf_counter() - started < 10.0


# --- the autoscaler --------------------------------------------------------------------


def two_tiers(max_nodes: int = 2) -> PlanInputs:
    prof = profile({1: 0.5, 4: 0.35, 8: 0.3}, batch=8, cv=0.05)
    return PlanInputs(
        tiers={"final": TierLoad(revision="sdxl", rate_rps=6, priority=2, slo_p95_s=3.0),
               "draft": TierLoad(revision="turbo", rate_rps=10, priority=1, slo_p95_s=1.0,
                                 mix=[SizeMix(weight=1, width=512, height=512, images=1,
                                              steps=4)])},
        revisions={"sdxl": RevisionSpec(profiles={"h100": prof}, min_replicas=1, max_replicas=20),
                   "turbo": RevisionSpec(profiles={"h100": prof}, min_replicas=1,
                                         max_replicas=20)},
        nodes={"h100": NodeType(gpus_per_node=4, gpu_memory_gb=80, cost_per_hour=40.0,
                                max_nodes=max_nodes)},
        mix=[ONE_MP],
    )


def stepped(inputs: PlanInputs, scale: float, seed: int = 1) -> list[Arrival]:
    """300 s at the inputs' rates, then 600 s at `scale` times them."""
    busier = inputs.model_copy(update={"tiers": {
        k: t.model_copy(update={"rate_rps": t.rate_rps * scale}) for k, t in inputs.tiers.items()
    }})
    later = [Arrival(a.time_s + 300, a.tier, a.width, a.height, a.n, a.steps)
             for a in poisson_arrivals(busier, 600, seed + 1)]
    return poisson_arrivals(inputs, 300, seed) + later


def autoscaled(cold_start_s: float, downscale_delay_s: float = 120.0) -> SimConfig:
    scaler = AutoscalerConfig(interval_s=5, target_images_per_replica=3, upscale_delay_s=10,
                              downscale_delay_s=downscale_delay_s, cold_start_s=cold_start_s)
    return SimConfig(duration_s=900, seed=1, autoscaler=scaler)


START = {"sdxl": Placement("h100", 2), "turbo": Placement("h100", 1)}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cold_starts_cost_latency_against_a_provisioned_pool(seed):
    inputs = two_tiers(max_nodes=4)
    arrivals = stepped(inputs, 2.0, seed)
    provisioned = simulate(inputs, {"sdxl": Placement("h100", 10), "turbo": Placement("h100", 2)},
                           SimConfig(duration_s=900, seed=1), arrivals).tiers["final"].p95_s
    # no scale-down within the run: scaling down and up again would blur the comparison
    cold = {s: simulate(inputs, START, autoscaled(s, 900.0), arrivals).tiers["final"].p95_s
            for s in (0.0, 60.0, 180.0)}
    assert provisioned < cold[0.0] < cold[180.0]
    assert provisioned < cold[60.0]


@pytest.mark.parametrize("max_nodes", [1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_autoscaler_stays_within_budget(max_nodes, scale):
    inputs = two_tiers(max_nodes)
    result = simulate(inputs, START, autoscaled(30.0), stepped(inputs, scale))
    budget = max_nodes * 4
    assert result.peak_gpus["h100"] <= budget
    assert all(gpus["h100"] <= budget for _, _, gpus in result.timeline)
    assert all(sum(held.values()) <= budget for _, held, _ in result.timeline)
    assert all(1 <= held["turbo"] and held["sdxl"] <= 20 for _, held, _ in result.timeline)


def test_autoscaler_gives_the_budget_to_the_higher_priority():
    inputs = two_tiers(max_nodes=2)
    result = simulate(inputs, START, autoscaled(10.0), stepped(inputs, 4.0))
    late = [held for t, held, _ in result.timeline if t > 600]
    assert max(h["sdxl"] for h in late) == 7  # all 8 GPUs but turbo's minimum
    assert all(h["turbo"] == 1 for h in late)


def test_autoscaler_scales_up_then_down():
    inputs = two_tiers(max_nodes=4)
    arrivals = [a for a in stepped(inputs, 3.0) if a.time_s < 600]  # quiet after 600 s
    result = simulate(inputs, START, autoscaled(20.0), arrivals)
    sdxl = {t: held["sdxl"] for t, held, _ in result.timeline}
    assert max(n for t, n in sdxl.items() if t < 600) > 2
    assert sdxl[max(sdxl)] == 1  # back to min_replicas once idle for the downscale delay


def test_timeline_written_as_json(tmp_path):
    # the timeline is plain data: it can go straight to a report
    inputs = two_tiers()
    result = simulate(inputs, START, autoscaled(5.0), stepped(inputs, 1.0))
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(result.timeline))
    assert json.loads(path.read_text())[0][1] == {"sdxl": 2, "turbo": 1}
