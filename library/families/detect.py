"""Which model family a checkpoint holds, told by the checkpoint itself, for tools that take either.

The rule, written here once, is also the one the Stable Diffusion loader refuses SDXL by: a
diffusers folder with `text_encoder_2/`, or a single file with keys under `conditioner.embedders.`
(SGM's text encoders; SD 1.x/2.x has `cond_stage_model.`), is SDXL; anything else goes to the SD
loader, whose own checks name what is wrong with it. Only key names are read: a safetensors
header, or a zip-format pickle memory-mapped, so a multi-GB checkpoint is not loaded twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from library.config.training_script import SD_SCRIPT, SDXL_SCRIPT, TrainingScript
from library.errors import UserInputError
from library.families.checkpoint_file import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    TRAINING_STATE_GLOBALS,
    read_state_dict,
)
SDXL_TEXT_ENCODERS_PREFIX = "conditioner.embedders."  # SDXL's SGM layout; SD 1.x/2.x use cond_stage_model.


def is_sdxl_folder(path: Path) -> bool:
    """A diffusers folder with a second text encoder is SDXL."""
    return (path / "text_encoder_2" / "config.json").is_file()


def has_sdxl_keys(keys: Iterable[str]) -> bool:
    """A single file whose keys hold SGM's text encoders is SDXL."""
    return any(key.startswith(SDXL_TEXT_ENCODERS_PREFIX) for key in keys)


def detect_family(path: str | os.PathLike) -> TrainingScript:
    """`SDXL_SCRIPT` for an SDXL checkpoint (folder or file), else `SD_SCRIPT`: the family's flag rules."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(
            f"The model path {path} does not exist; give a diffusers folder or a .safetensors/.ckpt file."
        )
    is_sdxl = is_sdxl_folder(path) if path.is_dir() else has_sdxl_keys(_key_names(path))
    return SDXL_SCRIPT if is_sdxl else SD_SCRIPT


def _key_names(path: Path) -> Iterable[str]:
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
