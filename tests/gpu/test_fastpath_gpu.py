"""The fast path with inductor on a CUDA device (skipped elsewhere): fp16 SDPA,
channels_last, fused QKV and compiled buckets on the tiny SD pipeline stay close to
the eager pipeline, and a request in a bucket meets no recompile after warm-up.
Tiny shapes: this checks the code path on a GPU, not its speed (`imagegen bench gpu`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from serve.engines.base import EngineSpec, Job

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.torch,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve import tinymodels
    from serve.lockfile import files_digest

    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    return path, files_digest(tinymodels.build("tiny-sd", 0, path))


def engine(tiny, **options):
    from serve.engines.diffusers_engine import DiffusersEngine

    path, revision = tiny
    e = DiffusersEngine(EngineSpec("tiny-sd", revision, path, "StableDiffusionPipeline",
                                   "float32", {"dtype": "float16", "attention": "sdpa",
                                               **options}))
    e.load()
    return e


def test_inductor_buckets_match_eager_and_never_recompile(tiny):
    from torch._dynamo.utils import counters

    job = Job("a red fox", "blurry", 64, 64, 4, 7.5, 0)
    jobs = [Job("a red fox", "blurry", 64, 64, 4, 7.5, s) for s in range(4)]
    plain = engine(tiny).generate(jobs)
    torch._dynamo.reset()
    fast = engine(tiny, compile="default", bucket_sizes=["64x64"], bucket_batches=[1, 4],
                  channels_last=True, fused_qkv=True, inductor={"conv_1x1_as_mm": True})
    fast.fast.sealed_stance = "fail_on_recompile"
    fast.warmup(job)
    graphs = counters["stats"]["unique_graphs"]
    out = fast.generate(jobs)
    assert counters["stats"]["unique_graphs"] == graphs
    assert fast.take_eager_images() == 0
    for a, b in zip(plain, out, strict=True):
        mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) >= 30
    fast.generate([Job("a", "", 32, 32, 2, 7.5, 0)])
    assert fast.take_eager_images() == 1
