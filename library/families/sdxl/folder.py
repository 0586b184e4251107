"""Build SDXL's U-Net, VAE, text encoders and tokenizers from a diffusers folder (`model_index.json` layout).

Each part goes through the checked loader SD's folders use (`library.families.diffusers_folder.load_pretrained`):
a weight the folder lacks is an error, not a random init that the libraries only log.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.errors import UserInputError
from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer, with_clip_text_cleaning
from library.families.diffusers_folder import load_pretrained, require_configs

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def check_sdxl_folder(path: Path) -> None:
    """Raise unless `path` has the configs of a diffusers SDXL folder; an SD 1.x/2.x folder is named as one."""
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name / "config.json").is_file()]
    if missing == ["text_encoder_2"]:
        raise UserInputError(
            f"The model folder {path} is Stable Diffusion 1.x/2.x (one text encoder, no text_encoder_2/), "
            "not SDXL; train a LoRA for it with train_network_cat.py."
        )
    require_configs(path, REQUIRED_SUBFOLDERS, "a diffusers SDXL folder")


def load_unet(path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    return load_pretrained(UNet2DConditionModel, path, "unet", "U-Net", dtype)


def load_vae(path: Path, dtype: torch.dtype) -> AutoencoderKL:
    return load_pretrained(AutoencoderKL, path, "vae", "VAE", dtype)


def load_text_encoders(path: Path, dtype: torch.dtype) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """TE1 from text_encoder/ and TE2, with its projection, from text_encoder_2/."""
    return (
        load_pretrained(CLIPTextModel, path, "text_encoder", "first text encoder", dtype),
        load_pretrained(CLIPTextModelWithProjection, path, "text_encoder_2", "second text encoder", dtype),
    )


def load_tokenizers(path: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The folder's tokenizer/ and tokenizer_2/ where it has them, else SD's built offline (TE2 pads with "!").

    A saved tokenizer gets CLIP's text cleaning added, as the offline one has it: transformers 5 would
    otherwise tokenize curly quotes and ligatures differently from how SDXL was trained.
    """
    return _load_tokenizer(path, "tokenizer", EOS_TOKEN), _load_tokenizer(path, "tokenizer_2", SD2_PAD_TOKEN)


def _load_tokenizer(path: Path, subfolder: str, pad_token: str) -> CLIPTokenizer:
    if not (path / subfolder).is_dir():
        return build_clip_tokenizer(pad_token=pad_token)
    return with_clip_text_cleaning(CLIPTokenizer.from_pretrained(path, subfolder=subfolder, local_files_only=True))
