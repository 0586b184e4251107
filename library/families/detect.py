"""Which model family a checkpoint holds, told by the checkpoint itself, for tools that take any.

The rules, written here once, are also the ones the loaders refuse another family's model by:
- FLUX.1: a diffusers folder whose model_index.json names FluxPipeline or that has `transformer/`,
  or a single file with the transformer's keys in BFL (`double_blocks.*`) or diffusers layout;
- SDXL: a diffusers folder with `text_encoder_2/` (and no FLUX transformer), or a single file with
  keys under `conditioner.embedders.` (SGM's text encoders; SD 1.x/2.x has `cond_stage_model.`);
- anything else goes to the SD loader, whose own checks name what is wrong with it.
Only key names are read: a safetensors header, or a zip-format pickle memory-mapped, so a
multi-GB checkpoint is not loaded twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from library.config.training_script import (
    FLUX_SCRIPT,
    SD_SCRIPT,
    SDXL_SCRIPT,
    TrainingScript,
)
from library.errors import UserInputError
from library.families.checkpoint_file import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    TRAINING_STATE_GLOBALS,
    read_state_dict,
)
from library.families.flux.bfl_layout import is_bfl_flux, is_diffusers_flux

SDXL_TEXT_ENCODERS_PREFIX = "conditioner.embedders."  # SDXL's SGM layout; SD 1.x/2.x use cond_stage_model.
FLUX_PIPELINE = "FluxPipeline"


def is_flux_folder(path: Path) -> bool:
    """A diffusers folder whose model_index.json names FluxPipeline, or with a transformer/ (SD's have unet/), is FLUX.1."""
    return _pipeline_class(path) == FLUX_PIPELINE or (path / "transformer" / "config.json").is_file()


def has_flux_keys(keys: Iterable[str]) -> bool:
    """A single file whose keys are a FLUX.1 transformer's, in BFL or diffusers layout, is FLUX.1."""
    keys = list(keys)
    return is_bfl_flux(keys) or is_diffusers_flux(keys)


def is_sdxl_folder(path: Path) -> bool:
    """A diffusers folder with a second text encoder is SDXL, unless it is FLUX.1's (whose second is T5)."""
    return (path / "text_encoder_2" / "config.json").is_file() and not is_flux_folder(path)


def has_sdxl_keys(keys: Iterable[str]) -> bool:
    """A single file whose keys hold SGM's text encoders is SDXL."""
    return any(key.startswith(SDXL_TEXT_ENCODERS_PREFIX) for key in keys)


def flux_refused(subject: str, family_name: str) -> UserInputError:
    """The error for a FLUX.1 model given to another family's loader: it names the script that trains FLUX.1.

    `subject` names the model ("The checkpoint x.safetensors"), `family_name` the loader's family.
    """
    return UserInputError(
        f"{subject} is FLUX.1, not {family_name}; train a LoRA for it with {FLUX_SCRIPT.name} "
        "(with --clip_l, --t5xxl and --ae for a single transformer file)."
    )


def detect_family(path: str | os.PathLike) -> TrainingScript:
    """`FLUX_SCRIPT`, `SDXL_SCRIPT` or (anything else) `SD_SCRIPT` for the checkpoint (folder or file) at `path`."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(
            f"The model path {path} does not exist; give a diffusers folder or a .safetensors/.ckpt file."
        )
    if path.is_dir():
        is_flux, is_sdxl = is_flux_folder(path), is_sdxl_folder(path)
    else:
        keys = list(checkpoint_keys(path))
        is_flux, is_sdxl = has_flux_keys(keys), has_sdxl_keys(keys)
    return FLUX_SCRIPT if is_flux else SDXL_SCRIPT if is_sdxl else SD_SCRIPT


def _pipeline_class(path: Path) -> str | None:
    """The `_class_name` in a diffusers folder's model_index.json; None without a readable one."""
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_keys(path: Path) -> Iterable[str]:
    """The tensor names of a checkpoint file, reading as little of it as its format allows."""
    suffix = path.suffix.lower()
    names = None
    if suffix in SAFETENSORS_SUFFIXES:
        names = _safetensors_names(path)
    elif suffix in PICKLE_SUFFIXES:
        names = _mapped_pickle_names(path)
    # Not readable so (an old-format pickle cannot be memory-mapped; a damaged file): read_state_dict reads
    # the file whole, or names what is wrong with it in a sentence.
    return names if names is not None else read_state_dict(path).keys()


def _safetensors_names(path: Path) -> list[str] | None:
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            return list(file.keys())
    except (SafetensorError, OSError):
        return None


def _mapped_pickle_names(path: Path) -> list[str] | None:
    """The names of a zip-format pickle, its tensors memory-mapped (their bytes stay on disk); None if it is not one."""
    try:
        with torch.serialization.safe_globals(TRAINING_STATE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  a refused, damaged or old-format pickle fails in many ways
        return None
    if not isinstance(loaded, dict):
        return None
    state_dict = loaded.get("state_dict", loaded)
    return [str(key) for key in (state_dict if isinstance(state_dict, dict) else loaded)]
