"""Load FLUX.1 (dev and schnell) the way users give it to sd-scripts' flux_train_network.py.

`load_flux` is what `--pretrained_model_name_or_path`, `--clip_l`, `--t5xxl`, `--ae`,
`--tokenizer_cache_dir`, `--guidance_scale`, `--t5xxl_max_token_length`, `--apply_t5_attn_mask` and
`--disable_mmap_load_safetensors` of `flux_train_network_cat.py` resolve to. The model is either

- a diffusers FLUX.1 folder (model_index.json naming FluxPipeline); --clip_l, --t5xxl and --ae,
  where given, replace its parts (as sd-scripts allows); or
- one transformer file (flux1-dev.safetensors in BFL layout, or diffusers' layout), with the other
  parts' files named by --clip_l, --t5xxl and --ae, as ComfyUI and sd-scripts users have them.

Single files are converted offline against an architecture folder (default: configs/models/flux_dev,
the configs of black-forest-labs/FLUX.1-dev), whose scheduler/ gives the training schedule whatever
the model's own folder says (as for SD and SDXL). Every mistake a user can make with these flags is
refused with a sentence before the weights are read, where it can be told from names and headers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import T5TokenizerFast

from library.config.train_config import ModelArgs
from library.errors import UserInputError
from library.families.clip_tokenizer import EOS_TOKEN, build_clip_tokenizer
from library.families.detect import checkpoint_keys
from library.families.family import freeze_models
from library.families.flux import folder as flux_folder
from library.families.flux import single_file as flux_single_file
from library.families.flux.family import FluxModels
from library.families.flux.tokenizers import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    load_t5_tokenizer,
)
from library.families.model_parts import MODEL_CONFIGS_DIR

logger = logging.getLogger(__name__)

# --mixed_precision -> the dtype the frozen transformer and text encoders are read into.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLUX_DEV_CONFIG = MODEL_CONFIGS_DIR / "flux_dev"
ARCHITECTURE_FILES = ("transformer/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                      "vae/config.json", "scheduler/scheduler_config.json")
# The T5 tokenizer FLUX.1 was trained with, and where sd-scripts keeps it under --tokenizer_cache_dir.
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"
T5_TOKENIZER_CACHE_NAME = T5_TOKENIZER_ID.replace("/", "_")
T5_VOCAB_SIZE = 32100  # its 32000 pieces and 100 sentinels


def architecture_dir(model_config: str | os.PathLike | None = None) -> Path:
    """The architecture config folder: `model_config` when given, else configs/models/flux_dev."""
    if model_config is None:
        return FLUX_DEV_CONFIG
    folder = Path(model_config)
    missing = [name for name in ARCHITECTURE_FILES if not (folder / name).is_file()]
    if missing:
        raise UserInputError(
            f"The model_config folder {folder} lacks {', '.join(missing)}; give a folder laid out like {FLUX_DEV_CONFIG}."
        )
    return folder


def load_flux(
    path: str | os.PathLike,
    *,
    clip_l: str | os.PathLike | None = None,
    t5xxl: str | os.PathLike | None = None,
    ae: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    disable_mmap: bool = False,
    tokenizer_cache_dir: str | os.PathLike | None = None,
    guidance_scale: float = 3.5,
    t5_max_length: int | None = None,
    apply_t5_attn_mask: bool = False,
) -> FluxModels:
    """Load a FLUX.1 diffusers folder, or a transformer file with its parts' files, frozen, in eval mode, in `dtype`
    (the AE in `vae_dtype`, default `dtype`).

    `clip_l`, `t5xxl` and `ae` name the single files of CLIP-L, T5-XXL and the AE (required beside a
    transformer file; replacing the folder's parts otherwise); `model_config` the architecture folder;
    `disable_mmap` reads .safetensors files into memory in one go. `guidance_scale`, `t5_max_length`
    and `apply_t5_attn_mask` are how the model is told the text and guidance in training (`FluxModels`).
    """
    path = Path(path)
    part_files = _part_files(path, clip_l=clip_l, t5xxl=t5xxl, ae=ae)
    config_dir = architecture_dir(model_config)
    if path.is_dir():
        flux_folder.check_flux_folder(path, replaced=set(part_files))
    t5_tokenizer = resolve_t5_tokenizer(path if path.is_dir() else None, tokenizer_cache_dir, config_dir)
    vae = _load_part("vae", path, part_files, config_dir, vae_dtype or dtype, disable_mmap)
    clip = _load_part("text_encoder", path, part_files, config_dir, dtype, disable_mmap)
    t5 = _load_part("text_encoder_2", path, part_files, config_dir, dtype, disable_mmap)
    if path.is_dir():
        transformer = flux_folder.load_transformer(path, dtype)
    else:
        transformer = flux_single_file.load_transformer(path, config_dir, dtype, disable_mmap)
    models = FluxModels(
        transformer=transformer,
        clip_l=clip,
        t5=t5,
        clip_tokenizer=build_clip_tokenizer(pad_token=EOS_TOKEN),  # FLUX's CLIP-L pads as SD1's does
        t5_tokenizer=t5_tokenizer,
        vae=vae,
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
            config_dir, subfolder="scheduler", local_files_only=True
        ),
        guidance_scale=guidance_scale,
        t5_max_length=t5_max_length,
        apply_t5_attn_mask=apply_t5_attn_mask,
    )
    freeze_models(models, dtype, vae_dtype)
    return models


def _part_files(path: Path, **flags: str | os.PathLike | None) -> dict[str, Path]:
    """The files the flags name, by the folder part each replaces. A transformer file must be FLUX.1's and
    come with all three; every file named must exist. Only names and headers are read."""
    if not path.exists():
        raise UserInputError(
            f"The model path {path} (--pretrained_model_name_or_path) does not exist; give a diffusers FLUX.1 "
            "folder or a FLUX.1 transformer file (flux1-dev.safetensors)."
        )
    given = {subfolder: flags[flag.removeprefix("--")] for subfolder, flag in flux_folder.PART_FLAGS.items()}
    if not path.is_dir():
        layout = flux_single_file.transformer_layout(list(checkpoint_keys(path)), path)
        missing = [flux_folder.PART_FLAGS[subfolder] for subfolder, value in given.items() if value is None]
        if missing:
            raise UserInputError(
                f"The model {path} is a FLUX.1 transformer alone ({layout} layout), but {', '.join(missing)} "
                f"{'was' if len(missing) == 1 else 'were'} not given; pass {' '.join(f'{flag} FILE' for flag in missing)} "
                "(clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors), or give a diffusers FLUX.1 folder."
            )
    for subfolder, value in given.items():
        if value is not None and not Path(value).is_file():
            raise UserInputError(
                f"The {flux_folder.PART_FLAGS[subfolder]} file {value} does not exist; give the path of a .safetensors file."
            )
    return {subfolder: Path(value) for subfolder, value in given.items() if value is not None}


# How each part is read: from a file (with the folder holding its config), or from the model folder.
_PART_LOADERS = {
    "vae": (flux_single_file.load_ae, flux_folder.load_vae),
    "text_encoder": (flux_single_file.load_clip_l, flux_folder.load_clip_l),
    "text_encoder_2": (flux_single_file.load_t5, flux_folder.load_t5),
}


def _load_part(subfolder: str, path: Path, part_files: dict[str, Path], config_dir: Path, dtype: torch.dtype,
               disable_mmap: bool) -> torch.nn.Module:
    """The part its flag's file gives, else the model folder's. A file is read against the model folder's
    config of that part where it has one (as the folder's own weights would be), else the architecture's."""
    from_file, from_folder = _PART_LOADERS[subfolder]
    if subfolder not in part_files:
        return from_folder(path, dtype)
    own_config = path.is_dir() and (path / subfolder / "config.json").is_file()
    return from_file(part_files[subfolder], path if own_config else config_dir, dtype, disable_mmap)


def resolve_t5_tokenizer(folder: Path | None, cache_dir: str | os.PathLike | None, config_dir: Path) -> T5TokenizerFast:
    """The T5 tokenizer from, in order: the model folder's tokenizer_2/, sd-scripts' place for it in
    --tokenizer_cache_dir, the architecture folder's tokenizer_2/, else the Hub (or its local cache).

    A tokenizer fetched from the Hub is saved into --tokenizer_cache_dir, as sd-scripts does, for
    machines that train offline later.
    """
    cached = Path(cache_dir) / T5_TOKENIZER_CACHE_NAME if cache_dir is not None else None
    candidates = [folder / "tokenizer_2" if folder is not None else None, cached, config_dir / "tokenizer_2"]
    for candidate in candidates:
        if candidate is not None and candidate.is_dir():
            return load_t5_tokenizer(candidate)
    searched = ", ".join(str(candidate) for candidate in candidates if candidate is not None)
    try:
        tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_ID)
    except (OSError, ValueError) as error:
        raise _no_t5_tokenizer(searched, f"it could not be fetched ({error})") from error
    # Offline without a cached copy, transformers 5 returns a tokenizer of T5's special tokens alone,
    # which would read every word as <unk>.
    if len(tokenizer) < T5_VOCAB_SIZE or (tokenizer.pad_token_id, tokenizer.eos_token_id) != (PAD_TOKEN_ID, EOS_TOKEN_ID):
        raise _no_t5_tokenizer(searched, f"the Hub client gave a tokenizer of {len(tokenizer)} tokens, not {T5_VOCAB_SIZE}")
    if cached is not None:
        tokenizer.save_pretrained(cached)
        logger.info("Saved the T5 tokenizer to %s for offline use.", cached)
    return tokenizer


def _no_t5_tokenizer(searched: str, why: str) -> UserInputError:
    return UserInputError(
        f"The T5 tokenizer is in none of {searched}, and {T5_TOKENIZER_ID} is neither in the Hugging Face "
        f"cache nor could it be downloaded ({why}). Put a T5 tokenizer (the tokenizer_2/ folder of black-forest-labs/FLUX.1-dev, or "
        f"{T5_TOKENIZER_ID}'s files) in DIR/{T5_TOKENIZER_CACHE_NAME} and pass --tokenizer_cache_dir DIR."
    )


def load(model: ModelArgs) -> FluxModels:
    """The family's `ModelLoader`: the model the training flags name. The transformer and text encoders
    are read straight into the run's weight dtype (bf16 under --mixed_precision bf16: 24 GB for FLUX.1's
    transformer instead of 48 GB in float32 first), which is what the trainer casts them to anyway; the
    AE in float32 (small; the trainer casts it, or keeps it under --no_half_vae)."""
    return load_flux(
        model.pretrained_model_name_or_path,
        dtype=WEIGHT_DTYPES.get(model.weight_precision, torch.float32),
        vae_dtype=torch.float32,
        clip_l=model.clip_l,
        t5xxl=model.t5xxl,
        ae=model.ae,
        model_config=model.model_config,
        disable_mmap=bool(model.disable_mmap_load_safetensors),
        tokenizer_cache_dir=model.tokenizer_cache_dir,
        guidance_scale=model.guidance_scale,
        t5_max_length=model.t5xxl_max_token_length,
        apply_t5_attn_mask=model.apply_t5_attn_mask,
    )
