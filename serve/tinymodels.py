"""Tiny Stable Diffusion pipelines built from a seed: real code paths, no downloads.

`build(recipe, seed, out_dir)` writes a StableDiffusionPipeline directory that
`from_pretrained(out_dir, local_files_only=True)` loads. The bytes are a pure
function of (recipe, seed) under one minor version of torch, diffusers and
transformers, whatever the CPU, so models.lock can pin a built model by sha256 like any other.
`build_missing` builds the lock's builtin entries that are not on disk yet (what
`imagegen serve` and `imagegen models build` do). torch, diffusers and transformers
are imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelVerificationError
from .lockfile import BuiltinSource, ModelEntry, hash_tree, load_lock, verify

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_TOKENS = 77

# Keys save_pretrained stamps with the library version: a patch release would
# change the bytes (and the content revision) of an otherwise identical model.
_VERSION_KEYS = frozenset({"_diffusers_version", "transformers_version"})


@dataclass(frozen=True, slots=True)
class Recipe:
    """Sizes of one tiny pipeline. Text hidden size is also the UNet's cross-attention dim."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_groups: int
    attention_head_dim: int
    vae_channels: tuple[int, ...]
    vae_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int = 1000
    sample_size: int = 8


RECIPES: dict[str, Recipe] = {
    # diffusers' own dummy-component sizes (tests/pipelines/stable_diffusion).
    "tiny-sd": Recipe(
        unet_channels=(4, 8), unet_layers=1, unet_groups=2, attention_head_dim=8,
        vae_channels=(4, 8), vae_groups=2,
        text_hidden=32, text_layers=2, text_heads=4, text_intermediate=37,
    ),
    # A few times the per-image compute of tiny-sd: a second, slower revision for
    # routing, autoscaling and canary tests.
    "small-sd": Recipe(
        unet_channels=(24, 48), unet_layers=2, unet_groups=4, attention_head_dim=8,
        vae_channels=(8, 16), vae_groups=4,
        text_hidden=64, text_layers=2, text_heads=4, text_intermediate=128,
    ),
}


def build(recipe: str, seed: int, out_dir: Path) -> dict[str, str]:
    """Build recipe `recipe` with random weights derived from `seed` into `out_dir`.

    `out_dir` must not exist or be empty. Returns `lockfile.hash_tree(out_dir)`.
    """
    try:
        r = RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    from transformers.utils import logging as tf_logging

    pipe = _pipeline(r, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()  # "Writing model shards" on stderr, for one shard
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars:
            tf_logging.enable_progress_bar()
    for path in sorted(out_dir.rglob("*.json")):
        _canonical_json(path)
    return hash_tree(out_dir)


def _pipeline(r: Recipe, seed: int):
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer(r.vocab_size)
    # Seed before each component, in a fixed order, so construction is reproducible;
    # the weights themselves come from _reinit, whose bytes do not depend on the CPU.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=r.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=r.unet_channels,
        layers_per_block=r.unet_layers,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=r.text_hidden,
        attention_head_dim=r.attention_head_dim,
        norm_num_groups=r.unet_groups,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=r.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(r.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(r.vae_channels),
        latent_channels=4,
        norm_num_groups=r.vae_groups,
        sample_size=r.sample_size * 2 ** (len(r.vae_channels) - 1),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=r.vocab_size,
            hidden_size=r.text_hidden,
            intermediate_size=r.text_intermediate,
            num_hidden_layers=r.text_layers,
            num_attention_heads=r.text_heads,
            max_position_embeddings=MAX_TOKENS,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for name, model in [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]:
        _reinit(model, seed, name)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # without it every load logs a deprecation warning
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _reinit(model, seed: int, component: str) -> None:
    # Overwrite every parameter with values whose bytes are the same on every CPU.
    # torch's own initialisers are not: normal_ runs Box-Muller through per-ISA
    # approximations of log/sin/cos, and uniform_ rounds differently with and
    # without FMA (measured: ATEN_CPU_CAPABILITY=default vs avx2 changed every
    # weight file). Here each value is a random integer in [-2^23, 2^23) (integer
    # RNG, exact), converted exactly to float32 and scaled by one float32 multiply,
    # which IEEE rounds the same everywhere. Scales follow PyTorch's defaults:
    # weights and biases U(+-1/sqrt(fan_in)), norms 1 and 0; embeddings std 0.02
    # like CLIP. Each component draws from its own stream.
    import torch

    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, norms):
                    param.fill_(1.0 if name == "weight" else 0.0)
                    continue
                if isinstance(module, torch.nn.Embedding):
                    bound = 0.02 * 3**0.5
                else:
                    ref = weight if weight is not None and weight.dim() > 1 else param
                    bound = (ref.numel() // ref.shape[0]) ** -0.5
                ints = torch.randint(-(2**23), 2**23, param.shape, generator=gen,
                                     dtype=torch.int32)
                param.copy_(ints.to(torch.float32) * (bound / 2**23))


def _tokenizer(vocab_size: int):
    """A CLIP byte-level BPE tokenizer from Python objects (no vocab files).

    Like CLIP's own vocab: the 256 byte symbols, the same with `</w>`, merges, then
    the two special tokens last, padded with merges to exactly `vocab_size` ids.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    n_merges = vocab_size - len(tokens) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens) + 2} base tokens")
    letters = "etaoinshrdlcumwfgypbvkjxqz"  # English letter frequency: useful merges first
    merges: list[tuple[str, str]] = []
    for a in letters:
        for b in letters:
            merges += [(a, b + "</w>"), (a, b)]
    merges = merges[:n_merges]
    if len(merges) < n_merges:
        raise ValueError(f"vocab_size {vocab_size} needs more merges than this recipe has")
    tokens += [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte 0..255 (ByteLevel pre-tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _canonical_json(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(_strip_versions(data), sort_keys=True, indent=2) + "\n",
                    encoding="utf-8")


def _strip_versions(value):
    if isinstance(value, dict):
        return {k: _strip_versions(v) for k, v in value.items() if k not in _VERSION_KEYS}
    if isinstance(value, list):
        return [_strip_versions(v) for v in value]
    return value


def build_entry(entry: ModelEntry, model_dir: Path, *, force: bool = False) -> Path:
    """Build one builtin entry into its locked directory; verify it matches the lock."""
    assert isinstance(entry.source, BuiltinSource)
    dest = entry.local_dir(model_dir)
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / "model"
        build(entry.source.recipe, entry.source.seed, out)
        try:
            verify(entry, out)
        except ModelVerificationError as e:
            raise ModelVerificationError(
                f"{e.message}. The builder no longer reproduces the lock: pinned torch/"
                "diffusers/transformers changed? Rebuild and re-hash with "
                f"`imagegen models hash {entry.name} DIR`"
            ) from None
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)  # atomic on one filesystem: no half-built model is ever visible
    return dest


def build_missing(lock_file: Path, model_dir: Path, *, force: bool = False) -> list[str]:
    """Build every builtin entry of the lock not yet under `model_dir`; their names."""
    from tqdm import tqdm

    lock = load_lock(lock_file)
    todo = [
        e for e in lock.models.values()
        if isinstance(e.source, BuiltinSource) and (force or not e.local_dir(model_dir).exists())
    ]
    for entry in tqdm(todo, desc="building tiny models", unit="model", disable=not todo):
        build_entry(entry, model_dir, force=force)
    return [e.name for e in todo]
