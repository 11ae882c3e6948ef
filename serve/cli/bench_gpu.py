"""`imagegen bench gpu`: the engine's fast path against plain diffusers on the same GPU,
and the capacity profiles an SRE plans with, in one time-boxed run (one device call).

In order, each result a JSON line written as soon as it is measured, so a run cut
short keeps what it finished:
  1. compare: SDXL-arch at 1024x1024, plain diffusers (fp16, SDPA, eager, called
     directly) vs the imagegen engine with the fast path, batch 1 and 4, on one
     random-weight pipeline (the fast path is applied to it after the plain runs):
     images/s, s/megapixel, peak memory, compile time, PSNR against eager per seed
  2. profiles: SDXL-arch and SD1.5-arch, fast path on (then off, if time is left),
     batch 1/2/4/8: s/megapixel, peak memory, cold start, written to a lock-shaped
     TOML that `imagegen capacity plan --profiles FILE` reads
  3. stack: a placeholder for `imagegen bench serve` on the GPU
A step that would not fit in what is left of `--budget-s` is written as skipped.

`--smoke` runs the same code on tiny stand-ins of both architectures at 64x64 and
2 steps (on a CPU with the `eager` compile backend: dynamo traces and guards, no
kernels), end to end in about a minute. Timings are printed and written, never
asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="tiny stand-in architectures at 64x64, 2 steps (runs on a CPU)")
    p.add_argument("--out", type=Path, default=Path("gpu-bench.jsonl"),
                   help="JSON lines, one per result (appended)")
    p.add_argument("--profiles-out", type=Path, default=Path("gpu-profiles.toml"),
                   help="lock-shaped TOML of the measured profiles (for --profiles)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget; steps that would not fit are skipped")
    p.add_argument("--steps", type=int, help="denoising steps of the comparison (20)")
    p.add_argument("--profile-steps", type=int, help="denoising steps of the profiles (10)")
    p.add_argument("--compile", default="default",
                   help="torch.compile mode of the fast path (default; reduce-overhead, "
                        "max-autotune, max-autotune-no-cudagraphs compile longer)")
    p.add_argument("--compile-backend", choices=["auto", "inductor", "aot_eager", "eager"],
                   default="auto", help="auto: inductor on CUDA, eager on a CPU")
    p.add_argument("--bucket-batches",
                   help="batch sizes compiled per size, others split into these (default: "
                        "the comparison's, 1,4)")
    p.add_argument("--no-eager-profiles", action="store_true",
                   help="skip the fast-path-off profiles")


@dataclass
class Plan:
    """Shapes and sizes of one run: the full one, or --smoke's."""

    compare_arch: str
    profile_archs: tuple[str, ...]
    compare_batches: tuple[int, ...]
    profile_batches: tuple[int, ...]
    steps: int
    profile_steps: int
    repeats: int
    warm: int  # untimed calls before each timed batch size (the fast path: after warm-up)
    sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, args) -> Plan:
        if args.smoke:
            plan = cls("sdxl-tiny", ("sdxl-tiny", "sd15-tiny"), (1, 2), (1, 2), 2, 2, 1, 0)
        else:
            plan = cls("sdxl-arch", ("sdxl-arch", "sd15-arch"), (1, 4), (1, 2, 4, 8), 20, 10, 2, 1)
        from ..archmodels import ARCHS

        plan.sizes = {name: ARCHS[name][1] for name in {plan.compare_arch, *plan.profile_archs}}
        plan.steps = args.steps or plan.steps
        plan.profile_steps = args.profile_steps or plan.profile_steps
        return plan


