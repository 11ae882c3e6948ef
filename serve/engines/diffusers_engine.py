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
from typing import Any

import numpy as np

from .base import Engine, Job, group_by_shape

log = logging.getLogger(__name__)


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
    replica's num_cpus, wrong for fractional CPUs), `xformers` (default true: use
    xformers attention on CUDA when it imports, else PyTorch SDPA), `compile`
    (default false: the UNet under torch.compile; each new shape compiles once)."""

    kind = "diffusers"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.pipe: Any = None
        self.device = "cpu"
        self.attention = "sdpa"
        self.compiled = False
        self._threaded = threading.local()

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
        self._set_threads()
        cls = getattr(diffusers, spec.pipeline, None)
        if not (inspect.isclass(cls) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise ValueError(f"{spec.pipeline!r} is not a diffusers pipeline class")
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{spec.dtype!r} is not a torch dtype")

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

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.attention = self._attention(pipe)
        self.compiled = bool(self.spec.options.get("compile", False))
        if self.compiled:
            pipe.unet = torch.compile(pipe.unet)
        self.pipe = pipe

    def _attention(self, pipe) -> str:
        # diffusers already uses PyTorch SDPA (AttnProcessor2_0) by default.
        if not (self.spec.options.get("xformers", True) and self.device == "cuda"):
            return "sdpa"
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "sdpa"
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except (RuntimeError, ValueError, NotImplementedError) as e:
            # A wheel built for another torch/CUDA fails diffusers' self-test: keep SDPA.
            log.warning("xformers unusable, using PyTorch SDPA: %s: %s", type(e).__name__, e)
            return "sdpa"
        return "xformers"

    def generate(self, jobs: list[Job]) -> list[np.ndarray]:
        import torch

        if self.pipe is None:
            raise RuntimeError("generate() before load()")
        self._set_threads()
        images: list[np.ndarray | None] = [None] * len(jobs)
        with torch.inference_mode():
            for (width, height, steps, guidance), indices in group_by_shape(jobs).items():
                group = [jobs[i] for i in indices]
                out = self.pipe(
                    prompt=[j.prompt for j in group],
                    negative_prompt=[j.negative_prompt for j in group],
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    # One generator per image: its latents depend on its own seed
                    # only, whatever else shares the batch.
                    generator=[torch.Generator(self.device).manual_seed(j.seed) for j in group],
                    output_type="np",
                )
                # Exactly diffusers' numpy_to_pil conversion.
                batch = (out.images * 255).round().astype("uint8")
                for i, image in zip(indices, batch, strict=True):
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
