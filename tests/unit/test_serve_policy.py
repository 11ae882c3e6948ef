"""The budget autoscaling policy: decisions by table, the Serve adapter over real
AutoscalingContext objects, and the Serve config it is deployed with."""

from __future__ import annotations

import pytest
import yaml
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext
from ray.serve.schema import ServeDeploySchema

from autoscaling.policies import Policy, load_policy
from autoscaling.serve_policy import (
    POLICY_FUNCTION,
    BudgetPolicy,
    DeploymentState,
    decide,
    serve_config,
)
from serve.config import ROOT
from serve.lockfile import load_lock
from serve.routing import load_routing


def st(name, *, held, images, prio=1, gpus=1.0, lo=1, hi=8, target=8.0, gpu="h200", now=-1):
    return DeploymentState(name, gpu, gpus, prio, lo, hi, held, images, target, now)


@pytest.mark.parametrize(
    ("states", "budget", "want"),
    [
        # Room for both: each goes to its queue pressure (images / target).
        ([st("a", held=1, images=24), st("b", held=1, images=16)], 8, {"a": 3, "b": 2}),
        # Short: the final tier (priority 3) first, the draft gets what is left.
        ([st("final", held=1, images=48, prio=3), st("draft", held=1, images=48, prio=2)], 8,
         {"final": 6, "draft": 2}),
        # The draft holds 5 GPUs: it is told to shrink, but the final may only take
        # GPUs nobody holds yet (2 free); the rest follows once the draft stops.
        ([st("final", held=1, images=64, prio=3), st("draft", held=5, images=64, prio=2)], 8,
         {"final": 3, "draft": 1}),
        # Idle: down to the mins, never below.
        ([st("a", held=4, images=0), st("b", held=3, images=0, lo=0)], 8, {"a": 1, "b": 0}),
        # Max replicas bound the claim; fractional GPUs per replica.
        ([st("a", held=1, images=800, hi=3, gpus=0.5)], 8, {"a": 3}),
        ([st("a", held=1, images=800, hi=100, gpus=0.5)], 8, {"a": 16}),
        # lo's target is 1 but a replica of it is still stopping (held 2): load comes
        # back, yet raising its target would ask for a 4th GPU of 3.
        ([st("hi", held=1, images=8, prio=3), st("lo", held=2, images=24, now=1)], 3,
         {"hi": 1, "lo": 1}),
        # Two GPU types are two budgets.
        ([st("a", held=1, images=80, gpu="h200"), st("b", held=1, images=80, gpu="l4")],
         {"h200": 2, "l4": 4}, {"a": 2, "b": 4}),
    ],
)
def test_decisions(states, budget, want):
    budget = budget if isinstance(budget, dict) else {"h200": budget}
    got = decide(states, budget)
    assert got == want
    for gpu, cap in budget.items():
        # GPUs asked for: held ones, plus every step above a current target
        asked = sum((s.held + max(0, got[s.name] - s.current_target)) * s.gpus_per_replica
                    for s in states if s.gpu_type == gpu)
        assert asked <= cap + 1e-9 or all(got[s.name] <= s.current_target for s in states)


def test_repeated_ticks_converge_under_the_cap():
    """Replaying decide as Serve would (downscales take effect one tick later)."""
    held = {"final": 1, "draft": 7}
    for _ in range(4):
        states = [st("final", held=held["final"], images=64, prio=3),
                  st("draft", held=held["draft"], images=64, prio=2)]
        held = decide(states, {"h200": 8})
        assert sum(held.values()) <= 8
    assert held == {"final": 7, "draft": 1}  # final wants 8, the draft keeps its min


def ctx(name, *, current, target, queued, running, lo=1, hi=4):
    dep = DeploymentID(name, "imagegen")
    reps = {f"r{i}": 0.0 for i in range(current)}
    return dep, AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name="imagegen",
        current_num_replicas=current, target_num_replicas=target, running_replicas=[],
        total_num_requests=1.0, total_queued_requests=0.0,
        aggregated_metrics={"queued_images": {**reps, "r0": queued},
                            "running_images": {**reps, "r0": running}},
        raw_metrics=None, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
        config=None,
    )


