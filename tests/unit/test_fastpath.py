"""The engine's fast path (lockfile.EngineOptions, serve/engines/fastpath.py): options
parse or are refused naming the value; with torch.compile, every bucket compiles at
warm-up and a request in a bucket meets no recompile after it, a shape without a
bucket runs eagerly and is counted; channels_last and fused QKV stay close to eager;
`imagegen bench gpu --smoke` runs end to end and writes its JSON lines.

Compiled cases use the `eager` compile backend: dynamo traces, guards and recompiles
exactly as with inductor, without generating kernels (inductor took 140-300 s per
shape for the tiny UNet on 2 busy cores). Inductor itself runs in tests/gpu.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from serve.engines.base import EngineSpec, Job
from serve.errors import ConfigError
from serve.lockfile import EngineOptions, load_lock, parse_lock

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[2]

# --- options: pure, no torch ------------------------------------------------------

ACCEPTED = [
    ({}, EngineOptions()),
    ({"compile": True}, EngineOptions(compile="default")),
    ({"compile": False, "threads": 2}, EngineOptions()),
    ({"xformers": False}, EngineOptions(attention="sdpa")),
    ({"xformers": True}, EngineOptions(attention="auto")),
    ({"dtype": "float16", "attention": "sdpa", "compile": "max-autotune-no-cudagraphs",
      "bucket_sizes": ["1024x1024"], "bucket_batches": [4, 1], "channels_last": True,
      "fused_qkv": True, "vae_tiling_min_pixels": 2048 * 2048},
     EngineOptions(dtype="float16", attention="sdpa", compile="max-autotune-no-cudagraphs",
                   bucket_sizes=["1024x1024"], bucket_batches=[1, 4], channels_last=True,
                   fused_qkv=True, vae_tiling_min_pixels=2048 * 2048)),
]


@pytest.mark.parametrize(("raw", "want"), ACCEPTED)
def test_engine_options_parse_with_the_older_keys(raw, want):
    assert EngineOptions.from_options(raw) == want


REFUSED = [
    ({"dtype": "fp8"}, "'fp8'"),
    ({"attention": "flash"}, "'flash'"),
    ({"compile": "fast"}, "'fast'"),
    ({"compil": "default"}, "compil"),
    ({"compile": "default", "bucket_sizes": ["1000x1001"]}, "'1000x1001'"),
    ({"compile": "default", "bucket_sizes": ["64"]}, "'64'"),
    ({"compile": "default", "bucket_sizes": ["64x64", "64x64"]}, "repeat"),
    ({"compile": "default", "bucket_batches": [1, 1]}, "[1, 1]"),
    ({"compile": "default", "bucket_batches": [0]}, "bucket_batches"),
    ({"bucket_sizes": ["64x64"]}, "need compile"),
    ({"fused_qkv": True, "attention": "xformers"}, "xformers"),
    ({"compile": "max-autotune", "compile_backend": "eager"}, "'max-autotune'"),
    ({"vae_tiling_min_pixels": 16}, "vae_tiling_min_pixels"),
]


@pytest.mark.parametrize(("raw", "needle"), REFUSED)
def test_bad_engine_options_are_refused_naming_the_value(raw, needle):
    with pytest.raises(ConfigError, match="engine options") as e:
        EngineOptions.from_options(raw)
    assert needle in str(e.value)


def test_buckets_cross_sizes_with_batches():
    o = EngineOptions(compile="default", bucket_sizes=["64x64", "32x48"], bucket_batches=[2, 1])
    assert o.buckets == [(64, 64, 1), (64, 64, 2), (32, 48, 1), (32, 48, 2)]


def test_the_shipped_lock_keeps_parsing_with_plain_engine_defaults():
    lock = load_lock(ROOT / "models.lock")
    # Deployment names derive from the file hashes: unchanged by the new table.
    assert {e.deployment_name for e in lock.models.values()} == {
        "tiny-draft-06edd4d87f", "tiny-final-af104efb2b", "tiny-spare-9307d4b34e"}
    assert all(e.engine == EngineOptions() for e in lock.models.values())


def test_a_lock_entry_carries_its_engine_table(lock_text):
    text = lock_text() + (
        '\n[models.tiny-draft.engine]\ndtype = "float16"\ncompile = "default"\n'
        'bucket_sizes = ["64x48"]\nbucket_batches = [1, 2]\n')
    engine = parse_lock(text).get("tiny-draft").engine
    assert (engine.dtype, engine.buckets) == ("float16", [(64, 48, 1), (64, 48, 2)])
    with pytest.raises(ConfigError, match="tiny-draft.engine.compile"):
        parse_lock(lock_text() + '\n[models.tiny-draft.engine]\ncompile = "fast"\n')


def test_every_engine_of_a_revision_gets_its_lock_table_then_the_overrides(lock_text):
    """Replicas, benches and profiles build their engine from one merge: the lock's
    `engine` table, then Settings.engine_options, then the runtime threads."""
    entry = parse_lock(lock_text() + '\n[models.tiny-draft.engine]\nchannels_last = true\n'
                       'attention = "sdpa"\n').get("tiny-draft")
    assert entry.engine_options() == {"channels_last": True, "attention": "sdpa"}
    assert entry.engine_options({"attention": "xformers"}, {"threads": 1}) == {
        "channels_last": True, "attention": "xformers", "threads": 1}
    assert parse_lock(lock_text()).get("tiny-draft").engine_options({"threads": 2}) == {
        "threads": 2}


# --- the engine on the tiny pipeline ------------------------------------------------


def job(seed=0, width=64, height=64, steps=2, guidance=5.0) -> Job:
    return Job("a red fox", "blurry", width, height, steps, guidance, seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve import tinymodels
    from serve.lockfile import files_digest

    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    return path, files_digest(tinymodels.build("tiny-sd", 0, path))


@pytest.fixture
def engine_with(tiny):
    from serve.engines.diffusers_engine import DiffusersEngine

    path, revision = tiny

    def make(**options):
        spec = EngineSpec("tiny-sd", revision, path, "StableDiffusionPipeline", "float32",
                          {"threads": 1, **options})
        engine = DiffusersEngine(spec)
        engine.load()
        return engine

    return make


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.torch
@pytest.mark.parametrize(("options", "needle"), [
    ({"dtype": "float16"}, "needs CUDA"),
    ({"dtype": "bfloat16"}, "needs CUDA"),
    ({"attention": "xformers"}, "needs CUDA"),
    ({"compile": "default", "bucket_sizes": ["63x64"]}, "'63x64'"),
])
def test_cpu_refuses_gpu_only_options_at_load(engine_with, options, needle):
    import torch

    if torch.cuda.is_available() and "CUDA" in needle:
        pytest.skip("CUDA is here")
    with pytest.raises(RuntimeError, match="cannot load tiny-sd") as e:
        engine_with(**options)
    assert needle in str(e.value)


@pytest.mark.torch
def test_buckets_compile_at_warmup_and_requests_in_them_never_recompile(engine_with):
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = engine_with(compile="default", compile_backend="eager",
                         bucket_sizes=["64x64"], bucket_batches=[1, 2])
    engine.fast.sealed_stance = "fail_on_recompile"  # a recompile raises, never hides
    before = counters["stats"]["unique_graphs"]
    engine.warmup(job())
    compiled_at_warmup = counters["stats"]["unique_graphs"] - before
    # UNet and VAE decoder, batch 1 and 2 (graph breaks may add frames).
    assert compiled_at_warmup >= 4
    assert engine.fastpath_stats()["compile_s"] > 0
    assert engine.take_eager_images() == 0
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        # in the buckets: other seeds, prompts and step counts; 3 images run as 2 + 1
        engine.generate([job(seed=5, steps=3)])
        engine.generate([job(seed=s) for s in range(3)])
        assert counters["stats"]["unique_graphs"] == graphs
        assert engine.take_eager_images() == 0
        # no bucket: 32x48, and a guidance that turns classifier-free guidance off
        out = engine.generate([job(width=32, height=48), job(guidance=1.0), job(guidance=1.0)])
    assert [im.shape for im in out] == [(48, 32, 3), (64, 64, 3), (64, 64, 3)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert engine.take_eager_images() == 3
    assert engine.take_eager_images() == 0  # a delta: exported once
    assert engine.fastpath_stats()["eager_calls"] == 2


@pytest.mark.torch
def test_compiled_bucket_output_matches_eager(engine_with):
    import torch

    torch._dynamo.reset()
    plain = engine_with().generate([job(seed=3), job(seed=4)])
    engine = engine_with(compile="default", compile_backend="eager",
                         bucket_sizes=["64x64"], bucket_batches=[2])
    engine.warmup(job())
    fast = engine.generate([job(seed=3), job(seed=4)])
    for a, b in zip(plain, fast, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.torch
@pytest.mark.parametrize("options", [{"channels_last": True}, {"fused_qkv": True},
                                     {"channels_last": True, "fused_qkv": True}])
def test_channels_last_and_fused_qkv_stay_close_to_eager(engine_with, options):
    jobs = [job(seed=1), job(seed=2, width=48, height=32)]
    plain = engine_with().generate(jobs)
    fast = engine_with(**options).generate(jobs)
    for a, b in zip(plain, fast, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert psnr(a, b) >= 45


@pytest.mark.torch
def test_vae_tiling_above_the_threshold_keeps_the_image(engine_with):
    # The tiny VAE's tile is its sample size (64 px): 128x128 decodes in 4 tiles.
    tiled = engine_with(vae_tiling_min_pixels=128 * 128)
    plain = engine_with()
    a = plain.generate([job(width=128, height=128)])[0]
    b = tiled.generate([job(width=128, height=128)])[0]
    assert a.shape == b.shape == (128, 128, 3)
    assert not tiled.pipe.vae.use_tiling  # switched on for that call only
    assert psnr(a, b) >= 20  # blended tile seams differ a little, by design


@pytest.mark.torch
def test_bench_gpu_smoke_writes_every_step_as_json_lines(tmp_path):
    import tomllib

    from serve.cli.main import main
    from serve.lockfile import Profile

    out = tmp_path / "bench.jsonl"
    profiles = tmp_path / "profiles.toml"
    rc = main(["bench", "gpu", "--smoke", "--out", str(out), "--profiles-out", str(profiles),
               "--budget-s", "900"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0, [r for r in rows if "error" in r]
    assert rows[0]["step"] == "env" and rows[-1]["step"] == "done"
    assert {"compare", "profile", "stack"} <= {r["step"] for r in rows}
    compare = [r for r in rows if r["step"] == "compare"]
    assert {(r["variant"], r["batch"]) for r in compare} == {
        ("plain", 1), ("fast", 1), ("plain", 2), ("fast", 2)}
    for r in compare:
        assert r["images_per_s"] > 0 and r["s_per_megapixel"] > 0
        if r["variant"] == "fast":  # same seeds, same weights: close to eager
            assert r["psnr_db"] >= 40 and r["eager_images"] == 0
            assert r["compile_s"] > 0 and r["buckets"] == ["64x64x1", "64x64x2"]
    measured = [r for r in rows if r["step"] == "profile" and "skipped" not in r]
    # A busy machine may skip some for want of budget; the reused SDXL engine never is.
    assert ("sdxl-tiny", True) in {(r["arch"], r["fast"]) for r in measured}
    doc = tomllib.loads(profiles.read_text())["models"]
    for r in measured:
        entry = doc[r["arch"]]
        profile = Profile.model_validate(entry["profiles"][r["key"]])
        assert profile.compiled == r["fast"]
        assert set(profile.seconds_per_megapixel) == {1, 2}
        assert entry["cold_start_s"][r["key"]] > 0
