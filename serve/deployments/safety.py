"""The image classifier's own Ray Serve deployment (stage 9), scaled apart from the
model replicas: on a GPU cluster the pipeline never waits for a CPU classifier, and
one model session serves every revision. A classifier that cannot load keeps the
replica up and unready with the reason (as a model revision does); every call then
fails, and the request path fails closed."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve as ray_serve

from ..safety.classifier import ClassifierUnavailable, Scores, load_classifier
from ..telemetry import Metrics, setup

log = logging.getLogger("imagegen.safety")


# Calls queue in the replica (its one thread), never in front of it: a status call
# must not wait behind classify calls, or readiness flaps under load.
@ray_serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1024,
                      health_check_period_s=10)
class SafetyDeployment:
    def __init__(self, spec: str, threads: int = 1) -> None:
        setup("safety")
        self.metrics = Metrics()
        self.error: str | None = None
        self.classifier = None
        # One thread per replica: a model call at a time, the loop free to queue more.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="image-classifier")
        try:
            self.classifier = self._pool.submit(load_classifier, spec, threads).result()
            self.classifier.classify([np.zeros((64, 64, 3), np.uint8)])  # warm-up
        except Exception as e:  # noqa: BLE001 - any failure makes it unready, with the reason
            self.error = f"{type(e).__name__}: {e}"
            log.error("image classifier %s unready: %s", spec, self.error)
        self.name = self.classifier.name if self.classifier else spec

    async def classify(self, images: list[np.ndarray]) -> list[Scores]:
        if self.classifier is None:
            raise ClassifierUnavailable(f"image classifier {self.name} is not ready: "
                                        f"{self.error}")
        t0 = time.perf_counter()
        scores = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.classifier.classify, images)
        self.metrics.observe("imagegen_image_classifier_seconds", time.perf_counter() - t0,
                             classifier=self.name)
        return scores

    def status(self) -> dict[str, Any]:
        return {"classifier": self.name, "ready": self.classifier is not None,
                "reason": self.error}
