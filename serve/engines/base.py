"""The engine seam: what a model deployment needs from an image generator.

Deployments take the engine *class* as a constructor argument, so tests pass the
deterministic fake and production passes the diffusers engine; nothing above
this seam imports torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True, slots=True)
class Job:
    """One image to generate. A request for n images becomes n jobs."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int

    @property
    def shape(self) -> tuple[int, int, int, float]:
        """Jobs with equal shapes can share one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What an engine is told about the revision it serves (from models.lock)."""

    name: str
    revision: str
    path: Path | None
    pipeline: str
    dtype: str
    options: dict[str, Any]


def group_by_shape(jobs: list[Job]) -> dict[tuple, list[int]]:
    """Indices of `jobs` grouped by shape, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.shape, []).append(i)
    return groups


class Engine(abc.ABC):
    """Generates images for batches of jobs. One instance per replica.

    `generate` is blocking and CPU/GPU bound; the deployment runs it off the event
    loop. It returns one HxWx3 uint8 array per job, in job order.
    """

    kind: ClassVar[str]

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights; raise with a clear message if they cannot be loaded."""

    def warmup(self, job: Job) -> None:
        """Run `job` (the revision's defaults) so the first request pays no lazy init."""
        self.generate([job])

    @abc.abstractmethod
    def generate(self, jobs: list[Job]) -> list[np.ndarray]:
        """Generate one image per job (same order)."""

    def memory(self) -> dict[str, int]:
        """Accelerator memory in bytes (empty on the CPU)."""
        return {}

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (the profiler measures one per batch size)."""

    def peak_memory(self) -> int | None:
        """Peak accelerator bytes since the last reset; None where not measurable."""
        return None


@dataclass(frozen=True, slots=True)
class Generated:
    """What a model deployment answers for one call: its images and where time went."""

    images: list[np.ndarray]
    queue_s: float  # from arrival at the replica to the start of its batch
    generate_s: float  # the pipeline call(s) of that batch
    batch_images: int  # images in that batch, this call's included
