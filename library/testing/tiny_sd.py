"""A tiny SD-shaped model with seeded random weights, and writers for the formats users load.

No model can be downloaded on our machines, so tests and the demo build one from
`configs/models/tiny_sd_v1` or `tiny_sd_v2`: a U-Net of about 1M parameters with transformer blocks
in its down, mid and up paths, resnets, downsamplers and upsamplers (every LoRA target kind), an
8x-downscaling VAE and a 3-layer CLIP text encoder. The writers produce a diffusers folder or an
LDM-layout single file; reading those back goes through `load_stable_diffusion`, exactly as a
user's checkpoint does.
"""

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.testing import ldm_layout
from library.families.checkpoint_file import PICKLE_SUFFIXES
from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer
from library.errors import UserInputError
from library.families.family import ModelFamily, freeze_models
from library.families.sd.family import StableDiffusionModels
from library.families.model_parts import MODEL_CONFIGS_DIR, build_noise_scheduler

# Added to every parameter after the default init: norms then no longer sit at exactly 1 and biases
# at 0, so a conversion that swaps or drops them changes the outputs instead of hiding.
PERTURBATION_STD = 0.05


def tiny_config_dir(v2: bool = False) -> Path:
    """configs/models/tiny_sd_v2 (linear attention projections, like SD2) or tiny_sd_v1 (1x1 convs, like SD1)."""
    return MODEL_CONFIGS_DIR / ("tiny_sd_v2" if v2 else "tiny_sd_v1")


def build_tiny_sd(seed: int = 0, v2: bool = False, v_parameterization: bool = False,
                  config_dir: Path | None = None) -> StableDiffusionModels:
    """A tiny SD1- or SD2-shaped model whose weights depend only on `seed` (the global RNG is left as it was),
    built from `config_dir` (default: `tiny_config_dir(v2)`; e.g. `configs/models/small_sd_v1`, a 17.6M-parameter U-Net)."""
    config_dir = config_dir or tiny_config_dir(v2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
        for model in (unet, vae, text_encoder):
            perturb(model)
    models = StableDiffusionModels(
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(pad_token=SD2_PAD_TOKEN if v2 else EOS_TOKEN),
        unet=unet,
        vae=vae,
        noise_scheduler=build_noise_scheduler(config_dir, v_parameterization),
        v2=v2,
        v_parameterization=v_parameterization,
    )
    freeze_models(models, torch.float32)
    return models


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Add seeded Gaussian noise to every parameter (the caller has seeded the RNG)."""
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * PERTURBATION_STD)


def save_diffusers_folder(models: ModelFamily, path: str | os.PathLike) -> Path:
    """Write `models` as a diffusers folder (model_index.json and a folder per part: unet/, vae/, text_encoder/,
    tokenizer/, scheduler/, and for SDXL text_encoder_2/, tokenizer_2/)."""
    models.pipeline().save_pretrained(path)
    return Path(path)


def ldm_state_dict(models: StableDiffusionModels) -> dict[str, torch.Tensor]:
    """All weights of `models` in the original LDM single-file layout (SD2: OpenCLIP text encoder)."""
    text_encoder_to_ldm = ldm_layout.sd2_text_encoder_to_ldm if models.v2 else ldm_layout.sd1_text_encoder_to_ldm
    state_dict = {
        **ldm_layout.unet_to_ldm(models.unet.state_dict(), models.unet.config),
        **ldm_layout.vae_to_ldm(models.vae.state_dict(), models.vae.config),
        **text_encoder_to_ldm(models.text_encoder.state_dict()),
    }
    # safetensors refuses views that share storage; each tensor gets its own.
    return {key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}


def save_single_file(models: StableDiffusionModels, path: str | os.PathLike) -> Path:
    """Write `models` as one LDM-layout checkpoint: `.safetensors`, or `.ckpt`/`.pt` as {"state_dict": ...}."""
    path = Path(path)
    write_state_dict(ldm_state_dict(models), path)
    return path


def write_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict in the format its suffix names, as checkpoints of that format are laid out."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        save_file(state_dict, path, metadata={"format": "pt"})
    elif suffix in PICKLE_SUFFIXES:
        torch.save({"state_dict": state_dict, "global_step": 0}, path)
    else:
        raise UserInputError(
            f"Cannot write a checkpoint to {path}: the suffix {suffix or '(none)'!r} is not .safetensors, .ckpt or .pt."
        )
