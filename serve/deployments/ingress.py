"""The ingress deployment: the HTTP app and the gRPC methods over ImageService, with Serve handles to
one model deployment per revision as its backend, and the live routing: the
document from its source, each revision's readiness polled every second."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.trace import SpanKind
from ray import serve as ray_serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ..batch.jobs import BatchJobs, manifest, manifest_key
from ..batch.queue import open_queue
from ..batch.webhooks import Webhooks, parse_secret
from ..batch.worker import BatchWorker, report_depth
from ..batching import Batcher, QueueFull
from ..engines.base import Generated, Job
from ..errors import GenerationFailed, ImagegenError, ModelTimeout, ModelUnavailable, Overloaded
from ..ingress.grpc import GrpcTransport
from ..ingress.http import build_http_app
from ..lockfile import Lock
from ..quotas.auth import Authenticator, Upstream
from ..quotas.idempotency import LEASE_S, open_replays
from ..quotas.keys import FileKeys, open_keys
from ..quotas.ledger import open_ledger
from ..quotas.plans import Plans
from ..routing import LiveRouting, RoutingTable
from ..routing.sources import ConfigMapSource, watch_dir, watch_file
from ..safety.classifier import (
    ClassifierUnavailable,
    LocalClassifier,
    Scores,
    load_attribute,
    load_classifier,
)
from ..safety.policy import LivePolicy, load_policy_file
from ..safety.review import open_review
from ..service import ImageService
from ..storage.results import Results
from ..storage.store import open_store
from ..telemetry import Metrics, setup, stage, traceparent
from ..templates.library import load_library
from ..templates.render import Styles
from .model import ModelCall

log = logging.getLogger("imagegen.ingress")

STATUS_TIMEOUT_S = 2.0
READY_POLL_S = 1.0
DRAIN_POLL_S = 0.1  # how soon the batch worker stops claiming once the replica stops
DRAIN_GRACE_S = 300.0  # app.py passes settings.request_timeout_s


def _serve_replica() -> Any:
    """The Ray Serve replica this process hosts (Ray 2.60: the ReplicaActor's
    `_replica_impl`), or None outside Serve. Read for one flag: see Drain."""
    try:
        from ray._private.worker import global_worker

        actor = global_worker.actors.get(global_worker.actor_id)
    except Exception:  # noqa: BLE001 - not in a Ray actor
        return None
    return getattr(actor, "_replica_impl", None)


class Drain:
    """Whether Serve is stopping this replica, and how long its requests may still run.

    Serve tells user code nothing until `__del__`, which it calls only once no request
    is in flight; meanwhile a direct-ingress replica admits every new request (Ray
    2.60 serve/_private/replica.py, `_perform_graceful_shutdown`), so under steady
    load it never drains and is killed mid-request at graceful_shutdown_timeout_s.
    The replica's `_shutting_down` flag (set as its stop begins; documented there as
    readable by subclasses) is the one early signal: read on every request, it costs
    an attribute lookup. Hazard: a private attribute; where it is missing (another
    Ray) nothing drains early and Serve's own stop applies, with a warning."""

    def __init__(self, grace_s: float, replica: Any = None) -> None:
        self.grace_s = grace_s  # the longest a request admitted before the stop may run
        self.since: float | None = None  # time.monotonic() when the stop was seen
        self._replica = replica
        self._looked = replica is not None

    def __call__(self) -> bool:
        if self.since is not None:
            return True
        if not self._looked:
            self._looked = True
            self._replica = _serve_replica()
            if self._replica is None:
                log.debug("not in a Serve replica: no early drain")
            elif not hasattr(self._replica, "_shutting_down"):
                log.warning("this Ray Serve has no replica _shutting_down flag: a stopping "
                            "ingress replica will keep admitting requests")
        if not getattr(self._replica, "_shutting_down", False):
            return False
        self.since = time.monotonic()
        return True

    def left_s(self) -> float:
        """Grace left to the requests in flight (all of it before the stop)."""
        if self.since is None:
            return self.grace_s
        return max(0.0, self.since + self.grace_s - time.monotonic())


