"""Architecture-faithful pipelines with random weights: the real SD 1.5 and SDXL
component configurations, so their speed and memory equal the real models' where
no weights can be fetched (GPU profiling). Not reproducible byte for byte and not
in models.lock: they exist to be measured. torch/diffusers import inside."""

from __future__ import annotations

from pathlib import Path

from .tinymodels import _tokenizer

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
OPEN_CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
# Smoke-test stand-ins with the same pipeline classes and block structure, small
# enough for a CPU (`imagegen bench gpu --smoke`): they exercise every code path of
# the real ones (SDXL's second text encoder and time ids included), not their speed.
SD15_TINY_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
SDXL_TINY_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "cross_attention_dim": 64, "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32,
}
TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": (32, 64), "layers_per_block": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
             "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 32}
ARCHS = {
    # name: (pipeline class, default size, UNet config)
    "sd15-arch": ("StableDiffusionPipeline", 512, SD15_UNET),
    "sdxl-arch": ("StableDiffusionXLPipeline", 1024, SDXL_UNET),
    "sd15-tiny": ("StableDiffusionPipeline", 64, SD15_TINY_UNET),
    "sdxl-tiny": ("StableDiffusionXLPipeline", 64, SDXL_TINY_UNET),
}
# name: (VAE config, text encoder config, second text encoder config or None)
_PARTS = {
    "sd15-arch": (VAE, CLIP_L, None),
    "sdxl-arch": (VAE, CLIP_L, OPEN_CLIP_BIG_G),
    "sd15-tiny": (TINY_VAE, TINY_CLIP, None),
    "sdxl-tiny": (TINY_VAE, TINY_CLIP, TINY_CLIP),
}


def make_arch(name: str, dtype: str = "float16", device: str = "cpu", seed: int = 0):
    """The random-weight `name` pipeline in memory, on `device` in `dtype` (nothing
    written: SDXL's 7 GB take longer to save and load than to build on a GPU)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls_name, size, unet_cfg = ARCHS[name]
    vae_cfg, text_cfg, text2_cfg = _PARTS[name]
    torch_dtype = getattr(torch, dtype)
    tokenizer = _tokenizer(1000)
    ids = {"vocab_size": 49408, "max_position_embeddings": 77,
               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg, sample_size=size)
        parts = {"unet": unet, "vae": vae, "tokenizer": tokenizer,
                 "scheduler": diffusers.EulerDiscreteScheduler(
                     beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1)}
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_cfg, **ids))
        if text2_cfg is not None:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**text2_cfg, **ids))
            parts["tokenizer_2"] = tokenizer
        else:
            parts.update(safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)
    return getattr(diffusers, cls_name)(**parts).to(torch_dtype)


def build_arch(name: str, out_dir: Path, dtype: str = "float16", device: str = "cpu") -> str:
    """Write a random-weight `name` pipeline to `out_dir`; returns its pipeline class."""
    make_arch(name, dtype, device).save_pretrained(Path(out_dir), safe_serialization=True)
    return ARCHS[name][0]
