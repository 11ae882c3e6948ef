"""A deterministic engine with no torch: for tests and for exercising the stack.

Each image is a pure function of (revision, job). The first pixel row spells
`revision[:12]:seed` in the red channel, so tests can assert exactly which
revision and seed made an image (see `decode`).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from .base import Engine, Job


class FakeEngine(Engine):
    """Options: `seconds_per_image` (simulated work, default 0), `seconds_per_batch`
    (fixed cost per call, default 0), `fail_load` (a message: load raises it).
    A file named FAULT in the revision's directory makes every call fail while it
    exists: a fault a test can inject into one revision, every replica at once."""

    kind = "fake"

    def load(self) -> None:
        reason = self.spec.options.get("fail_load")
        if reason:
            raise RuntimeError(str(reason))

    def generate(self, jobs: list[Job]) -> list[np.ndarray]:
        if self.spec.path is not None and (self.spec.path / "FAULT").exists():
            raise RuntimeError(f"injected fault: {self.spec.path / 'FAULT'} exists")
        per_image = float(self.spec.options.get("seconds_per_image", 0.0))
        per_batch = float(self.spec.options.get("seconds_per_batch", 0.0))
        if per_image or per_batch:
            time.sleep(per_batch + per_image * len(jobs))
        return [self._image(job) for job in jobs]

    def _image(self, job: Job) -> np.ndarray:
        key = "\0".join(
            map(str, (self.spec.revision, job.prompt, job.negative_prompt, job.steps,
                      job.guidance, job.seed, job.width, job.height))
        )
        digest = hashlib.sha256(key.encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        img = rng.integers(0, 256, size=(job.height, job.width, 3), dtype=np.uint8)
        tag = f"{self.spec.revision[:12]}:{job.seed}".encode()[: job.width]
        img[0, :, 0] = 0
        img[0, : len(tag), 0] = np.frombuffer(tag, dtype=np.uint8)
        return img


def decode(image: np.ndarray) -> tuple[str, int]:
    """(revision prefix, seed) written by FakeEngine into an image."""
    row = bytes(image[0, :, 0].tolist()).split(b"\0", 1)[0].decode()
    revision, seed = row.rsplit(":", 1)
    return revision, int(seed)