@dataclass(frozen=True)
class RoutingSource:
    """Where the ingress follows the routing document: a file (or a mounted
    ConfigMap), or one ConfigMap through the Kubernetes API."""

    file: str | None = None
    configmap: str | None = None
    namespace: str | None = None
    key: str = "routing.yaml"
    kubeconfig: str | None = None

    def describe(self) -> str:
        if self.configmap:
            return f"configmap {self.namespace or '(pod namespace)'}/{self.configmap}"
        return f"file {self.file}"


@dataclass(frozen=True)
class Access:
    """Who may call: API keys from the state store and a mounted keys file; whether
    any caller may pin a revision."""

    state_url: str
    keys_file: str | None = None
    allow_pinning: bool = False
    plans: Plans | None = None
    in_flight_per_principal: int = 0
    upstream: Upstream | None = None  # a gateway trusted to name the caller
    idempotency_lease_s: float = LEASE_S  # longer than any request may run
    prompt_policy_file: str | None = None  # watched like the routing document
    styles_dir: str | None = None  # the style library, watched
    review_keep_prompts: bool = False
    image_classifier: str = "none"  # the setting; its placement decides who runs it
    image_classifier_placement: str = "deployment"
    image_safety_fail_open: bool = False
    captioner: str | None = None  # module:attribute
    storage: dict[str, Any] | None = None  # open_store's url and options, and Results'
    c2pa: tuple[str, str, str] | None = None  # certificate chain, key, algorithm
    batch: dict[str, Any] | None = None  # app.batch_of: limits, worker, webhooks

    def signer(self):
        if self.c2pa is None:
            return None
        from ..imaging.provenance import C2paSigner  # made in this process (not forked)

        cert, key, alg = self.c2pa
        return C2paSigner(cert, key, alg=alg)

    def results(self) -> Results | None:
        if not self.storage:
            return None
        s = dict(self.storage)
        store = open_store(s.pop("url"), endpoint_url=s.pop("endpoint_url"),
                           sse=s.pop("sse"), kms_key_id=s.pop("kms_key_id"))
        return Results(store, s.pop("secret").encode(), **s)

    def authenticator(self) -> Authenticator:
        return Authenticator(open_keys(self.state_url),
                             FileKeys(Path(self.keys_file)) if self.keys_file else None,
                             upstream=self.upstream)


# Model and classifier calls go by value over gRPC straight to the replica, not as
# Ray actor tasks through the object store (issue 18: the hop 7.7-8.3 -> 4.8-5.5 ms
# at c=1). Said here, not left to RAY_SERVE_USE_GRPC_BY_DEFAULT: a handle takes that
# default where it is made (the driver that builds the app, whose environment is set
# too late for it), and keeps it wherever it is unpickled.
BY_REFERENCE = False


@dataclass(frozen=True)
class Coalescing:
    """How the ingress merges concurrent requests for one model into handle calls."""

    max_images: int  # per call (the model's batch size)
    max_calls: int  # in flight at once: enough to keep every replica's queue fed
    max_queued: int | None  # requests waiting in the ingress before 503 overloaded
    # calls that may leave part full (one per replica); the others wait to be full or
    # for a call to end (None: every call)
    max_partial: int | None = None

    @property
    def capacity(self) -> int:
        """Requests the model can hold in this replica, queued or in its running
        calls (0: unbounded); the service refuses the next before any other work."""
        return 0 if self.max_queued is None else self.max_queued + self.max_calls * self.max_images


