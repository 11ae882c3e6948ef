"""budget.allocate: the shared-GPU decision, by table; desired_replicas."""

from __future__ import annotations

import math
import random

import pytest

from autoscaling.budget import Demand, allocate, desired_replicas


def d(name, priority=0, gpus=1.0, lo=0, hi=100, desired=0.0) -> Demand:
    return Demand(name, priority, gpus, lo, hi, desired)


CASES = [
    pytest.param([d("a", desired=3), d("b", desired=2)], 10, {"a": 3, "b": 2},
                 id="everything-fits"),
    pytest.param([d("a", desired=2.2), d("b", desired=0.2)], 10, {"a": 3, "b": 1},
                 id="desired-rounds-up"),
    pytest.param([d("a", desired=3.0000000001)], 10, {"a": 3}, id="float-noise-not-a-replica"),
    pytest.param([d("a", lo=2, desired=0), d("b", lo=1, desired=0)], 10, {"a": 2, "b": 1},
                 id="mins-without-load"),
    pytest.param([d("hi", priority=2, desired=8), d("lo", priority=1, lo=2, desired=5)], 6,
                 {"hi": 4, "lo": 2}, id="mins-before-higher-desired"),
    pytest.param([d("hi", priority=2, lo=3), d("lo", priority=1, lo=3)], 4,
                 {"hi": 3, "lo": 1}, id="mins-short-highest-first"),
    pytest.param([d("hi", priority=2, lo=3, gpus=2), d("lo", priority=1, lo=3)], 5,
                 {"hi": 2, "lo": 1}, id="mins-short-remainder-to-smaller"),
    pytest.param([d("final", 3, desired=4), d("draft", 2, desired=4), d("batch", 1, desired=4)],
                 6, {"final": 4, "draft": 2, "batch": 0}, id="priority-order"),
    pytest.param([d("a", hi=2, desired=9), d("b", hi=5, desired=9)], 100, {"a": 2, "b": 5},
                 id="max-caps"),
    pytest.param([d("a", lo=3, hi=3, desired=0)], 100, {"a": 3}, id="fixed-count"),
    pytest.param([d("a", gpus=0.5, desired=10)], 3, {"a": 6}, id="half-gpu-replicas"),
    pytest.param([d("a", gpus=0.1, desired=100)], 1, {"a": 10}, id="tenth-gpu-no-float-drift"),
    pytest.param([d("a", gpus=0.25, desired=3), d("b", gpus=1.5, desired=3)], 4,
                 {"a": 3, "b": 2}, id="mixed-sizes-fit"),
    pytest.param([d("big", 2, gpus=4, desired=2), d("small", 1, gpus=1, desired=3)], 6,
                 {"big": 1, "small": 2}, id="leftover-to-lower-priority"),
    pytest.param([d("a", desired=4), d("b", desired=2)], 3, {"a": 2, "b": 1},
                 id="tie-proportional"),
    pytest.param([d("a", desired=6), d("b", desired=3), d("c", desired=3)], 8,
                 {"a": 4, "b": 2, "c": 2}, id="tie-proportional-three"),
    pytest.param([d("b", desired=1), d("a", desired=1)], 1, {"a": 1, "b": 0},
                 id="tie-by-name"),
    pytest.param([d("a", lo=2, desired=4), d("b", desired=4)], 6, {"a": 3, "b": 3},
                 id="tie-counts-mins"),
    pytest.param([d("cpu", gpus=0, desired=7), d("gpu", desired=3)], 1, {"cpu": 7, "gpu": 1},
                 id="zero-gpu-replicas"),
    pytest.param([d("a", lo=1, desired=5)], 0, {"a": 0}, id="no-budget"),
    pytest.param([], 8, {}, id="no-demands"),
]


@pytest.mark.parametrize(("demands", "budget", "want"), CASES)
def test_allocate(demands, budget, want):
    assert allocate(demands, budget) == want


@pytest.mark.parametrize(("demands", "budget", "want"), CASES)
def test_allocate_ignores_input_order(demands, budget, want):
    assert allocate(list(reversed(demands)), budget) == want


def random_demands(rng: random.Random) -> list[Demand]:
    out = []
    for i in range(rng.randint(1, 6)):
        lo = rng.randint(0, 3)
        out.append(Demand(f"r{i}", rng.randint(0, 2), rng.choice([0.25, 0.5, 1, 2, 4]),
                          lo, lo + rng.randint(0, 8), rng.uniform(0, 12)))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_allocate_invariants(seed):
    rng = random.Random(seed)
    demands, budget = random_demands(rng), rng.choice([0, 1, 2.5, 4, 8, 16, 64])
    got = allocate(demands, budget)
    used = sum(got[x.name] * x.gpus_per_replica for x in demands)
    assert used <= budget + 1e-9
    for x in demands:
        assert 0 <= got[x.name] <= x.max_replicas
        assert got[x.name] <= max(x.min_replicas, math.ceil(x.desired))
    if sum(x.min_replicas * x.gpus_per_replica for x in demands) <= budget:
        assert all(got[x.name] >= x.min_replicas for x in demands)
    # nothing left unused that a short revision could have taken
    left = budget - used
    short = [x for x in demands if got[x.name] < min(x.max_replicas, x.wanted)]
    assert all(x.gpus_per_replica > left + 1e-9 for x in short)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gpus_per_replica": -1}, "gpus_per_replica"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas 3"),
        ({"min_replicas": -1}, "min_replicas -1"),
        ({"desired": -0.5}, "desired -0.5"),
        ({"desired": math.nan}, "desired nan"),
    ],
)
def test_bad_demand_rejected(kwargs, match):
    fields = {"name": "x", "priority": 0, "gpus_per_replica": 1.0, "min_replicas": 0,
              "max_replicas": 4, "desired": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        Demand(**fields)


@pytest.mark.parametrize(
    ("demands", "budget", "match"),
    [([d("a"), d("a")], 4, "duplicate"), ([d("a")], -1, "gpu_budget")],
)
def test_bad_allocation_rejected(demands, budget, match):
    with pytest.raises(ValueError, match=match):
        allocate(demands, budget)


@pytest.mark.parametrize(
    ("queued", "running", "current", "target", "kwargs", "want"),
    [
        (0, 0, 0, 8, {}, 0.0),
        (16, 8, 2, 8, {}, 3.0),
        (0, 4, 2, 8, {}, 0.5),
        (3, 0, 0, 4, {}, 0.75),  # scale from zero
        (40, 0, 1, 8, {"upscale_smoothing": 0.5}, 3.0),  # 1 + 0.5 (5 - 1)
        (0, 8, 5, 8, {"downscale_smoothing": 0.25}, 4.0),  # 5 - 0.25 (5 - 1)
        (8, 8, 2, 8, {"upscale_smoothing": 0.1, "downscale_smoothing": 0.1}, 2.0),
    ],
)
def test_desired_replicas(queued, running, current, target, kwargs, want):
    assert desired_replicas(queued, running, current, target, **kwargs) == pytest.approx(want)


@pytest.mark.parametrize(("args", "match"), [((1, 1, 1, 0), "target"), ((-1, 0, 1, 4), "negative")])
def test_desired_replicas_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        desired_replicas(*args)
