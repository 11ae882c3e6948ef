"""One Ray Serve deployment class, bound once per models.lock revision.

The replica verifies the revision's files against the lock, loads the engine and
warms it up. A revision that fails either stays up *unready* with the reason
(reported by `status`, shown in /readyz) instead of crash-looping: restarting
cannot fix a bad file, and it would hold back every other revision's deploy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind
from ray import serve as ray_serve

from ..batching import PipelineBatcher
from ..engines.base import Engine, EngineSpec, Generated, Job
from ..errors import GenerationFailed, ImagegenError, ModelUnavailable
from ..lockfile import ModelEntry, verify
from ..telemetry import Metrics, context_from, setup, tracing

log = logging.getLogger("imagegen.model")

# Pipeline calls failing in a row before check_health fails and Serve replaces the
# replica (a CUDA error leaves the context unusable: one is enough).
UNHEALTHY_AFTER_FAILURES = 3


@dataclass(frozen=True, slots=True)
class ModelCall:
    """One request's jobs on their way to a replica, with the W3C traceparent of the
    ingress span that sent them (one handle call carries several requests, each
    from its own trace)."""

    jobs: list[Job]
    traceparent: str | None = None

def _load_and_warm(engine: Engine, entry: ModelEntry) -> None:
    engine.load()
    d = entry.defaults
    engine.warmup(Job("warm-up", "", d.width, d.height, d.steps, d.guidance, 0))


@ray_serve.deployment(
    # Replaced per revision by autoscaling policy; see app.py.
    ray_actor_options={"num_cpus": 0.25},
    health_check_period_s=10,
)
class ModelDeployment:
    def __init__(
        self,
        entry: ModelEntry,
        engine_cls: type[Engine],
        model_dir: str,
        engine_options: dict[str, Any],
    ) -> None:
        setup("model")
        self.metrics = Metrics()
        self.labels = {"model": entry.name, "revision": entry.revision}
        self.entry = entry
        self.error: str | None = None
        self.engine: Engine | None = None
        self.load_s = 0.0
        # One thread: one pipeline call at a time; the event loop stays free to
        # queue the next batch while this one runs.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"pipeline-{entry.name}")
        # the lock's engine table (issue 17's fast path), the settings' options winning
        options = entry.engine_options(dict(engine_options))
        options.setdefault("threads", len(os.sched_getaffinity(0)))
        root = entry.local_dir(Path(model_dir))
        spec = EngineSpec(entry.name, entry.revision, root, entry.pipeline, entry.dtype, options)
        t0 = time.perf_counter()
        try:
            verify(entry, root)
            engine = engine_cls(spec)
            # Load and warm up on the pipeline thread itself: once two threads have
            # driven OpenMP regions, two thread teams contend for the cores (the
            # tiny pipeline ran 2x slower, small ops up to 7x).
            self._pool.submit(_load_and_warm, engine, entry).result()
            self.engine = engine
        except Exception as e:  # noqa: BLE001 - any load failure makes the revision unready
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, ImagegenError) else str(e)
            log.error("model %s unready: %s", entry.deployment_name, self.error)
        self.load_s = time.perf_counter() - t0
        self.batcher = PipelineBatcher(self._run, max_images=8)
        self.running_images = 0
        self.failures_in_row = 0
        self.fatal: str | None = None
        self.metrics.set("imagegen_model_load_seconds", self.load_s, **self.labels)
        self.metrics.set("imagegen_model_ready", float(self.engine is not None), **self.labels)
        self._record_memory()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config from the autoscaling policy: batch size and wait, changeable live."""
        self.batcher.configure(
            max_images=int(config["max_batch_images"]),
            wait_s=float(config["batch_wait_timeout_s"]),
        )

    async def generate(self, requests: list[ModelCall]) -> list[Generated | BaseException]:
        """Generate several requests' jobs; one result (or error) per request.

        The ingress merges concurrent requests into one call: Serve's per-call
        work runs in this process and takes the GIL from the pipeline thread
        (on an H100, 4x fewer calls cut a batch of 8 from 60 to 44 ms).
        """
        if self.engine is None:
            err = ModelUnavailable(f"model {self.entry.name} is not ready: {self.error}")
            return [err] * len(requests)
        return await asyncio.gather(*map(self._one, requests), return_exceptions=True)

    async def _one(self, call: ModelCall) -> Generated:
        """One request in the replica: a SERVER span under the ingress's CLIENT span,
        and a child span for the pipeline call (batch) that ran it."""
        e = self.entry
        # Through its module: Serve pickles this class by value, and the tracer itself
        # (once a provider is set in this process) holds locks.
        with tracing.tracer.start_as_current_span(
            "imagegen.model.generate", context=context_from(call.traceparent),
            kind=SpanKind.SERVER,
            attributes={"gen_ai.request.model": e.name, "imagegen.revision": e.revision,
                        "imagegen.deployment": e.deployment_name,
                        "imagegen.images": len(call.jobs)},
        ) as span:
            out = await self.batcher.submit(call.jobs)
            end = time.time_ns()
            span.set_attributes({"imagegen.batch_images": out.batch_images,
                                 "imagegen.queue_ms": out.queue_s * 1e3})
            tracing.tracer.start_span(
                "imagegen.pipeline", start_time=end - int(out.generate_s * 1e9),
                attributes={"imagegen.batch_images": out.batch_images},
            ).end(end_time=end)
        self.metrics.observe("imagegen_queue_wait_seconds", out.queue_s, **self.labels)
        return out

    async def _run(self, jobs: list[Job]):
        loop = asyncio.get_running_loop()
        self.metrics.set("imagegen_queued_images", self.batcher.queued_images,
                         model=self.entry.name, where="replica")
        t0 = time.perf_counter()
        self.running_images = len(jobs)
        try:
            work = loop.run_in_executor(self._pool, self.engine.generate, jobs)
            try:
                out = await asyncio.shield(work)
            except asyncio.CancelledError:
                # Every caller left, but the pass runs on in its thread: hold the batch
                # slot (and its accounting) until it ends, so the next batch is composed
                # when the pipeline is free and its wait counts as queueing.
                await asyncio.wait([work])
                raise
        except Exception as e:
            log.exception("generation failed on %s", self.entry.deployment_name)
            self.failures_in_row += 1
            if "CUDA error" in str(e) or self.failures_in_row >= UNHEALTHY_AFTER_FAILURES:
                self.fatal = f"{self.failures_in_row} pipeline failure(s) in a row, last: {e}"
            raise GenerationFailed(f"generation failed on {self.entry.name}: {e}") from None
        else:
            self.failures_in_row = 0
            return out
        finally:
            self.running_images = 0
            seconds = time.perf_counter() - t0
            self.metrics.observe("imagegen_pipeline_seconds", seconds, **self.labels)
            self.metrics.observe("imagegen_batch_images", len(jobs), **self.labels)
            self.metrics.inc("imagegen_pipeline_images_total", len(jobs), **self.labels)
            if eager := getattr(self.engine, "take_eager_images", lambda: 0)():
                self.metrics.inc("imagegen_eager_images_total", eager, **self.labels)
            # By batch size, as counters (exact sums): `capacity profile --in-place`
            # reads seconds per megapixel-step off a running stack from them.
            images = str(len(jobs))
            self.metrics.inc("imagegen_pipeline_busy_seconds_total", seconds, images=images,
                             **self.labels)
            self.metrics.inc("imagegen_pipeline_work_total",
                             sum(j.width * j.height * j.steps for j in jobs) / 1e6,
                             images=images, **self.labels)
            self._record_memory()

    def _record_memory(self) -> None:
        for kind, value in (self.engine.memory() if self.engine else {}).items():
            self.metrics.set("imagegen_gpu_memory_bytes", value, kind=kind, **self.labels)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue pressure in images for the budget autoscaling policy (Serve calls
        this on every replica; the ingress sends several requests per call, so
        Serve's own ongoing-request count understates the load)."""
        return {"queued_images": float(self.batcher.queued_images),
                "running_images": float(self.running_images)}

    def status(self) -> dict[str, Any]:
        """Readiness with the reason, for /readyz and `imagegen models`."""
        engine = self.engine
        return {
            "model": self.entry.name,
            "revision": self.entry.revision,
            "ready": engine is not None,
            "reason": self.error,
            "load_s": round(self.load_s, 3),
            "device": str(getattr(engine, "device", "cpu")),
            "attention": getattr(engine, "attention", None),
            "memory": engine.memory() if engine else {},
            "batching": {"max_images": self.batcher.max_images, "wait_s": self.batcher.wait_s,
                         "queued_images": self.batcher.queued_images},
        }

    def check_health(self) -> None:
        # A revision whose files failed verification is alive and says why in
        # status(): a restart cannot fix a file. A broken engine (a CUDA error,
        # pipeline failures in a row) is not: failing makes Serve replace it.
        if self.fatal:
            raise RuntimeError(f"model {self.entry.name} unhealthy: {self.fatal}")
