"""Build a U-Net and a VAE from a single-file checkpoint in the original LDM layout, checked.

Shared by the families whose checkpoints use it (SD 1.x/2.x; SDXL's SGM layout is the same for the
U-Net and the VAE). The conversion itself is diffusers' own (`from_single_file`), run offline against
an architecture config folder. What is ours is the checking around it: shapes must match the config,
and no weight may be left unloaded. diffusers builds the models on the meta device and fills in what
the file provides; a weight the file lacks stays there, which is how it is found here.
"""

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    SingleFileComponentError,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextModel

from library.errors import UserInputError

VAE_PREFIX = "first_stage_model."

Model = TypeVar("Model", UNet2DConditionModel, AutoencoderKL)
Converter = Callable[[dict, dict], dict]

_SUBFOLDERS = {UNet2DConditionModel: "unet", AutoencoderKL: "vae"}
_COMPONENT_NAMES = {UNet2DConditionModel: "U-Net", AutoencoderKL: "VAE", CLIPTextModel: "text encoder"}
_SHAPE_MISMATCH = re.compile(
    r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)"
)


def check_has_vae(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise unless the checkpoint has VAE weights: pruned "no-VAE" files are used with --vae."""
    if not any(key.startswith(VAE_PREFIX) for key in state_dict):
        raise UserInputError(
            f"The checkpoint {path} has no VAE weights (no keys under {VAE_PREFIX!r}), as pruned \"no-VAE\" "
            "checkpoints do; pass --vae with the VAE to use (a .safetensors/.ckpt file or a diffusers VAE folder)."
        )


def load_unet(state_dict: dict, config_dir: Path, path: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """The U-Net of an LDM checkpoint, converted by diffusers against `config_dir/unet`."""
    return _from_single_file(UNet2DConditionModel, convert_ldm_unet_checkpoint, state_dict, config_dir, path, dtype)


def load_vae(state_dict: dict, config_dir: Path, path: Path, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE of a checkpoint: LDM keys under `first_stage_model.` or bare (VAE files), or diffusers keys."""
    return _from_single_file(AutoencoderKL, convert_ldm_vae_checkpoint, state_dict, config_dir, path, dtype)


def _from_single_file(
    model_class: type[Model], convert: Converter, state_dict: dict, config_dir: Path, path: Path, dtype: torch.dtype
) -> Model:
    """A diffusers model from a checkpoint via `from_single_file`, offline, against `config_dir`.

    diffusers fails moving the model off the meta device when the file lacked a weight, without
    saying which; the same conversion is then run again to name the missing weights.
    """
    subfolder = _SUBFOLDERS[model_class]
    try:
        with component_errors(model_class, path, config_dir):
            return model_class.from_single_file(
                state_dict,
                config=str(config_dir),
                subfolder=subfolder,
                local_files_only=True,
                torch_dtype=_cast_to(dtype),
            )
    except NotImplementedError as error:
        if "meta tensor" not in str(error):
            raise
        config = model_class.load_config(config_dir, subfolder=subfolder)
        with torch.device("meta"):
            expected = model_class.from_config(config).state_dict().keys()
        missing = sorted(set(expected) - set(convert(state_dict, config)))
        raise missing_weights_error(model_class, path, missing) from error


def _cast_to(dtype: torch.dtype) -> torch.dtype | None:
    """The torch_dtype for from_single_file: None for float32, which the models are built in anyway.

    diffusers 0.42 logs a misleading "should be kept in float32" warning on every cast it makes.
    """
    return None if dtype == torch.float32 else dtype


def missing_weights_error(model_class: type, path: Path, missing: list[str]) -> UserInputError:
    """The error for a checkpoint that lacks weights the architecture config asks for."""
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return UserInputError(
        f"The {_COMPONENT_NAMES[model_class]} in {path} lacks {len(missing)} weight(s) the architecture needs "
        f"({shown}); the file is incomplete or of another architecture: give a model_config folder that matches it."
    )


@contextlib.contextmanager
def component_errors(model_class: type, path: Path, config_dir: Path) -> Iterator[None]:
    """Turn diffusers' errors while building one component into UserInputErrors naming the file."""
    component = _COMPONENT_NAMES[model_class]
    try:
        yield
    except SingleFileComponentError as error:
        raise UserInputError(
            f"The checkpoint {path} has no {component} weights; give a full checkpoint of the model (U-Net, VAE and "
            "text encoders), or the VAE with --vae."
        ) from error
    except ValueError as error:
        if "expected shape" not in str(error):
            raise
        raise UserInputError(
            f"The {component} in {path} does not fit the architecture config {config_dir}: "
            f"{_shape_detail(str(error))}. The file is of another architecture: give a model_config folder "
            "(laid out like the folders in configs/models/) that matches it."
        ) from error


def _shape_detail(message: str) -> str:
    """diffusers' sentence about the first parameter whose shape differs, in our words when it parses."""
    match = _SHAPE_MISMATCH.search(message)
    return f"{match[1]} is {match[3]} in the file but {match[2]} in the config" if match else message
