"""Autoscaling policy: merge of per-model overrides and Serve deployment options."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from autoscaling.policies import (
    DRAIN_POLL_S,
    Policy,
    ingress_deployment_options,
    load_policy,
    model_deployment_options,
)

SHIPPED = Path(__file__).resolve().parents[2] / "autoscaling" / "policy.yaml"

BASE = {
    "defaults": {
        "num_cpus": 1, "num_gpus": 0, "max_ongoing_requests": 8, "max_queued_requests": 32,
        "batching": {"max_batch_images": 8, "batch_wait_timeout_s": 0.05},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4},
    },
    "models": {},
    "ingress": {"num_cpus": 0.5, "replicas": 2, "max_ongoing_requests": 100},
    "cluster": {"node_types": {"h200": {"gpus_per_node": 8, "gpu_memory_gb": 141,
                                        "cost_per_hour": 80.0, "max_nodes": 2}}},
}


def policy(**models) -> Policy:
    doc = copy.deepcopy(BASE)
    doc["models"] = models
    return Policy.model_validate(doc)


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy(SHIPPED)


def test_shipped_final_override_keeps_default_wait(shipped):
    final = shipped.for_model("tiny-final")
    assert final.batching.max_batch_images == 4
    assert final.batching.batch_wait_timeout_s == 0.0
    # the untouched sections are the defaults
    assert final.autoscaling == shipped.for_model("tiny-spare").autoscaling


def test_shipped_unlisted_model_gets_defaults(shipped):
    raw = yaml.safe_load(SHIPPED.read_text())["defaults"]
    draft = shipped.for_model("tiny-spare")  # listed nowhere
    want = {"gpu_type": None, **raw}
    want["autoscaling"] = {"upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                           **raw["autoscaling"]}  # Serve's defaults
    assert draft.model_dump() == want
    assert draft.batching.max_batch_images == 8


def test_override_does_not_mutate_defaults():
    p = policy(m={"batching": {"max_batch_images": 2}})
    assert p.for_model("m").batching.max_batch_images == 2
    assert p.for_model("other").batching.max_batch_images == 8
    assert p.defaults["batching"]["max_batch_images"] == 8


@pytest.mark.parametrize(
    ("override", "path", "want"),
    [
        ({"batching": {"max_batch_images": 2}}, ("batching", "batch_wait_timeout_s"), 0.05),
        ({"batching": {"batch_wait_timeout_s": 1.0}}, ("batching", "max_batch_images"), 8),
        ({"batching": {"batch_wait_timeout_s": 1.0}}, ("batching", "batch_wait_timeout_s"), 1.0),
        ({"autoscaling": {"max_replicas": 4}}, ("autoscaling", "min_replicas"), 1),
        ({"autoscaling": {"max_replicas": 4}}, ("autoscaling", "target_ongoing_requests"), 4),
        ({"num_gpus": 1, "gpu_type": "h200"}, ("num_gpus",), 1),
        ({"num_gpus": 1, "gpu_type": "h200"}, ("num_cpus",), 1),
    ],
)
def test_overrides_merge_deeply(override, path, want):
    got = policy(m=override).for_model("m")
    for attr in path:
        got = getattr(got, attr)
    assert got == want


@pytest.mark.parametrize(
    ("scaling", "replicas"),
    [({"min_replicas": 1, "max_replicas": 1}, 1), ({"min_replicas": 3, "max_replicas": 3}, 3)],
)
def test_fixed_replicas_when_min_equals_max(scaling, replicas):
    opts = model_deployment_options(policy(m={"autoscaling": scaling}).for_model("m"))
    assert opts["num_replicas"] == replicas
    assert "autoscaling_config" not in opts


@pytest.mark.parametrize(
    "scaling",
    [{"min_replicas": 1, "max_replicas": 4}, {"min_replicas": 0, "max_replicas": 2,
                                              "target_ongoing_requests": 1.5}],
)
def test_autoscaling_config_when_min_below_max(scaling):
    p = policy(m={"autoscaling": scaling}).for_model("m")
    opts = model_deployment_options(p)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"target_ongoing_requests": 4, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0, **scaling}


def test_deployment_options_carry_resources_and_batching():
    p = policy(m={"num_gpus": 0.5, "gpu_type": "h200",
                  "batching": {"max_batch_images": 2}}).for_model("m")
    opts = model_deployment_options(p)
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 8
    assert opts["max_queued_requests"] == 32
    assert opts["user_config"] == {"max_batch_images": 2, "batch_wait_timeout_s": 0.05}


def test_shipped_deployment_options(shipped):
    opts = model_deployment_options(shipped.for_model("tiny-final"))
    assert opts["num_replicas"] == 1
    assert opts["user_config"] == {"max_batch_images": 4, "batch_wait_timeout_s": 0.0}


def test_ingress_options():
    assert ingress_deployment_options(policy().ingress) == {
        "ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 2, "max_ongoing_requests": 100,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }


@pytest.mark.parametrize(
    "where", [pytest.param("defaults", id="in-defaults"), pytest.param("model", id="in-override")]
)
def test_min_above_max_rejected(where):
    doc = copy.deepcopy(BASE)
    bad = {"min_replicas": 3, "max_replicas": 1}
    if where == "defaults":
        doc["defaults"]["autoscaling"].update(bad)
    else:
        doc["models"] = {"m": {"autoscaling": bad}}
    with pytest.raises(ValidationError, match="min_replicas 3 > max_replicas 1"):
        Policy.model_validate(doc)


def test_bad_override_error_names_the_model():
    doc = copy.deepcopy(BASE)
    doc["models"] = {"ok-model": {}, "bad-model": {"autoscaling": {"min_replicas": 3}}}
    with pytest.raises(ValidationError, match="bad-model"):
        Policy.model_validate(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.update(extra=1), id="top-level"),
        pytest.param(lambda d: d["defaults"].update(gpus=1), id="defaults"),
        pytest.param(lambda d: d["defaults"]["batching"].update(max_wait=1), id="batching"),
        pytest.param(lambda d: d["defaults"]["autoscaling"].update(target=1), id="autoscaling"),
        pytest.param(lambda d: d["models"].update(m={"replicas": 2}), id="model-override"),
        pytest.param(lambda d: d["models"].update(m={"batching": {"size": 2}}),
                     id="model-nested-override"),
        pytest.param(lambda d: d["ingress"].update(num_gpus=1), id="ingress"),
    ],
)
def test_unknown_fields_rejected(mutate):
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Policy.model_validate(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["defaults"]["batching"].update(max_batch_images=0), id="batch-0"),
        pytest.param(lambda d: d["defaults"]["batching"].update(batch_wait_timeout_s=-1),
                     id="negative-wait"),
        pytest.param(lambda d: d["defaults"]["autoscaling"].update(max_replicas=0),
                     id="max-replicas-0"),
        pytest.param(lambda d: d["defaults"]["autoscaling"].update(target_ongoing_requests=0),
                     id="target-0"),
        pytest.param(lambda d: d["defaults"].pop("batching"), id="missing-batching"),
        pytest.param(lambda d: d["ingress"].update(replicas=0), id="ingress-0"),
    ],
)
def test_out_of_range_values_rejected(mutate):
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(ValidationError):
        Policy.model_validate(doc)


@pytest.mark.parametrize(
    "text", [pytest.param("defaults: [", id="bad-yaml"),
             pytest.param("defaults: {}\ningress: {}\n", id="invalid"),
             pytest.param(None, id="missing-file")],
)
def test_load_policy_errors_name_the_file(tmp_path, text):
    path = tmp_path / "policy.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match="invalid autoscaling policy .*policy.yaml"):
        load_policy(path)


def test_gpu_replicas_name_a_node_type():
    with pytest.raises(ValidationError, match="needs a gpu_type"):
        policy(m={"num_gpus": 1})
    with pytest.raises(ValidationError, match="needs a gpu_type"):
        policy(m={"num_gpus": 1, "gpu_type": "a100"})
    assert policy(m={"num_gpus": 1, "gpu_type": "h200"}).cluster.gpu_budget("h200") == 16
