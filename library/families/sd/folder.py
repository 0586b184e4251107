"""Build the U-Net, VAE, text encoder and tokenizer from a diffusers folder (`model_index.json` layout).

The text encoder needs care: transformers >= 5.6 saves `CLIPTextModel` with flat keys, older
versions under `text_model.`, and a loader that does not recognise a layout fills the model with
random weights and only logs it. transformers 5.23 maps both layouts; the loading report is
checked here so that a weight the folder lacks is an error, whatever the layout.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer, with_clip_text_cleaning
from library.families.diffusers_folder import load_pretrained, require_configs

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder")


def check_diffusers_folder(path: Path) -> None:
    """Raise unless `path` has the unet/, vae/ and text_encoder/ configs of a diffusers SD folder."""
    require_configs(path, REQUIRED_SUBFOLDERS, "a diffusers Stable Diffusion folder")


def is_open_clip_folder(path: Path) -> bool:
    """True when the folder's text encoder is SD2's OpenCLIP tower, told apart by its activation.

    SD1's CLIP ViT-L uses quick_gelu and SD2's OpenCLIP ViT-H plain gelu; the widths (768, 1024)
    would also tell them apart, but not for small test models.
    """
    config = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    return config.hidden_act == "gelu"


def load_unet(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """The folder's U-Net, with every weight present."""
    return load_pretrained(UNet2DConditionModel, path, "unet", "U-Net", dtype)


def load_vae(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    """The folder's VAE, with every weight present."""
    return load_pretrained(AutoencoderKL, path, "vae", "VAE", dtype)


def load_text_encoder(path: Path, dtype: torch.dtype) -> CLIPTextModel:
    """The folder's CLIPTextModel, in either transformers key layout, with every weight present."""
    return load_pretrained(CLIPTextModel, path, "text_encoder", "text encoder", dtype)


def load_tokenizer(path: Path, v2: bool) -> CLIPTokenizer:
    """The folder's tokenizer/ when it has one (with CLIP's text cleaning, as SD was trained), else SD's
    tokenizer built offline (SD2 pads with "!")."""
    if (path / "tokenizer").is_dir():
        return with_clip_text_cleaning(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True))
    return build_clip_tokenizer(pad_token=SD2_PAD_TOKEN if v2 else EOS_TOKEN)