def test_serve_adapter_reads_replica_stats_and_skips_unnamed_deployments():
    policy = BudgetPolicy(
        budget={"h200": 3},
        deployments={"final-abc": {"gpu_type": "h200", "gpus": 1, "priority": 3,
                                   "target_images": 8},
                     "draft-def": {"gpu_type": "h200", "gpus": 1, "priority": 2,
                                   "target_images": 8}},
    )
    contexts = dict([ctx("final-abc", current=1, target=1, queued=20, running=4),
                     ctx("draft-def", current=1, target=1, queued=40, running=8),
                     ctx("Ingress", current=1, target=1, queued=0, running=0)])
    decisions, state = policy(contexts)
    assert {d.name: n for d, n in decisions.items()} == {"final-abc": 2, "draft-def": 1}
    assert state == {}


def test_serve_config_carries_the_policy_and_validates():
    lock = load_lock(ROOT / "models.lock")
    routing = load_routing(ROOT / "serve" / "routing.yaml", lock)
    gpu = load_policy(ROOT / "autoscaling" / "policy-gpu.yaml")
    app = serve_config(gpu, lock, routing, args={"model_dir": "/models"})
    ServeDeploySchema.model_validate({"applications": [app]})  # what `serve deploy` checks
    policy = app["autoscaling_policy"]
    assert policy["policy_function"] == POLICY_FUNCTION
    kw = policy["policy_kwargs"]
    assert kw["budget"] == {"nvidia-h200": 16.0}
    final = kw["deployments"][lock.models["tiny-final"].deployment_name]
    draft = kw["deployments"][lock.models["tiny-draft"].deployment_name]
    assert final["priority"] == 3 > draft["priority"] == 2
    assert final["target_images"] == 8 and draft["target_images"] == 16
    BudgetPolicy(**kw)  # the kwargs construct the policy as Serve will
    # tiny-spare serves no tier as primary but backs final: it gets final's priority,
    # so the switch to it does not meet a fallback starved of GPUs.
    assert kw["deployments"][lock.models["tiny-spare"].deployment_name]["priority"] == 3
    # A fixed-size GPU deployment takes its GPUs out of the budget first.
    doc = yaml.safe_load((ROOT / "autoscaling" / "policy-gpu.yaml").read_text())
    doc["models"]["tiny-spare"]["autoscaling"] = {"min_replicas": 6, "max_replicas": 6,
                                                  "target_ongoing_requests": 4}
    fixed = serve_config(Policy.model_validate(doc), lock, routing)
    kw = fixed["autoscaling_policy"]["policy_kwargs"]
    assert kw["budget"] == {"nvidia-h200": 10.0}
    assert lock.models["tiny-spare"].deployment_name not in kw["deployments"]
    local = load_policy(ROOT / "autoscaling" / "policy.yaml")
    assert "autoscaling_policy" not in serve_config(local, lock, routing)


def test_a_stopping_replica_holds_its_gpu_for_release_s():
    now = [0.0]
    spec = {"gpu_type": "h200", "gpus": 1, "target_images": 8}
    policy = BudgetPolicy(budget={"h200": 3}, release_s=20, clock=lambda: now[0],
                          deployments={"hi": {**spec, "priority": 3},
                                       "lo": {**spec, "priority": 1}})

    def tick(hi_running, hi_target, lo_running, lo_target):
        contexts = dict([ctx("hi", current=hi_running, target=hi_target, queued=24, running=0),
                         ctx("lo", current=lo_running, target=lo_target, queued=24, running=0)])
        return {d.name: n for d, n in policy(contexts)[0].items()}

    assert tick(1, 1, 2, 2) == {"hi": 1, "lo": 1}  # lo told to shrink; nothing free yet
    now[0] = 5
    assert tick(1, 1, 1, 1) == {"hi": 1, "lo": 1}  # lo's replica is stopping: still held
    now[0] = 24
    assert tick(1, 1, 1, 1) == {"hi": 1, "lo": 1}
    now[0] = 26
    assert tick(1, 1, 1, 1) == {"hi": 2, "lo": 1}  # released 21 s after it left
