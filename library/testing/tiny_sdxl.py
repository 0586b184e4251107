"""A tiny SDXL-shaped model with seeded random weights, for tests and the SDXL demo.

Built from `configs/models/tiny_sdxl`: a U-Net of about 0.8M parameters with SDXL's block layout
(a plain first level, cross-attention levels with 1 and 2 transformer layers, the text-time
embedding that takes the pooled text and six size/crop numbers), an 8x VAE with SDXL's scaling
factor, a 3-layer CLIP text encoder (TE1) and a 3-layer CLIP text encoder with projection (TE2),
whose hidden sizes add up to the U-Net's cross-attention width, as 768 + 1280 do in SDXL.
The writers produce a diffusers folder or an SGM-layout single file; reading those back goes
through `load_sdxl`, exactly as a user's checkpoint does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer
from library.families.family import freeze_models
from library.families.model_parts import MODEL_CONFIGS_DIR, build_noise_scheduler
from library.families.sdxl.family import SDXLModels
from library.testing import ldm_layout
from library.testing.tiny_sd import perturb, save_diffusers_folder, write_state_dict

TINY_SDXL_CONFIG = MODEL_CONFIGS_DIR / "tiny_sdxl"


def build_tiny_sdxl(seed: int = 0, v_parameterization: bool = False) -> SDXLModels:
    """A tiny SDXL-shaped model whose weights depend only on `seed` (the global RNG is left as it was)."""
    config_dir = TINY_SDXL_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        text_encoder_1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2"))
        for model in (unet, vae, text_encoder_1, text_encoder_2):
            perturb(model)
    models = SDXLModels(
        text_encoder_1=text_encoder_1,
        text_encoder_2=text_encoder_2,
        tokenizer_1=build_clip_tokenizer(pad_token=EOS_TOKEN),
        tokenizer_2=build_clip_tokenizer(pad_token=SD2_PAD_TOKEN),
        unet=unet,
        vae=vae,
        noise_scheduler=build_noise_scheduler(config_dir, v_parameterization),
        v_parameterization=v_parameterization,
    )
    freeze_models(models, torch.float32)
    return models


def save_sdxl_diffusers_folder(models: SDXLModels, path: str | os.PathLike) -> Path:
    """Write `models` as a diffusers SDXL folder (`tiny_sd.save_diffusers_folder`, which every family's pipeline serves)."""
    return save_diffusers_folder(models, path)


def sgm_state_dict(models: SDXLModels) -> dict[str, torch.Tensor]:
    """All weights of `models` in the SGM single-file layout of sd_xl_base_1.0.safetensors."""
    state_dict = {
        **ldm_layout.sdxl_unet_to_sgm(models.unet.state_dict(), models.unet.config),
        **ldm_layout.vae_to_ldm(models.vae.state_dict(), models.vae.config),
        **ldm_layout.sdxl_text_encoder_1_to_sgm(models.text_encoder_1.state_dict()),
        **ldm_layout.sdxl_text_encoder_2_to_sgm(models.text_encoder_2.state_dict()),
    }
    # safetensors refuses views that share storage; each tensor gets its own.
    return {key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}


def save_sdxl_single_file(models: SDXLModels, path: str | os.PathLike) -> Path:
    """Write `models` as one SGM-layout checkpoint: `.safetensors`, or `.ckpt`/`.pt` as {"state_dict": ...}."""
    path = Path(path)
    write_state_dict(sgm_state_dict(models), path)
    return path
