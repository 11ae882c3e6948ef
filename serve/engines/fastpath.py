"""The GPU fast path of the diffusers engine: channels_last, fused QKV projections,
torch.compile of the UNet and VAE decoder for a fixed set of shape buckets, and VAE
tiling for large images. What to turn on is data (lockfile.EngineOptions).

Buckets: each (width, height, batch) is compiled once, at warm-up, with static
shapes. A call whose shape has a bucket runs the compiled modules under the
`eager_on_recompile` stance, so even an unforeseen guard failure costs an eager
pass, never a minute-long compile in front of a request; any other call runs the
original (eager) modules and is counted. A batch larger than a bucket runs as
several compiled bucket batches (8 images with batches [1, 4]: 4 + 4).

torch is imported inside functions, like the rest of serve/engines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..lockfile import EngineOptions

log = logging.getLogger(__name__)

# Modes that capture CUDA graphs: a graph is recorded on the second run of a shape,
# so warm-up runs every bucket twice.
_CUDAGRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part of one shape group run as one pipeline call."""

    start: int  # index into the group's jobs
    size: int
    compiled: bool


class FastPath:
    """Applies the options to a loaded pipeline and decides, per call, whether the
    compiled modules or the eager ones run. One per engine; not thread-safe (the
    engine runs one pipeline call at a time)."""

    # How a sealed in-bucket call meets a guard failure: run that frame eagerly (a
    # request never waits for a compile). Tests set "fail_on_recompile" to prove
    # the buckets are tight.
    sealed_stance = "eager_on_recompile"

    def __init__(self, pipe: Any, options: EngineOptions, device: str) -> None:
        self.pipe = pipe
        self.options = options
        self.device = device
        self.compiled = options.compile != "off"
        # (width, height) -> batch sizes compiled for it, largest first
        self.batches: dict[tuple[int, int], list[int]] = {}
        for w, h, b in options.buckets:
            self.batches.setdefault((w, h), []).append(b)
        for sizes in self.batches.values():
            sizes.sort(reverse=True)
        self.cfg: bool | None = None  # classifier-free guidance of the warmed buckets
        self.sealed = False  # warm-up done: in-bucket calls must not compile
        self.compile_s = 0.0
        self.eager_images = 0  # images run eagerly for want of a bucket (cumulative)
        self.eager_calls = 0
        self._unet = self._unet_compiled = None
        self._decoder = self._decoder_compiled = None
        self._apply()

    # --- load time -------------------------------------------------------------------

    def _apply(self) -> None:
        import diffusers
        import torch

        pipe, opts = self.pipe, self.options
        if opts.fused_qkv:
            # Before compile: the fused projections are what gets traced. diffusers
            # fuses only an AutoencoderKL's attention.
            pipe.fuse_qkv_projections(unet=True,
                                      vae=isinstance(pipe.vae, diffusers.AutoencoderKL))
        if opts.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self._unet, self._decoder = pipe.unet, pipe.vae.decoder
        if not self.compiled:
            return
        n = max(len(opts.buckets), 1)
        # Static shapes: one graph per bucket (and per frame after a graph break).
        # Dynamo gives up on a frame after recompile_limit graphs and runs it
        # eagerly: leave room for every bucket.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * n)
        for name, value in opts.inductor.items():
            if not hasattr(torch._inductor.config, name):
                raise ValueError(f"inductor setting {name!r} is not in torch._inductor.config "
                                 f"(torch {torch.__version__})")
            setattr(torch._inductor.config, name, value)
        kwargs: dict[str, Any] = {"backend": opts.compile_backend, "dynamic": False}
        if opts.compile_backend == "inductor":
            kwargs["mode"] = opts.compile
        self._unet_compiled = torch.compile(self._unet, **kwargs)
        if opts.compile_vae:
            self._decoder_compiled = torch.compile(self._decoder, **kwargs)

    # --- per call --------------------------------------------------------------------

    def plan(self, width: int, height: int, images: int, guidance: float) -> list[Chunk]:
        """How `images` images of one shape run: compiled bucket batches, and an eager
        remainder where no bucket fits."""
        if not self.compiled:
            return [Chunk(0, images, False)]
        if not self.batches:  # compile without buckets: every shape compiles lazily
            return [Chunk(0, images, True)]
        sizes = self.batches.get((width, height))
        cfg = guidance > 1
        if not sizes or (self.cfg is not None and cfg != self.cfg) or self._tiled(width, height):
            return [Chunk(0, images, False)]
        chunks, start = [], 0
        for b in sizes:
            while images - start >= b:
                chunks.append(Chunk(start, b, True))
                start += b
        if start < images:
            chunks.append(Chunk(start, images - start, False))
        return chunks

    def count_eager(self, chunk: Chunk) -> None:
        if self.compiled and not chunk.compiled:
            self.eager_images += chunk.size
            self.eager_calls += 1

    @contextlib.contextmanager
    def modules(self, chunk: Chunk, width: int, height: int) -> Iterator[None]:
        """Run the pipeline call inside this with the chunk's modules in place."""
        import torch

        compiled = chunk.compiled and self.compiled
        # object.__setattr__: DiffusionPipeline.__setattr__ would rewrite the
        # pipeline's config on every swap.
        object.__setattr__(self.pipe, "unet", self._unet_compiled if compiled else self._unet)
        vae = self.pipe.vae
        vae.decoder = (self._decoder_compiled if compiled and self._decoder_compiled is not None
                       else self._decoder)
        tiled = self._tiled(width, height)
        if tiled:
            vae.enable_tiling()
        # Without buckets every shape compiles on first use (the legacy `compile: true`):
        # no stance then, or each new shape would run eagerly forever, uncounted.
        stance = (torch.compiler.set_stance(self.sealed_stance)
                  if compiled and self.sealed and self.batches else contextlib.nullcontext())
        try:
            with stance:
                yield
        finally:
            if tiled:
                vae.disable_tiling()
            object.__setattr__(self.pipe, "unet", self._unet)
            vae.decoder = self._decoder

    def _tiled(self, width: int, height: int) -> bool:
        threshold = self.options.vae_tiling_min_pixels
        return threshold is not None and width * height >= threshold

    # --- warm-up ---------------------------------------------------------------------

    def warm_shapes(self, guidance: float) -> list[tuple[int, int, int]]:
        """(width, height, batch) to run at warm-up, and how often each."""
        self.cfg = guidance > 1
        if not self.compiled:
            return []
        passes = 2 if (self.options.compile_backend == "inductor"
                       and self.options.compile in _CUDAGRAPH_MODES) else 1
        return [shape for shape in self.options.buckets for _ in range(passes)]

    def seal(self, started: float) -> None:
        """Warm-up is over: record its cost and start counting from zero."""
        self.compile_s = time.perf_counter() - started
        self.sealed = True
        self.eager_images = self.eager_calls = 0
        if self.compiled:
            log.info("compiled %d bucket(s) in %.1f s", len(self.options.buckets),
                     self.compile_s)

    def stats(self) -> dict[str, Any]:
        o = self.options
        return {"compile": o.compile, "buckets": [f"{w}x{h}x{b}" for w, h, b in o.buckets],
                "compile_s": round(self.compile_s, 3), "eager_images": self.eager_images,
                "eager_calls": self.eager_calls, "channels_last": o.channels_last,
                "fused_qkv": o.fused_qkv}