class HandleBackend:
    """Backend over Serve handles. Concurrent requests for one model leave as one
    call (continuous batching, serve/batching.py); Ray failures map onto the
    error table."""

    def __init__(
        self, handles: dict[str, DeploymentHandle], coalescing: dict[str, Coalescing],
        metrics: Metrics | None = None, timeout_s: Callable[[], float] = lambda: 120.0,
    ):
        self.timeout_s = timeout_s  # live: the routing document's breaker.timeout_s
        self.handles = {name: h.options(method_name="generate", _by_reference=BY_REFERENCE)
                        for name, h in handles.items()}
        self.batchers: dict[str, Batcher[ModelCall, Generated]] = {
            name: Batcher(
                partial(self._call, name), max_size=c.max_images, size=lambda c: len(c.jobs),
                max_concurrent=c.max_calls, max_partial=c.max_partial,
                max_queued=c.max_queued,
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
        timeout = self.timeout_s()
        response = self.handles[model].remote(requests)
        try:
            # Ray waits forever for a deployment with no replica: bound every call.
            return await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()  # awaiting stops; the replica's work must stop too
            raise ModelTimeout(f"model {model} did not answer within {timeout:g} s") from None
        except asyncio.CancelledError:
            response.cancel()  # the replica's work must stop too
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise  # every caller of this call went away (the batcher's abandon)
            # Ray cancelled it (its replica is stopping): another revision may serve.
            raise ModelUnavailable(f"model {model} call was cancelled") from None
        except DeploymentUnavailableError as e:
            raise ModelUnavailable(f"model {model} is unavailable: {e}") from None
        except BackPressureError:
            raise Overloaded(f"model {model} is at capacity; retry shortly") from None
        except RayTaskError as e:
            if isinstance(e.cause, ImagegenError):
                raise e.cause from None
            raise GenerationFailed(f"model {model} failed: {type(e.cause).__name__}") from None
        except (ActorDiedError, ActorUnavailableError) as e:
            raise ModelUnavailable(f"model {model} replica unavailable: {e}") from None
        except grpc.aio.AioRpcError as e:
            # Serve's gRPC hop maps only UNAVAILABLE (and its own CANCELLED) to Ray's
            # errors; the rest (RESOURCE_EXHAUSTED, INTERNAL, ...) is this replica's
            # failure: another revision may serve.
            raise ModelUnavailable(f"model {model} call failed: gRPC {e.code().name}: "
                                   f"{e.details()}") from None


class HandleClassifier:
    """Stage 9's classifier in its own deployment (deployments/safety.py)."""

    def __init__(self, handle: DeploymentHandle, name: str,
                 timeout_s: Callable[[], float]) -> None:
        self.handle = handle.options(method_name="classify", _by_reference=BY_REFERENCE)
        self.name = name
        self.timeout_s = timeout_s

    async def classify(self, images) -> list[Scores]:
        response = self.handle.remote(images)
        try:
            return await asyncio.wait_for(response, self.timeout_s())
        except TimeoutError:
            response.cancel()
            raise ClassifierUnavailable(f"no answer within {self.timeout_s():g} s") from None
        except asyncio.CancelledError:
            response.cancel()
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise  # the caller went away
            # Ray cancelled it (its replica is stopping): unavailable, not a hang-up
            raise ClassifierUnavailable("the classifier call was cancelled") from None
        except RayTaskError as e:  # its own failure, as raised in the replica
            raise ClassifierUnavailable(str(e.cause)) from None
        except (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError,
                BackPressureError) as e:
            raise ClassifierUnavailable(f"{type(e).__name__}: {e}") from None
        except grpc.aio.AioRpcError as e:  # past Serve's own mapping (above)
            raise ClassifierUnavailable(f"gRPC {e.code().name}: {e.details()}") from None


class _Failing:
    """A classifier that could not load in this process: every call says why."""

    def __init__(self, name: str, why: str) -> None:
        self.name, self.why = name, why

    async def classify(self, images) -> list[Scores]:
        raise ClassifierUnavailable(self.why)


def _captioner(spec: str | None):
    return load_attribute(spec, "captioner")() if spec else None


@ray_serve.deployment
@ray_serve.ingress()
class Ingress:
    async def __init__(
        self,
        lock: Lock,
        routing: RoutingTable,
        models: dict[str, DeploymentHandle],
        coalescing: dict[str, Coalescing],
        max_body_bytes: int,
        source: RoutingSource | None = None,
        access: Access | None = None,
        safety: DeploymentHandle | None = None,
        drain_grace_s: float = DRAIN_GRACE_S,
    ) -> None:
        setup("ingress")
        self.metrics = Metrics()
        self.drain = Drain(drain_grace_s)
        # Only a direct-ingress replica refuses while it drains: behind Serve's proxies
        # (KubeRay) a stopping replica is taken out of routing and, once quiescing,
        # Serve itself sends a request elsewhere; refusing there would fail requests
        # Serve would have served. /readyz says draining either way.
        self._refuses = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
        self.batch_worker: BatchWorker | None = None
        self._worker_stop: asyncio.Task | None = None
        source = source or RoutingSource()
        self.routing = LiveRouting(routing, lock, source.describe(), metrics=self.metrics)
        self.status_handles = {n: h.options(method_name="status") for n, h in models.items()}
        backend = HandleBackend(models, coalescing, self.metrics,
                                timeout_s=lambda: self.routing.table.breaker.timeout_s)
        policy = styles = None
        if access and access.prompt_policy_file:
            policy = LivePolicy(load_policy_file(Path(access.prompt_policy_file)), self.metrics)
        if access and access.styles_dir:
            styles = Styles(load_library(Path(access.styles_dir)), self.metrics)
        self.service = ImageService(
            lock, self.routing, backend, auth=access.authenticator() if access else None,
            plans=access.plans if access else None,
            ledger=open_ledger(access.state_url) if access else None,
            may_pin=bool(access and access.allow_pinning),
            in_flight_per_principal=access.in_flight_per_principal if access else 0,
            capacity={n: c.capacity for n, c in coalescing.items() if c.capacity},
            replays=open_replays(access.state_url) if access else None,
            idempotency_lease_s=access.idempotency_lease_s if access else LEASE_S,
            policy=policy, styles=styles,
            review=open_review(access.state_url) if access else None,
            keep_prompts=bool(access and access.review_keep_prompts),
            classifier=self._classifier(access, safety),
            fail_open=bool(access and access.image_safety_fail_open),
            captioner=_captioner(access.captioner) if access else None,
            results=access.results() if access else None,
            c2pa=access.signer() if access else None)
        self.safety_status = safety.options(method_name="status") if safety else None
        self.safety: dict[str, Any] | None = None
        self.grpc = GrpcTransport(self.service, self.readiness, self.metrics,
                                  max_body_bytes=max_body_bytes, draining=self.refusing)
        self.max_body_bytes = max_body_bytes
        self.statuses: dict[str, dict[str, Any]] = {}
        self._tasks = [asyncio.create_task(self._poll_readiness(), name="imagegen-readiness"),
                       asyncio.create_task(self._watch_drain(), name="imagegen-drain")]
        self._watch = None
        if source.configmap:
            self._watch = ConfigMapSource(
                source.namespace, source.configmap, source.key, self.routing.apply_text,
                self.routing.unreachable, asyncio.get_running_loop(), source.kubeconfig,
                reachable=self.routing.reachable)
            self._watch.start()
        elif source.file:
            self._tasks.append(asyncio.create_task(watch_file(
                Path(source.file), self.routing.apply_text, self.routing.unreachable)))
        if access and access.batch:
            self._start_batches(access)
        if policy is not None:
            self._tasks.append(asyncio.create_task(watch_file(
                Path(access.prompt_policy_file), policy.apply_text, policy.unreachable,
                what="prompt policy file")))
        if styles is not None:
            self._tasks.append(asyncio.create_task(watch_dir(
                Path(access.styles_dir), styles.reload)))
        await self._refresh_readiness()

    def _start_batches(self, access: Access) -> None:
        """Batch jobs: the routes' store, and this replica's worker, which claims items
        only while this replica's interactive requests are few (batch yields)."""
        b = access.batch
        queue = open_queue(access.state_url)
        hooks = Webhooks(parse_secret(b["webhook_secret"]), b["webhook_allowlist"]) \
            if b["webhook_allowlist"] else None
        owners: dict[str, str] = {}

        async def run(item):
            if item.batch_id not in owners:
                owners[item.batch_id] = (await queue.get(item.batch_id)).principal
            return await self.service.run_item(item, owners[item.batch_id])

        def busy() -> bool:
            interactive = sum(self.service.capacity.counts.values()) - worker.in_flight
            return interactive >= max(1, b["yield_at"])

        async def write_manifest(batch) -> None:
            await self.service.results.store.put(
                manifest_key(batch.id), manifest(await queue.items(batch.id)),
                "application/jsonl")

        # Built even where it claims nothing (concurrency 0): it records a batch's end
        # when a cancel leaves nothing in flight.
        worker = BatchWorker(queue, run, name=f"ingress-{os.getpid()}", lease_s=b["lease_s"],
                             concurrency=max(1, b["concurrency"]), attempts=b["attempts"],
                             busy=busy, webhooks=hooks, metrics=self.metrics,
                             manifest=write_manifest if self.service.results else None)
        self.service.batches = BatchJobs(queue, self.service.preflight,
                                         max_items=b["max_items"],
                                         allow_webhook=hooks.check if hooks else None,
                                         ended=worker.notify_if_done,
                                         manifests=self.service.results is not None)
        self.batch_worker = worker
        self._tasks.append(asyncio.create_task(report_depth(queue, self.metrics)))
        if b["concurrency"]:
            worker.start()  # stopped by _stop_batches, never cancelled with the rest

    def _classifier(self, access: Access | None, safety: DeploymentHandle | None):
        if access is None or access.image_classifier == "none":
            return None
        if safety is not None:
            return HandleClassifier(safety, access.image_classifier,
                                    lambda: self.routing.table.breaker.timeout_s)
        try:
            return LocalClassifier(load_classifier(access.image_classifier))
        except Exception as e:  # noqa: BLE001 - fails closed per request, with the reason
            log.error("image classifier %s unavailable: %s", access.image_classifier, e)
            return _Failing(access.image_classifier, f"{type(e).__name__}: {e}")

    def __serve_build_asgi_app__(self):
        return build_http_app(
            self.service, self.readiness, max_body_bytes=self.max_body_bytes,
            metrics=self.metrics, echo_request_id=False, draining=self.refusing,
        )

    # gRPC (ingress/grpc.py): Serve calls the method named like the RPC, with the
    # request's bytes and its context.
    async def Generate(self, request: bytes, grpc_context):
        return await self.grpc.generate(request, grpc_context)

    async def ListModels(self, request: bytes, grpc_context):
        return await self.grpc.list_models(request, grpc_context)

    async def GetQuota(self, request: bytes, grpc_context):
        return await self.grpc.get_quota(request, grpc_context)

    async def ListTemplates(self, request: bytes, grpc_context):
        return await self.grpc.list_templates(request, grpc_context)

    async def GetImage(self, request: bytes, grpc_context):
        return await self.grpc.get_image(request, grpc_context)

    async def Reroll(self, request: bytes, grpc_context):
        return await self.grpc.reroll(request, grpc_context)

    async def SubmitBatch(self, request: bytes, grpc_context):
        return await self.grpc.submit_batch(request, grpc_context)

    async def GetBatch(self, request: bytes, grpc_context):
        return await self.grpc.get_batch(request, grpc_context)

    async def ListBatches(self, request: bytes, grpc_context):
        return await self.grpc.list_batches(request, grpc_context)

    async def CancelBatch(self, request: bytes, grpc_context):
        return await self.grpc.cancel_batch(request, grpc_context)

    async def GetBatchResults(self, request: bytes, grpc_context):
        return await self.grpc.get_batch_results(request, grpc_context)

    async def Check(self, request: bytes, grpc_context):  # grpc.health.v1
        return await self.grpc.check(request, grpc_context)

    async def _poll_readiness(self) -> None:
        while True:
            await asyncio.sleep(READY_POLL_S)
            try:
                await self._refresh_readiness()
            except Exception:  # keep polling whatever one round hit
                log.exception("readiness poll failed")

    async def _refresh_readiness(self) -> None:
        await asyncio.gather(self._refresh_models(), self._refresh_safety())

    async def _refresh_safety(self) -> None:
        if self.safety_status is None:
            return
        try:
            self.safety = await asyncio.wait_for(self.safety_status.remote(), STATUS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - unreachable is unready
            self.safety = {"ready": False, "reason": f"status unavailable: {type(e).__name__}"}
        if self.safety.get("ready"):  # the model it loaded, for the cases it flags
            self.service.classifier.name = self.safety["classifier"]

    async def _refresh_models(self) -> None:
        names = list(self.status_handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.status_handles[n].remote(), STATUS_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        for name, res in zip(names, results, strict=True):
            if isinstance(res, BaseException):
                res = {"ready": False, "reason": f"status unavailable: {type(res).__name__}"}
            self.statuses[name] = res
            self.routing.set_ready(name, res["ready"], res.get("reason"))

    def refusing(self) -> bool:
        """Whether new requests get 503 draining (a stopping direct-ingress replica)."""
        return self._refuses and self.drain()

    async def _watch_drain(self) -> None:
        while not self.drain():
            await asyncio.sleep(DRAIN_POLL_S)
        log.warning("replica stopping: %s, %.0f s for those in flight",
                    "refusing new requests (503 draining)" if self._refuses
                    else "Serve routes new requests elsewhere", self.drain.grace_s)
        self._stop_batches()

    def _stop_batches(self) -> asyncio.Task | None:
        """The batch worker claims nothing more; its items in flight get the grace left."""
        if self.batch_worker is not None and self._worker_stop is None:
            self._worker_stop = asyncio.create_task(
                self.batch_worker.stop(grace_s=self.drain.left_s()), name="imagegen-batch-stop")
        return self._worker_stop

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while every enabled tier has a ready revision and the image classifier
        can run (unless it fails open), and the replica is not stopping (`draining`);
        reports every revision, the classifier and the routing source's last error."""
        draining = self.drain()
        # Stopping: the last poll's state, at once (a probe is a request in flight,
        # which Serve's drain waits for).
        if not draining:
            await self._refresh_readiness()
        table = self.routing.table
        models = {}
        for name, res in self.statuses.items():
            models[name] = {**res, "tiers": table.tiers_of(name),
                            "backs": [t for t in table.backed_by(name)
                                      if t not in table.tiers_of(name)]}
        tiers = {t: self.routing.tier_ready(t) for t, r in table.tiers.items() if not r.disabled}
        safety = self._safety_readiness()
        ready = not draining and all(tiers.values()) and (
            safety["ready"] or self.service.fail_open)
        return ready, {"draining": draining, "models": models, "tiers": tiers,
                       "image_safety": safety, "routing": {
            "version": table.version, "source": self.routing.source, "error": self.routing.error,
            "source_error": self.routing.source_error}}

    def _safety_readiness(self) -> dict[str, Any]:
        c = self.service.classifier
        if c is None:
            return {"classifier": "none", "ready": True, "reason": None}
        if isinstance(c, _Failing):
            return {"classifier": c.name, "ready": False, "reason": c.why}
        if self.safety is None:  # in this process, loaded
            return {"classifier": c.name, "ready": True, "reason": None}
        return {"classifier": c.name, **self.safety}

    async def __del__(self) -> None:
        # Serve awaits an async __del__ once the requests in flight are done and its
        # servers have stopped (call_destructor); the controller kills the process at
        # graceful_shutdown_timeout_s, which app.py sets past the drain's grace.
        # getattr: a constructor that failed left only some attributes.
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if getattr(self, "_watch", None) is not None:
            self._watch.stop()
        if getattr(self, "batch_worker", None) is not None:
            await self._stop_batches()
