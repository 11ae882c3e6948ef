"""BentoML peer: POST /generate {"bodies": [{"prompt", "seed"}]} -> [imagegen-shaped
JSON body]. A batchable API takes one list argument, so that is its wire shape.

One worker, one thread for the sync API (BentoML's default), adaptive batching
(CorkDispatcher) up to 8 images; no access log, as imagegen's bench runs without one.
Run as `bentoml serve bentoml_service:ImageGen` from the peers venv by
serve/cli/bench_peers.py.
"""

from __future__ import annotations

import bentoml
from peer_pipeline import Pipeline

MAX_BATCH = 8


@bentoml.service(workers=1, threads=1, logging={"access": {"enabled": False}})
class ImageGen:
    def __init__(self) -> None:
        self.pipeline = Pipeline()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH)
    def generate(self, bodies: list[dict]) -> list[dict]:
        return self.pipeline.generate(bodies)
