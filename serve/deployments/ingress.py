"""The ingress deployment: the HTTP app over ImageService, with Serve handles to
one model deployment per revision as its backend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve as ray_serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..batching import Batcher, QueueFull
from ..engines.base import Generated, Job
from ..errors import GenerationFailed, ImagegenError, ModelUnavailable, Overloaded
from ..ingress.http import build_http_app
from ..lockfile import Lock
from ..routing import RoutingTable
from ..service import ImageService
from ..telemetry import Metrics, setup, stage, traceparent
from .model import ModelCall

STATUS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Coalescing:
    """How the ingress merges concurrent requests for one model into handle calls."""

    max_images: int  # per call (the model's batch size)
    max_calls: int  # in flight at once: enough to keep every replica's queue fed
    max_queued: int | None  # requests waiting in the ingress before 503 overloaded


class HandleBackend:
    """Backend over Serve handles. Concurrent requests for one model leave as one
    call (continuous batching, serve/batching.py); Ray failures map onto the
    error table."""

    def __init__(
        self, handles: dict[str, DeploymentHandle], coalescing: dict[str, Coalescing],
        metrics: Metrics | None = None,
    ):
        self.handles = {name: h.options(method_name="generate") for name, h in handles.items()}
        self.batchers: dict[str, Batcher[ModelCall, Generated]] = {
            name: Batcher(
                partial(self._call, name), max_size=c.max_images, size=lambda c: len(c.jobs),
                max_concurrent=c.max_calls, max_queued=c.max_queued,
            )
            for name, c in coalescing.items()
        }
        self.metrics = metrics

    async def generate(self, model: str, jobs: list[Job]) -> Generated:
        # The CLIENT span's context travels with the request into the replica,
        # whichever call it is merged into.
        with stage("model.call", kind=SpanKind.CLIENT, **{"gen_ai.request.model": model}):
            batcher = self.batchers[model]
            try:
                return await batcher.submit(ModelCall(jobs, traceparent()))
            except QueueFull:
                raise Overloaded(f"model {model} is at capacity; retry shortly") from None

    async def _call(self, model: str, requests: list[ModelCall]) -> list[Generated | Exception]:
        if self.metrics is not None:
            self.metrics.set("imagegen_queued_images", self.batchers[model].queued,
                             model=model, where="ingress")
        try:
            return await self.handles[model].remote(requests)
        except BackPressureError:
            raise Overloaded(f"model {model} is at capacity; retry shortly") from None
        except RayTaskError as e:
            if isinstance(e.cause, ImagegenError):
                raise e.cause from None
            raise GenerationFailed(f"model {model} failed: {type(e.cause).__name__}") from None
        except (ActorDiedError, ActorUnavailableError) as e:
            raise ModelUnavailable(f"model {model} replica unavailable: {e}") from None


@ray_serve.deployment
@ray_serve.ingress()
class Ingress:
    def __init__(
        self,
        lock: Lock,
        routing: RoutingTable,
        models: dict[str, DeploymentHandle],
        coalescing: dict[str, Coalescing],
        max_body_bytes: int,
    ) -> None:
        setup("ingress")
        self.routing = routing
        self.metrics = Metrics()
        for tier in routing.tiers:
            self.metrics.set("imagegen_fallback_active", 0, tier=tier)
        self.status_handles = {n: h.options(method_name="status") for n, h in models.items()}
        backend = HandleBackend(models, coalescing, self.metrics)
        self.service = ImageService(lock, routing, backend)
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return build_http_app(
            self.service, self.readiness, max_body_bytes=self.max_body_bytes,
            metrics=self.metrics, echo_request_id=False,
        )

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every routed revision is ready; reports every revision."""
        names = list(self.status_handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.status_handles[n].remote(), STATUS_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        models = {}
        for name, res in zip(names, results, strict=True):
            if isinstance(res, BaseException):
                res = {"ready": False, "reason": f"status unavailable: {type(res).__name__}"}
            res["tiers"] = self.routing.tiers_of(name)
            models[name] = res
        ready = all(models[n]["ready"] for n in self.routing.routed_models())
        return ready, models
