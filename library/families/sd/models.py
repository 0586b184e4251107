"""Load Stable Diffusion 1.x/2.x the way users have it: a diffusers folder or one checkpoint file.

`load_stable_diffusion` is what `--pretrained_model_name_or_path`, `--v2`, `--v_parameterization`
and `--vae` resolve to. Single files are converted by diffusers against an architecture config
from `configs/models/` (no hub access: every config the conversion needs is in this repository).
As in sd-scripts, the training noise schedule follows the flags, not the checkpoint.
"""

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from library.families.sd import folder as sd_folder, single_file as sd_single_file
from library.families import ldm_single_file
from library.families.checkpoint_file import read_state_dict
from library.families.detect import (
    SDXL_TEXT_ENCODERS_PREFIX,
    flux_refused,
    has_flux_keys,
    has_sdxl_keys,
    is_flux_folder,
    is_sdxl_folder,
)
from library.families.model_parts import MODEL_CONFIGS_DIR, build_noise_scheduler, load_replacement_vae
from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer
from library.config.train_config import ModelArgs
from library.errors import UserInputError
from library.families.family import freeze_models
from library.families.sd.family import StableDiffusionModels

logger = logging.getLogger(__name__)



def architecture_dir(v2: bool, model_config: str | os.PathLike | None = None) -> Path:
    """The architecture config folder: `model_config` when given, else configs/models/sd_v2 or sd_v1."""
    if model_config is None:
        return MODEL_CONFIGS_DIR / ("sd_v2" if v2 else "sd_v1")
    folder = Path(model_config)
    missing = [name for name in ("unet", "vae", "text_encoder") if not (folder / name / "config.json").is_file()]
    if missing:
        raise UserInputError(
            f"The model_config folder {folder} lacks {', '.join(name + '/config.json' for name in missing)}; "
            f"give a folder laid out like {MODEL_CONFIGS_DIR / 'sd_v1'}."
        )
    return folder


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    vae: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionModels:
    """Load an SD1/SD2 diffusers folder or single-file checkpoint, frozen, in eval mode, in `dtype`.

    `v2` must be given for SD2 models (as sd-scripts' --v2); `vae` replaces the model's VAE with a
    diffusers folder or a single file, and the model's own VAE is then not loaded at all (pruned
    "no-VAE" checkpoints lack it); `model_config` names the architecture config folder that
    single files are converted against and whose scheduler config gives the noise schedule
    (default: configs/models/sd_v1, or sd_v2 with `v2`). A diffusers folder brings its own configs.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(
            f"The model path {path} does not exist; give a diffusers folder or a .safetensors/.ckpt file."
        )
    if v_parameterization and not v2:
        logger.warning("--v_parameterization without --v2: SD1 models are not trained for v-prediction.")
    config_dir = architecture_dir(v2, model_config)
    own_vae = vae is None
    if path.is_dir():
        models = _load_folder(path, v2, v_parameterization, dtype, own_vae)
        vae_config_dir = path
    else:
        models = _load_single_file(path, v2, config_dir, dtype, own_vae)
        vae_config_dir = config_dir
    unet, text_encoder, tokenizer, model_vae = models
    if vae is not None:
        model_vae = load_replacement_vae(vae, vae_config_dir, dtype)
    result = StableDiffusionModels(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        vae=model_vae,
        noise_scheduler=build_noise_scheduler(config_dir, v_parameterization),
        v2=v2,
        v_parameterization=v_parameterization,
    )
    freeze_models(result, dtype)
    return result


# The VAE is None when --vae replaces it.
Components = tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, AutoencoderKL | None]


def _load_folder(path: Path, v2: bool, v_parameterization: bool, dtype: torch.dtype, own_vae: bool) -> Components:
    """(unet, text_encoder, tokenizer, vae) of a diffusers folder; its vae/ weights only when `own_vae`."""
    if is_flux_folder(path):
        raise flux_refused(f"The model folder {path}", "Stable Diffusion 1.x/2.x")
    if is_sdxl_folder(path):
        raise _sdxl_refused(f"The model folder {path} is SDXL (it has text_encoder_2/)")
    sd_folder.check_diffusers_folder(path)
    _check_v2_flag(sd_folder.is_open_clip_folder(path), v2, path)
    _warn_on_prediction_type(path, v_parameterization)
    return (
        sd_folder.load_unet(path, dtype),
        sd_folder.load_text_encoder(path, dtype),
        sd_folder.load_tokenizer(path, v2),
        sd_folder.load_vae(path, dtype) if own_vae else None,
    )


def _load_single_file(path: Path, v2: bool, config_dir: Path, dtype: torch.dtype, own_vae: bool) -> Components:
    """(unet, text_encoder, tokenizer, vae) of an LDM-layout checkpoint file; its VAE only when `own_vae`.

    Without it the file's VAE keys are left unread, so a checkpoint without them loads.
    """
    skipped = () if own_vae else (ldm_single_file.VAE_PREFIX,)
    state_dict = read_state_dict(path, skip_prefixes=skipped)
    if has_flux_keys(state_dict):
        raise flux_refused(f"The checkpoint {path}", "Stable Diffusion 1.x/2.x")
    if has_sdxl_keys(state_dict):
        raise _sdxl_refused(f"The checkpoint {path} is SDXL (text encoders under {SDXL_TEXT_ENCODERS_PREFIX!r})")
    _check_v2_flag(sd_single_file.is_open_clip_checkpoint(state_dict, path), v2, path)
    if own_vae:
        ldm_single_file.check_has_vae(state_dict, path)
    state_dict = sd_single_file.with_text_model_level(state_dict)
    return (
        ldm_single_file.load_unet(state_dict, config_dir, path, dtype),
        sd_single_file.load_text_encoder(state_dict, config_dir, path, dtype),
        build_clip_tokenizer(pad_token=SD2_PAD_TOKEN if v2 else EOS_TOKEN),
        ldm_single_file.load_vae(state_dict, config_dir, path, dtype) if own_vae else None,
    )


def _sdxl_refused(what_it_is: str) -> UserInputError:
    """The error for an SDXL model given to the SD 1.x/2.x loader: it names the script that trains SDXL."""
    return UserInputError(
        f"{what_it_is}, not Stable Diffusion 1.x/2.x; train a LoRA for it with sdxl_train_network_cat.py."
    )


def _check_v2_flag(is_open_clip: bool, v2: bool, path: Path) -> None:
    """The --v2 flag must match the text encoder: it decides the tokenizer's padding and the metadata."""
    if is_open_clip and not v2:
        raise UserInputError(
            f"The model {path} is Stable Diffusion 2.x (OpenCLIP text encoder), but --v2 was not given; "
            "pass --v2 (and --v_parameterization for 768-px v-prediction models)."
        )
    if v2 and not is_open_clip:
        raise UserInputError(
            f"The model {path} is Stable Diffusion 1.x (CLIP ViT-L text encoder), but --v2 was given; remove --v2."
        )


def _warn_on_prediction_type(path: Path, v_parameterization: bool) -> None:
    """A folder whose scheduler predicts something else than the flag says hints at a forgotten flag.

    Only a warning: like sd-scripts, training follows --v_parameterization, not the folder.
    """
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return
    folder_type = json.loads(config_file.read_text()).get("prediction_type", "epsilon")
    flag_type = "v_prediction" if v_parameterization else "epsilon"
    if folder_type != flag_type:
        logger.warning(
            "The scheduler in %s predicts %s but training will predict %s; check --v_parameterization.",
            path,
            folder_type,
            flag_type,
        )


def load(model: ModelArgs) -> StableDiffusionModels:
    """The family's `ModelLoader`: the model the training flags name, in float32 (the trainer casts)."""
    return load_stable_diffusion(
        model.pretrained_model_name_or_path, v2=model.v2, v_parameterization=model.v_parameterization,
        vae=model.vae, model_config=model.model_config,
    )
