"""The engine contract: every Engine backend passes the same cases.

FakeEngine needs nothing; DiffusersEngine runs a tiny-sd pipeline built here from a
seed (no downloads). Images are compared as encoded PNG bytes. One exception:
convolution kernels are chosen by batch size (oneDNN on the CPU, cuDNN on CUDA),
so raw floats move by ~3e-6 with batch composition and some values land on the
other side of a rounding boundary. Measured on 64x64 tiny-sd images: 1-7 of 12288
values on the CPU, 65-146 on an H100, never by more than 1. A backend declares
whether it is exactly batch-invariant; the others must stay within one step.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from serve.engines.base import EngineSpec, Job
from serve.engines.fake import FakeEngine, decode

# Before anything imports huggingface_hub (it reads this once): never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"

REVISION = "0123456789abcdef" * 4


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def job(seed: int = 0, width: int = 64, height: int = 64, prompt: str = "a red fox") -> Job:
    return Job(prompt, "blurry", width, height, 2, 7.5, seed)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(path, revision) of a tiny-sd pipeline built once for this module."""
    from serve import tinymodels
    from serve.lockfile import files_digest

    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    return path, files_digest(tinymodels.build("tiny-sd", 0, path))


@pytest.fixture(params=["fake", pytest.param("diffusers", marks=pytest.mark.torch)])
def make_engine(request):
    """A factory for fresh, loaded engines of one backend."""
    if request.param == "fake":
        spec = EngineSpec("fake", REVISION, None, "StableDiffusionPipeline", "float32", {})
        cls, batch_invariant = FakeEngine, True
    else:
        from serve.engines.diffusers_engine import DiffusersEngine

        path, revision = request.getfixturevalue("tiny_sd")
        # One thread: float results depend on the thread count.
        spec = EngineSpec("tiny-sd", revision, path, "StableDiffusionPipeline", "float32",
                          {"threads": 1})
        cls, batch_invariant = DiffusersEngine, False

    def make():
        engine = cls(spec)
        engine.load()
        return engine

    make.batch_invariant = batch_invariant
    return make


def test_one_uint8_image_per_job_in_order(make_engine):
    jobs = [job(1), job(2, width=32, height=48), job(3, width=48, height=32)]
    images = make_engine().generate(jobs)
    assert len(images) == len(jobs)
    for j, image in zip(jobs, images):
        assert image.dtype == np.uint8
        assert image.shape == (j.height, j.width, 3)


def test_same_job_same_image_across_calls_and_instances(make_engine):
    a, b = make_engine(), make_engine()
    first = png(a.generate([job(7)])[0])
    assert png(a.generate([job(7)])[0]) == first
    assert png(b.generate([job(7)])[0]) == first


def test_different_seeds_give_different_images(make_engine):
    one, two = make_engine().generate([job(1), job(2)])
    assert not np.array_equal(one, two)


def test_mixed_batch_matches_jobs_generated_alone(make_engine):
    engine = make_engine()
    jobs = [job(1), job(2, width=32, height=48, prompt="a boat"), job(3), job(4, 32, 48)]
    batched = engine.generate(jobs)
    for j, image in zip(jobs, batched):
        alone = engine.generate([j])[0]
        if make_engine.batch_invariant:
            assert png(image) == png(alone), j
        else:
            assert image.shape == alone.shape, j
            share = 1e-3 if getattr(engine, "device", "cpu") == "cpu" else 0.05
            diff = np.abs(image.astype(np.int16) - alone)
            assert diff.max() <= 1 and (diff > 0).mean() < share, (j, diff.max(), (diff > 0).sum())


def test_warmup_and_memory(make_engine):
    engine = make_engine()
    engine.warmup(job(0))
    assert isinstance(engine.memory(), dict)


def test_fake_engine_encodes_revision_and_seed():
    engine = FakeEngine(EngineSpec("fake", REVISION, None, "StableDiffusionPipeline",
                                   "float32", {}))
    engine.load()
    images = engine.generate([job(5), job(123456, width=32, height=32)])
    assert [decode(image) for image in images] == [(REVISION[:12], 5), (REVISION[:12], 123456)]


@pytest.mark.torch
def test_diffusers_engine_on_cpu_uses_sdpa(tiny_sd):
    import torch

    from serve.engines.diffusers_engine import DiffusersEngine

    path, revision = tiny_sd
    engine = DiffusersEngine(EngineSpec("tiny-sd", revision, path, "StableDiffusionPipeline",
                                        "float32", {"threads": 1}))
    engine.load()
    assert torch.get_num_threads() == 1
    if not torch.cuda.is_available():
        assert (engine.device, engine.attention, engine.memory()) == ("cpu", "sdpa", {})


@pytest.mark.torch
@pytest.mark.parametrize(
    ("pipeline", "subdir", "cause"),
    [
        ("NoSuchPipeline", "", "not a diffusers pipeline class"),
        ("StableDiffusionPipeline", "missing", "missing"),
    ],
)
def test_diffusers_engine_load_errors_name_revision_and_cause(tiny_sd, pipeline, subdir, cause):
    from serve.engines.diffusers_engine import DiffusersEngine

    path, revision = tiny_sd
    engine = DiffusersEngine(EngineSpec("tiny-sd", revision, path / subdir, pipeline,
                                        "float32", {}))
    with pytest.raises(RuntimeError, match=revision[:12]) as info:
        engine.load()
    assert cause in str(info.value)
