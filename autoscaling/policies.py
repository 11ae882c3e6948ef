"""Per-model replica, batching and autoscaling policy, and what turns it into
Ray Serve deployment options. Data lives in policy.yaml; this module is pure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(_Strict):
    max_batch_images: Annotated[int, Field(ge=1, le=256)] = Field(
        description="most images in one pipeline call"
    )
    batch_wait_timeout_s: Annotated[float, Field(ge=0, le=10)] = Field(
        description="how long a batch waits for company once it has one request"
    )


class Autoscaling(_Strict):
    min_replicas: Annotated[int, Field(ge=0)] = Field(description="floor (0 allows cold)")
    max_replicas: Annotated[int, Field(ge=1)] = Field(description="ceiling for this model")
    target_ongoing_requests: Annotated[float, Field(gt=0)] = Field(
        description="requests per replica the autoscaler aims for"
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="how long a scale-up must be wanted before it happens"
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        600.0,
        description=(
            "how long a scale-down must be wanted; under the budget policy also how long a "
            "higher-priority tier waits for a lower one to give GPUs back"
        ),
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}"
            )
        return self


class ModelPolicy(_Strict):
    num_cpus: Annotated[float, Field(ge=0)] = Field(description="CPUs reserved per replica")
    num_gpus: Annotated[float, Field(ge=0)] = Field(description="GPUs per replica")
    gpu_type: str | None = Field(
        None, description="cluster.node_types key this revision runs on (None on CPU)"
    )
    cpu_threads: Annotated[int, Field(ge=1, le=256)] | None = Field(
        None, description="torch threads per replica on CPU; None: every core of the node"
    )
    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        description="requests a replica holds (running + waiting for a batch)"
    )
    max_queued_requests: Annotated[int, Field(ge=-1)] = Field(
        description="requests callers may queue for this model before 503 (-1: no limit)"
    )
    batching: Batching
    autoscaling: Autoscaling


class IngressPolicy(_Strict):
    num_cpus: Annotated[float, Field(ge=0)] = Field(description="CPUs per ingress replica")
    replicas: Annotated[int, Field(ge=1)] = Field(description="ingress replicas")
    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(description="per replica")


class NodeType(_Strict):
    gpus_per_node: Annotated[int, Field(ge=1)] = Field(
        description="GPUs on one node (for the `cpu` node type: cores)"
    )
    gpu_memory_gb: Annotated[float, Field(gt=0)] = Field(description="memory of one GPU")
    cost_per_hour: Annotated[float, Field(ge=0)] = Field(description="price of one node")
    max_nodes: Annotated[int, Field(ge=0)] = Field(
        description="hard cap (the KubeRay GPU worker group's maxReplicas)"
    )
    shared_cores: bool = Field(
        False,
        description=(
            "a CPU node: its `gpus_per_node` are cores shared by every replica placed "
            "there, not handed out whole. Replicas are placed by their num_cpus (Ray's "
            "reservation), `gpu_memory_gb` is the node's memory, and a batch slows down "
            "while the node's busy threads exceed its cores"
        ),
    )
    cpu_per_request_s: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description=(
            "core-seconds each request costs a shared-cores node outside the pipelines "
            "(ingress, Ray, encoding, a load generator beside it); measured by "
            "`imagegen capacity profile --in-place`"
        ),
    )


class Cluster(_Strict):
    node_types: dict[str, NodeType] = Field(
        default_factory=dict, description="GPU type -> its node type and hard cap"
    )
    priorities: dict[str, int] = Field(
        default_factory=lambda: {"final": 3, "draft": 2, "batch": 1},
        description="tier -> priority; higher gets GPUs first when they are short",
    )
    budget_policy: bool = Field(
        False,
        description=(
            "autoscale with the shared GPU budget policy (autoscaling/serve_policy.py), "
            "which never asks beyond the cap; else each revision scales alone"
        ),
    )

    def gpu_budget(self, gpu_type: str) -> int:
        node = self.node_types[gpu_type]
        return node.gpus_per_node * node.max_nodes


class Policy(_Strict):
    defaults: dict[str, Any] = Field(description="ModelPolicy fields shared by all models")
    models: dict[str, dict[str, Any]] = Field(default_factory=dict, description="overrides")
    ingress: IngressPolicy
    cluster: Cluster = Field(default_factory=Cluster, description="GPU nodes and the cap")

    def for_model(self, name: str) -> ModelPolicy:
        return ModelPolicy.model_validate(_merge(self.defaults, self.models.get(name, {})))

    @model_validator(mode="after")
    def _valid(self) -> Policy:
        for name in ["<defaults>", *self.models]:
            try:
                p = self.for_model(name)
            except ValidationError as e:
                raise ValueError(f"policy for model {name}: {e}") from None
            if p.num_gpus > 0 and p.gpu_type not in self.cluster.node_types:
                raise ValueError(
                    f"policy for model {name}: num_gpus {p.num_gpus} needs a gpu_type from "
                    f"cluster.node_types {sorted(self.cluster.node_types)}, got {p.gpu_type!r}"
                )
        return self


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_policy(path: Path) -> Policy:
    try:
        return Policy.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise ValueError(f"invalid autoscaling policy {path}: {e}") from None


# How often a stopping replica looks for requests still in flight. Serve's 2 s
# default is paid even by an idle replica, once for the ingress and once more
# for the model deployments behind it, on every stop and rolling update.
DRAIN_POLL_S = 0.2


def model_deployment_options(p: ModelPolicy) -> dict[str, Any]:
    """Keyword arguments for `Deployment.options(...)` of one model revision."""
    scaling = p.autoscaling
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus},
        "max_ongoing_requests": p.max_ongoing_requests,
        "max_queued_requests": p.max_queued_requests,
        "user_config": p.batching.model_dump(),
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }
    if scaling.min_replicas == scaling.max_replicas:
        opts["num_replicas"] = scaling.max_replicas
    else:
        opts["autoscaling_config"] = scaling.model_dump()
    return opts


def ingress_deployment_options(p: IngressPolicy) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": p.num_cpus},
        "num_replicas": p.replicas,
        "max_ongoing_requests": p.max_ongoing_requests,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }
