"""Built tiny pipelines are a pure function of (recipe, seed) and load offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import tinymodels

# Before anything imports huggingface_hub (it reads this once): never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).parents[2]
WEIGHTS = {
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """dir -> hash_tree for tiny-sd seed 0 (twice) and seed 1."""
    root = tmp_path_factory.mktemp("tinymodels")
    return {
        name: (root / name, tinymodels.build("tiny-sd", seed, root / name))
        for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    }


@pytest.mark.torch
def test_same_recipe_and_seed_give_identical_bytes(built):
    assert built["a"][1] == built["b"][1]
    assert WEIGHTS <= set(built["a"][1])


@pytest.mark.torch
def test_different_seed_changes_every_weight_file_only(built):
    a, c = built["a"][1], built["c"][1]
    assert {rel for rel in a if a[rel] != c[rel]} == WEIGHTS


@pytest.mark.torch
def test_json_is_canonical_and_carries_no_library_version(built):
    path, files = built["a"]
    for rel in (r for r in files if r.endswith(".json")):
        text = (path / rel).read_text()
        data = json.loads(text)
        assert text == json.dumps(data, sort_keys=True, indent=2) + "\n", rel
        assert "_diffusers_version" not in text and "transformers_version" not in text, rel


@pytest.mark.torch
def test_built_pipeline_loads_offline(built):
    from diffusers import StableDiffusionPipeline

    path, _ = built["a"]
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                   low_cpu_mem_usage=False)
    assert pipe.tokenizer.model_max_length == 77
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id


@pytest.mark.torch
def test_bytes_do_not_depend_on_cpu_instruction_set(built, tmp_path):
    # torch's own initialisers differ between its default and AVX2 kernels.
    code = (
        "import sys, json; from pathlib import Path; from serve import tinymodels; "
        "print(json.dumps(tinymodels.build('tiny-sd', 0, Path(sys.argv[1]))))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env,
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.splitlines()[-1]) == built["a"][1]


@pytest.mark.torch
def test_small_sd_stays_under_5_mb(tmp_path):
    small = tinymodels.build("small-sd", 0, tmp_path / "small")
    sizes = {rel: (tmp_path / "small" / rel).stat().st_size for rel in small}
    assert 1_000_000 < sum(sizes.values()) < 5_000_000


def test_build_refuses_unknown_recipe_and_non_empty_dir(tmp_path):
    with pytest.raises(ValueError, match="no-such"):
        tinymodels.build("no-such", 0, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        tinymodels.build("tiny-sd", 0, tmp_path / "full")


def test_importing_builders_and_engines_does_not_import_torch():
    code = (
        "import sys, serve.tinymodels, serve.engines.diffusers_engine; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
