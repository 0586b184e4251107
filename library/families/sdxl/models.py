"""Load SDXL the way users have it: a diffusers folder or one SGM-layout checkpoint file.

`load_sdxl` is what `--pretrained_model_name_or_path`, `--v_parameterization`, `--vae` and
`--disable_mmap_load_safetensors` of `sdxl_train_network_cat.py` resolve to. Single files are
converted by diffusers against an architecture config (default: configs/models/sdxl_base, the
configs of stabilityai/stable-diffusion-xl-base-1.0), with no hub access. As in sd-scripts, the
training noise schedule is DDPM from that config and predicts what `--v_parameterization` says
(NoobAI's v-prediction models need the flag), whatever the checkpoint's own scheduler says.
An SD 1.x/2.x or FLUX.1 model is refused with the script that trains it.
"""

import os
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.config.train_config import ModelArgs
from library.errors import UserInputError
from library.families.checkpoint_file import read_state_dict
from library.families.clip_tokenizer import EOS_TOKEN, SD2_PAD_TOKEN, build_clip_tokenizer
from library.families.detect import flux_refused, has_flux_keys, is_flux_folder
from library.families.family import freeze_models
from library.families import ldm_single_file
from library.families.model_parts import MODEL_CONFIGS_DIR, build_noise_scheduler, load_replacement_vae
from library.families.sdxl import folder as sdxl_folder, single_file as sdxl_single_file
from library.families.sdxl.family import SDXLModels

SDXL_BASE_CONFIG = MODEL_CONFIGS_DIR / "sdxl_base"


class Components(NamedTuple):
    """The loaded parts of a model file or folder; `vae` is None when --vae replaces it."""

    unet: UNet2DConditionModel
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    vae: AutoencoderKL | None


def architecture_dir(model_config: str | os.PathLike | None = None) -> Path:
    """The architecture config folder: `model_config` when given, else configs/models/sdxl_base."""
    if model_config is None:
        return SDXL_BASE_CONFIG
    folder = Path(model_config)
    missing = [name for name in sdxl_folder.REQUIRED_SUBFOLDERS if not (folder / name / "config.json").is_file()]
    if missing:
        raise UserInputError(
            f"The model_config folder {folder} lacks {', '.join(name + '/config.json' for name in missing)}; "
            f"give a folder laid out like {SDXL_BASE_CONFIG}."
        )
    return folder


def load_sdxl(
    path: str | os.PathLike,
    *,
    v_parameterization: bool = False,
    vae: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    disable_mmap: bool = False,
) -> SDXLModels:
    """Load an SDXL diffusers folder or single-file checkpoint, frozen, in eval mode, in `dtype`.

    `vae` replaces the model's VAE with a diffusers folder or a single file, and the model's own VAE
    is then not loaded at all (pruned "no-VAE" checkpoints lack it); `model_config` names the
    architecture config folder that single files are converted against and whose scheduler config
    gives the noise schedule; `disable_mmap` reads a .safetensors checkpoint into memory in one go.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(
            f"The model path {path} does not exist; give an SDXL diffusers folder or a .safetensors/.ckpt file."
        )
    own_vae = vae is None
    if path.is_dir():
        components = _load_folder(path, dtype, own_vae)
        config_dir = architecture_dir(model_config)
        vae_config_dir = path
    else:  # the file's family is checked before the architecture folder: a wrong model is the root cause
        components, config_dir = _load_single_file(path, model_config, dtype, own_vae, disable_mmap)
        vae_config_dir = config_dir
    if vae is not None:
        components = components._replace(vae=load_replacement_vae(vae, vae_config_dir, dtype))
    models = SDXLModels(
        **components._asdict(),
        noise_scheduler=build_noise_scheduler(config_dir, v_parameterization),
        v_parameterization=v_parameterization,
    )
    freeze_models(models, dtype)
    return models


def _load_folder(path: Path, dtype: torch.dtype, own_vae: bool) -> Components:
    """The parts of a diffusers SDXL folder; its vae/ weights only when `own_vae`."""
    if is_flux_folder(path):  # FLUX's folders have text_encoder_2/ too
        raise flux_refused(f"The model folder {path}", "SDXL")
    sdxl_folder.check_sdxl_folder(path)
    text_encoder_1, text_encoder_2 = sdxl_folder.load_text_encoders(path, dtype)
    tokenizer_1, tokenizer_2 = sdxl_folder.load_tokenizers(path)
    return Components(
        unet=sdxl_folder.load_unet(path, dtype),
        text_encoder_1=text_encoder_1,
        text_encoder_2=text_encoder_2,
        tokenizer_1=tokenizer_1,
        tokenizer_2=tokenizer_2,
        vae=sdxl_folder.load_vae(path, dtype) if own_vae else None,
    )


def _load_single_file(
    path: Path, model_config: str | os.PathLike | None, dtype: torch.dtype, own_vae: bool, disable_mmap: bool
) -> tuple[Components, Path]:
    """The parts of an SGM-layout checkpoint file (its VAE only when `own_vae`, else its VAE keys stay
    unread), and the architecture folder they were converted against."""
    skipped = () if own_vae else (sdxl_single_file.VAE_PREFIX,)
    state_dict = read_state_dict(path, skip_prefixes=skipped, disable_mmap=disable_mmap)
    if has_flux_keys(state_dict):
        raise flux_refused(f"The checkpoint {path}", "SDXL")
    sdxl_single_file.check_sdxl_checkpoint(state_dict, path)
    if own_vae:
        ldm_single_file.check_has_vae(state_dict, path)
    config_dir = architecture_dir(model_config)
    return Components(
        unet=ldm_single_file.load_unet(state_dict, config_dir, path, dtype),
        text_encoder_1=sdxl_single_file.load_text_encoder(CLIPTextModel, state_dict, config_dir, path, dtype),
        text_encoder_2=sdxl_single_file.load_text_encoder(
            CLIPTextModelWithProjection, state_dict, config_dir, path, dtype
        ),
        tokenizer_1=build_clip_tokenizer(pad_token=EOS_TOKEN),
        tokenizer_2=build_clip_tokenizer(pad_token=SD2_PAD_TOKEN),
        vae=ldm_single_file.load_vae(state_dict, config_dir, path, dtype) if own_vae else None,
    ), config_dir


def load(model: ModelArgs) -> SDXLModels:
    """The family's `ModelLoader`: the model the training flags name, in float32 (the trainer casts)."""
    return load_sdxl(
        model.pretrained_model_name_or_path,
        v_parameterization=model.v_parameterization,
        vae=model.vae,
        model_config=model.model_config,
        disable_mmap=model.disable_mmap_load_safetensors,
    )
