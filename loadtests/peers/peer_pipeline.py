"""What every peer serves: the project's own engine (serve/engines/diffusers_engine.py)
and PNG encoder (serve/imaging/encode.py), imported from this checkout (the driver puts
the repo root on PYTHONPATH; the peers venv carries what `import serve` needs), so the
peers run the very pipeline code imagegen's replicas run.

serve/cli/bench_peers.py passes the model in PEER_SPEC, JSON: name, revision, path,
pipeline, dtype, options (the engine options a replica gets), width, height, steps,
guidance.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from serve.engines.base import EngineSpec, Job
from serve.engines.diffusers_engine import DiffusersEngine
from serve.imaging.encode import encode


class Pipeline:
    """The tiny pipeline, loaded and warmed; `generate` takes a batch of request
    bodies ({"prompt", "seed"}) and answers one imagegen-shaped body per request."""

    def __init__(self, spec: dict | None = None) -> None:
        spec = spec or json.loads(os.environ["PEER_SPEC"])
        self.shape = (spec["width"], spec["height"], spec["steps"], spec["guidance"])
        self.engine = DiffusersEngine(EngineSpec(
            spec["name"], spec["revision"], Path(spec["path"]), spec["pipeline"],
            spec["dtype"], spec["options"]))
        self.engine.load()
        for _ in range(3):  # as bench_in_process warms up
            self.engine.warmup(self._job({"prompt": "warm-up", "seed": 0}))

    def _job(self, body: dict) -> Job:
        width, height, steps, guidance = self.shape
        return Job(str(body["prompt"]), "", width, height, steps, guidance, int(body["seed"]))

    def generate(self, bodies: list[dict]) -> list[dict]:
        jobs = [self._job(b) for b in bodies]
        images = self.engine.generate(jobs)
        # PNG (zlib level 1, the provenance XMP) and base64 exactly as imagegen answers.
        return [{"images": [{"seed": j.seed, "mime_type": "image/png",
                             "b64_json": base64.b64encode(encode(image, "png")).decode()}],
                 "batch_images": len(jobs)}
                for j, image in zip(jobs, images, strict=True)]
