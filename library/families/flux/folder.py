"""Build FLUX.1's transformer, AE and text encoders from a diffusers folder (what FluxPipeline saves).

Each part goes through the checked loader the other families' folders use
(`library.families.diffusers_folder.load_pretrained`): a weight the folder lacks is an error, not a
random init that the libraries only log. A part that a flag replaces (--clip_l, --t5xxl, --ae) is
neither required nor read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from library.config.training_script import SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.families.detect import is_flux_folder, is_sdxl_folder
from library.families.diffusers_folder import load_pretrained, require_configs

# Each part's subfolder, and the flag that replaces it with a single file.
PART_FLAGS = {"text_encoder": "--clip_l", "text_encoder_2": "--t5xxl", "vae": "--ae"}


def check_flux_folder(path: Path, replaced: set[str]) -> None:
    """Raise unless `path` is a diffusers FLUX.1 folder with the configs of every part not in `replaced`
    (subfolder names); SDXL and SD 1.x/2.x folders are named, with the script that trains them."""
    if not is_flux_folder(path):
        if is_sdxl_folder(path):
            raise UserInputError(
                f"The model folder {path} is SDXL (text_encoder_2/ and a unet/), not FLUX.1; "
                f"train a LoRA for it with {SDXL_SCRIPT.name}."
            )
        if (path / "unet" / "config.json").is_file():
            raise UserInputError(
                f"The model folder {path} is Stable Diffusion 1.x/2.x (a unet/ and one text encoder), not FLUX.1; "
                f"train a LoRA for it with {SD_SCRIPT.name}."
            )
    needed = ["transformer", *(name for name in PART_FLAGS if name not in replaced)]
    require_configs(path, needed, "a complete diffusers FLUX.1 folder",
                    "Give a folder saved by diffusers (black-forest-labs/FLUX.1-dev's layout), or a transformer file "
                    "with --clip_l, --t5xxl and --ae.")


def load_transformer(path: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
    return load_pretrained(FluxTransformer2DModel, path, "transformer", "transformer", dtype)


def load_clip_l(path: Path, dtype: torch.dtype) -> CLIPTextModel:
    return load_pretrained(CLIPTextModel, path, "text_encoder", "CLIP-L text encoder", dtype)


def load_t5(path: Path, dtype: torch.dtype) -> T5EncoderModel:
    return load_pretrained(T5EncoderModel, path, "text_encoder_2", "T5-XXL text encoder", dtype)


def load_vae(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    return load_pretrained(AutoencoderKL, path, "vae", "AE", dtype)