class Writer:
    """Appends one JSON line per result and says it on stdout, flushing both."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a")
        self.t0 = time.perf_counter()

    def __call__(self, step: str, **row: Any) -> dict[str, Any]:
        row = {"step": step, "t_s": round(time.perf_counter() - self.t0, 1), **row}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        print(json.dumps(row), flush=True)
        return row


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def run(args: argparse.Namespace, settings=None) -> int:
    """Every step, in order; an error in one is written and the next still runs."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ..engines.diffusers_engine import accelerator

    plan = Plan.of(args)
    write, budget = Writer(args.out), Budget(args.budget_s)
    cuda = torch.cuda.is_available()
    key, device_name, software = accelerator()
    backend = args.compile_backend if args.compile_backend != "auto" else (
        "inductor" if cuda else "eager")
    ctx = Context(args, plan, write, budget, cuda, key, device_name, software, backend)
    write("env", device=device_name, key=key, software=software, smoke=args.smoke,
          budget_s=args.budget_s, compile=args.compile, compile_backend=backend,
          steps=plan.steps, profile_steps=plan.profile_steps,
          capability=list(torch.cuda.get_device_capability()) if cuda else None)
    steps = [("compare", ctx.compare), ("profile", ctx.fast_profiles),
             ("profile", ctx.eager_profiles), ("stack", ctx.stack)]
    failed = False
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - one broken step must not lose the others
            failed = True
            write(name, error=f"{type(e).__name__}: {e}",
                  trace=traceback.format_exc(limit=6)[-2000:])
        ctx.free()
    write("done", elapsed_s=round(time.perf_counter() - write.t0, 1),
          profiles=str(args.profiles_out), budget_left_s=round(budget.left(), 1))
    return 1 if failed else 0


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    write: Writer
    budget: Budget
    cuda: bool
    key: str
    device_name: str
    software: str
    backend: str
    engine: Any = None  # the compare step's fast engine, reused by the SDXL profile
    cold: dict[str, float] = field(default_factory=dict)
    compile_s: float = 0.0

    # --- helpers ---------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return "float16" if self.cuda else "float32"

    def options(self, fast: bool, size: int) -> dict[str, Any]:
        if not fast:
            return {"attention": "sdpa"}
        batches = (sorted({int(b) for b in self.args.bucket_batches.split(",")})
                   if self.args.bucket_batches else list(self.plan.compare_batches))
        opts: dict[str, Any] = {
            "attention": "sdpa", "compile": self.args.compile, "compile_backend": self.backend,
            "bucket_sizes": [f"{size}x{size}"], "bucket_batches": batches,
            "channels_last": True, "fused_qkv": True}
        if self.backend == "inductor":
            # diffusers' torch.compile guide: 1x1 convolutions as matmuls (UNets)
            opts["inductor"] = {"conv_1x1_as_mm": True}
        else:
            opts["compile"] = "default"
        return opts

    def build(self, arch: str):
        from ..archmodels import make_arch

        t0 = time.perf_counter()
        pipe = make_arch(arch, self.dtype, "cuda" if self.cuda else "cpu")
        pipe.set_progress_bar_config(disable=True)
        self.sync()
        return pipe, time.perf_counter() - t0

    def engine_for(self, arch: str, pipe, fast: bool):
        from ..archmodels import ARCHS
        from ..engines.base import EngineSpec
        from ..engines.diffusers_engine import DiffusersEngine

        spec = EngineSpec(arch, "random", None, ARCHS[arch][0], self.dtype,
                          self.options(fast, self.plan.sizes[arch]))
        return DiffusersEngine.from_pipeline(spec, pipe)

    def job(self, arch: str, steps: int):
        from ..engines.base import Job

        size = self.plan.sizes[arch]
        return Job(PROMPT, NEGATIVE, size, size, steps, 7.0, 0)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_reserved() / 1e9, 3)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def skip(self, step: str, need_s: float, **row) -> bool:
        left = self.budget.left()
        if left >= need_s:
            return False
        self.write(step, skipped=f"needs about {need_s:.0f} s, {left:.0f} s left", **row)
        return True

    # --- 1. plain diffusers vs the fast path -----------------------------------------

    def plain(self, pipe, job, batch: int):
        """Plain diffusers, called directly: what a user of the library would do."""
        import torch

        generators = [torch.Generator(pipe.device).manual_seed(i) for i in range(batch)]
        with torch.inference_mode():
            out = pipe(prompt=[job.prompt] * batch, negative_prompt=[job.negative_prompt] * batch,
                       width=job.width, height=job.height, num_inference_steps=job.steps,
                       guidance_scale=job.guidance, generator=generators, output_type="np")
        return list((out.images * 255).round().astype("uint8"))

    def timed(self, fn, repeats: int, warm: int = 1) -> tuple[float, Any]:
        for _ in range(warm):
            out = fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()  # returns host arrays: the device has synchronised
            times.append(time.perf_counter() - t0)
        return min(times), out

    def compare(self) -> None:
        plan, arch = self.plan, self.plan.compare_arch
        if self.skip("compare", 60 if plan.sizes[arch] >= 256 else 5, arch=arch):
            return
        pipe, build_s = self.build(arch)
        job = self.job(arch, plan.steps)
        mp = job.width * job.height / 1e6
        eager: dict[int, list] = {}
        plain_s: dict[int, float] = {}
        for b in plan.compare_batches:
            self.reset_peak()
            # one untimed call first: nothing warmed plain diffusers up
            plain_s[b], eager[b] = self.timed(lambda b=b: self.plain(pipe, job, b), plan.repeats)
            self.write("compare", arch=arch, variant="plain", batch=b, size=job.width,
                       steps=job.steps, s_per_call=round(plain_s[b], 4),
                       images_per_s=round(b / plain_s[b], 4),
                       s_per_megapixel=round(plain_s[b] / (b * mp), 5),
                       peak_memory_gb=self.peak_gb(), build_s=round(build_s, 1))
        t0 = time.perf_counter()
        engine = self.engine_for(arch, pipe, fast=True)
        apply_s = time.perf_counter() - t0
        engine.warmup(job)
        stats = engine.fastpath_stats()
        self.compile_s = stats["compile_s"]
        self.cold[f"{arch}:fast"] = build_s + apply_s + self.compile_s
        self.engine = engine
        for b in plan.compare_batches:
            if self.skip("compare", 3 * plain_s[b] * plan.repeats, arch=arch, variant="fast",
                         batch=b):
                continue
            jobs = [replace(job, seed=i) for i in range(b)]
            self.reset_peak()
            seconds, images = self.timed(lambda jobs=jobs: engine.generate(jobs), plan.repeats,
                                         warm=plan.warm)
            per_image = [psnr(a, c) for a, c in zip(eager[b], images, strict=True)]
            stats = engine.fastpath_stats()
            self.write("compare", arch=arch, variant="fast", batch=b, size=job.width,
                       steps=job.steps, s_per_call=round(seconds, 4),
                       images_per_s=round(b / seconds, 4),
                       s_per_megapixel=round(seconds / (b * mp), 5),
                       speedup=round(plain_s[b] / seconds, 3), peak_memory_gb=self.peak_gb(),
                       compile_s=stats["compile_s"], buckets=stats["buckets"],
                       eager_images=stats["eager_images"], attention=engine.attention,
                       psnr_db=round(min(per_image), 2),
                       psnr_mean_db=round(sum(per_image) / len(per_image), 2))

    # --- 2. capacity profiles --------------------------------------------------------

    def fast_profiles(self) -> None:
        for arch in self.plan.profile_archs:
            self.profile(arch, fast=True)

    def eager_profiles(self) -> None:
        if self.args.no_eager_profiles:
            self.write("profile", skipped="--no-eager-profiles")
            return
        for arch in reversed(self.plan.profile_archs):  # the smaller model first
            self.profile(arch, fast=False)

    def profile(self, arch: str, fast: bool) -> None:
        from autoscaling.profiler import measure

        plan = self.plan
        reuse = fast and arch == plan.compare_arch and self.engine is not None
        # What is known of the cost: the comparison's compile time bounds a smaller
        # model's; a full run without a comparison guesses.
        need = (20 if reuse else max(self.compile_s, 30 if plan.sizes[arch] < 256 else 120)
                if fast else 60 if plan.sizes[arch] >= 1024 else 30)
        if self.skip("profile", need, arch=arch, fast=fast):
            return
        if reuse:
            engine = self.engine
        else:
            import torch

            self.engine = None
            torch._dynamo.reset()  # drop the last model's graphs (and what they hold)
            self.free()
            pipe, build_s = self.build(arch)
            t0 = time.perf_counter()
            engine = self.engine_for(arch, pipe, fast)
            engine.warmup(self.job(arch, plan.profile_steps))
            self.cold[f"{arch}:{'fast' if fast else 'eager'}"] = (
                build_s + time.perf_counter() - t0)
        key = self.key if fast else f"{self.key}-eager"
        prof = measure(engine, self.job(arch, plan.profile_steps), plan.profile_batches,
                       # one untimed call per batch even in --smoke: the planner
                       # refuses a profile whose batch time falls with the batch
                       repeats=plan.repeats, warmup=1, device=self.device_name,
                       software=self.software)
        cold = round(self.cold[f"{arch}:{'fast' if fast else 'eager'}"], 1)
        record(self.args.profiles_out, arch, key, prof, cold, engine.fastpath_stats())
        self.write("profile", arch=arch, fast=fast, key=key, size=prof.width,
                   steps=prof.steps, attention=prof.attention, compiled=prof.compiled,
                   seconds_per_megapixel=prof.seconds_per_megapixel,
                   peak_memory_gb=prof.peak_memory_gb, cold_start_s=cold,
                   eager_images=engine.fastpath_stats().get("eager_images"))
        if not reuse:
            del engine
        self.engine = None  # the next model needs the memory

    # --- 3. the stack ----------------------------------------------------------------

    def stack(self) -> None:
        # Needs an SD1.5-arch revision in a lock (random weights hash differently on
        # every build) and Ray on the device: see scripts/gpu_bench.sh.
        self.write("stack", skipped="placeholder: `imagegen bench serve --model <an SD1.5-arch "
                   "revision> --concurrency 1 32` once one is in a lock and Ray is on the device")


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def record(path: Path, arch: str, key: str, prof, cold_start_s: float,
           fastpath: dict[str, Any]) -> None:
    """[models.ARCH.profiles.KEY] (what the planner reads) and, beside it,
    [models.ARCH.cold_start_s] KEY = seconds and the fast path that was measured."""
    import tomlkit

    from .capacity import record_profile

    record_profile(path, arch, key, prof)
    doc = tomlkit.parse(path.read_text())
    entry = doc["models"][arch]
    cold = entry.setdefault("cold_start_s", tomlkit.table())
    cold[key] = cold_start_s
    note = entry.setdefault("fastpath", tomlkit.table())
    note[key] = tomlkit.inline_table()
    note[key].update({k: v for k, v in fastpath.items() if k in ("compile", "buckets",
                                                                  "compile_s")})
    path.write_text(tomlkit.dumps(doc))


def main(argv: list[str] | None = None) -> int:
    """`python -m serve.cli.bench_gpu`: the same without the rest of the CLI."""
    p = argparse.ArgumentParser(prog="imagegen bench gpu", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
