"""The real engine: a diffusers text-to-image pipeline loaded from a local directory.

The only module in `serve` that imports torch and diffusers, and only inside
methods, so importing it is cheap. Weights are read offline (`local_files_only`):
fetching and verifying them is a separate step that ran before the replica.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from ..lockfile import EngineOptions
from .base import Engine, Job, group_by_shape
from .fastpath import FastPath

log = logging.getLogger(__name__)

HALF = frozenset({"float16", "bfloat16"})


def accelerator() -> tuple[str, str, str]:
    """(profile key, description, software) of this machine's accelerator:
    ('nvidia-h200', 'NVIDIA H200', 'torch ..., diffusers ...') or ('cpu', 'cpu x2', ...)."""
    import diffusers
    import torch

    software = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name, software
    return "cpu", f"cpu x{len(os.sched_getaffinity(0))}", software


class DiffusersEngine(Engine):
    """Options: `threads` (torch intra-op threads; Ray sets OMP_NUM_THREADS from the
    replica's num_cpus, wrong for fractional CPUs) and the revision's fast path,
    lockfile.EngineOptions (dtype, attention, compile and its buckets, channels_last,
    fused_qkv, VAE tiling; the older `xformers` and `compile: true|false` keys still
    work). Bad options fail load() with the field and the value."""

    kind = "diffusers"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.pipe: Any = None
        self.device = "cpu"
        self.attention = "sdpa"
        self.compiled = False
        self.fast: FastPath | None = None
        self._exported_eager = 0
        self._threaded = threading.local()

    @classmethod
    def from_pipeline(cls, spec, pipe) -> DiffusersEngine:
        """An engine around a pipeline already in memory and on its device (benchmarks
        of the random-weight architecture pipelines, which are never saved)."""
        engine = cls(spec)
        engine._set_threads()
        engine._prepare(pipe, EngineOptions.from_options(spec.options))
        return engine

    def load(self) -> None:
        try:
            self._load()
        except Exception as e:
            raise RuntimeError(
                f"cannot load {self.spec.name} revision {self.spec.revision[:12]} "
                f"from {self.spec.path}: {type(e).__name__}: {e}"
            ) from e

    def _load(self) -> None:
        import diffusers
        import torch
        import transformers
        from diffusers.utils import is_accelerate_available

        spec = self.spec
        if spec.path is None:
            raise ValueError("no local model directory (build or fetch it first)")
        options = EngineOptions.from_options(spec.options)
        self._set_threads()
        cls = getattr(diffusers, spec.pipeline, None)
        if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise ValueError(f"{spec.pipeline!r} is not a diffusers pipeline class")
        dtype = getattr(torch, options.dtype or spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{options.dtype or spec.dtype!r} is not a torch dtype")
        cuda = torch.cuda.is_available()
        if options.dtype in HALF and not cuda:
            # Half precision on the CPU is slow where it runs at all: say so at load
            # (the replica stays unready with this reason) instead of serving it.
            raise ValueError(f"engine dtype {options.dtype!r} needs CUDA and this replica "
                             "has none: use 'float32' or leave dtype out")
        if options.attention == "xformers" and not cuda:
            raise ValueError("attention 'xformers' needs CUDA (xformers has no CPU kernels) "
                             "and this replica has none: use 'sdpa' or 'auto'")

        # Loading bars would land in the replica log on every start.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        params = inspect.signature(cls.__init__).parameters
        if "safety_checker" in params:
            kwargs["safety_checker"] = None
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        if not is_accelerate_available():
            # Say so explicitly: otherwise diffusers warns on every load.
            kwargs["low_cpu_mem_usage"] = False
        pipe = cls.from_pretrained(spec.path, **kwargs)
        pipe.to("cuda" if cuda else "cpu")
        self._prepare(pipe, options)

    def _prepare(self, pipe, options: EngineOptions) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe.set_progress_bar_config(disable=True)
        self.attention = self._attention(pipe, options.attention)
        self.fast = FastPath(pipe, options, self.device)
        self.compiled = self.fast.compiled
        self.pipe = pipe

    def _attention(self, pipe, wanted: str) -> str:
        # diffusers already uses PyTorch SDPA (AttnProcessor2_0) by default.
        if wanted == "sdpa" or self.device != "cuda":
            return "sdpa"
        try:
            import xformers  # noqa: F401
        except ImportError:
            if wanted == "xformers":
                raise ValueError("attention 'xformers' but xformers does not import: "
                                 "pip install 'imagegen[gpu]', or use 'sdpa'") from None
            return "sdpa"
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if wanted == "xformers":
                raise ValueError(f"attention 'xformers' fails diffusers' self-test "
                                 f"({type(e).__name__}: {e}): use 'sdpa'") from None
            # A wheel built for another torch/CUDA fails diffusers' self-test: keep SDPA.
            log.warning("xformers unusable, using PyTorch SDPA: %s: %s", type(e).__name__, e)
            return "sdpa"
        return "xformers"

    def warmup(self, job: Job) -> None:
        """Compile every bucket (a short pass each: shapes, not steps, are what
        compile), then run `job`; the replica reports ready only after this."""
        if self.fast is None:
            raise RuntimeError("warmup() before load()")
        started = time.perf_counter()
        short = replace(job, steps=min(job.steps, 2))
        for width, height, batch in self.fast.warm_shapes(job.guidance):
            self.generate([replace(short, width=width, height=height, seed=i)
                           for i in range(batch)])
        self.generate([job])
        self.fast.seal(started)
        self._exported_eager = 0

    def take_eager_images(self) -> int:
        """Images run eagerly for want of a compiled bucket since the last call (for
        the deployment's imagegen_eager_images_total)."""
        total = self.fast.eager_images if self.fast else 0
        delta, self._exported_eager = total - self._exported_eager, total
        return max(delta, 0)

    def fastpath_stats(self) -> dict[str, Any]:
        """Compile mode, buckets, warm-up compile seconds and eager counts."""
        return self.fast.stats() if self.fast else {}

    def generate(self, jobs: list[Job]) -> list[np.ndarray]:
        import torch

        if self.pipe is None:
            raise RuntimeError("generate() before load()")
        self._set_threads()
        images: list[np.ndarray | None] = [None] * len(jobs)
        with torch.inference_mode():
            for (width, height, steps, guidance), indices in group_by_shape(jobs).items():
                for chunk in self.fast.plan(width, height, len(indices), guidance):
                    part = indices[chunk.start:chunk.start + chunk.size]
                    group = [jobs[i] for i in part]
                    with self.fast.modules(chunk, width, height):
                        out = self.pipe(
                            prompt=[j.prompt for j in group],
                            negative_prompt=[j.negative_prompt for j in group],
                            width=width,
                            height=height,
                            num_inference_steps=steps,
                            guidance_scale=guidance,
                            # One generator per image: its latents depend on its own
                            # seed only, whatever else shares the batch.
                            generator=[torch.Generator(self.device).manual_seed(j.seed)
                                       for j in group],
                            output_type="np",
                        )
                    self.fast.count_eager(chunk)
                    # Exactly diffusers' numpy_to_pil conversion.
                    batch = (out.images * 255).round().astype("uint8")
                    for i, image in zip(part, batch, strict=True):
                        images[i] = image
        return images  # type: ignore[return-value]

    def reset_peak_memory(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        if self.device != "cuda":
            return None
        import torch

        # reserved, not allocated: the caching allocator's pool is what the GPU
        # must hold (the CUDA context adds a few hundred MB on top).
        return torch.cuda.max_memory_reserved()

    def _set_threads(self) -> None:
        # OpenMP's thread count is per calling thread: a worker thread inherits
        # OMP_NUM_THREADS (Ray sets it to the replica's num_cpus, 1 for a
        # fractional CPU), not what load() set on another thread. Measured: the
        # tiny pipeline ran 2x slower in the replica's executor thread without this.
        threads = self.spec.options.get("threads")
        if threads and not getattr(self._threaded, "set", False):
            import torch

            torch.set_num_threads(int(threads))
            self._threaded.set = True

    def memory(self) -> dict[str, int]:
        if self.device != "cuda":
            return {}
        import torch

        _, total = torch.cuda.mem_get_info()
        return {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "total": total,
        }
