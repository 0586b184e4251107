"""Load one part of a diffusers folder (a diffusers or transformers model), refusing silent random weights.

Shared by the families that load diffusers folders. Both libraries only log the weights they had to
initialise at random; their loading report names them, and it is checked here.
"""

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from library.errors import UserInputError

Model = TypeVar("Model")


def load_pretrained(
    model_class: type[Model], path: Path, subfolder: str | None, component: str, dtype: torch.dtype
) -> Model:
    """A diffusers or transformers model from `path/subfolder`, refusing any weight the files lack.

    Both libraries only log the weights they had to initialise at random; their loading report
    names them, and it is checked here.
    """
    folder = path / subfolder if subfolder else path
    with folder_errors(component, folder):
        model, report = model_class.from_pretrained(
            path, subfolder=subfolder, local_files_only=True, torch_dtype=dtype, output_loading_info=True
        )
    refuse_missing_weights(report["missing_keys"], component, folder)
    return model


# What a family's folder error tells the user to give instead, when its folder lacks a part's config.
SAVED_OR_SINGLE_FILE = "Give a folder saved by diffusers (save_pretrained) or a single .safetensors/.ckpt checkpoint."


def require_configs(path: Path, subfolders: Iterable[str], what: str, remedy: str = SAVED_OR_SINGLE_FILE) -> None:
    """Raise, naming every missing `<subfolder>/config.json`, unless `path` has them all; `what` is what
    the folder should be ("a diffusers SDXL folder"), `remedy` what to give instead."""
    missing = [name for name in subfolders if not (path / name / "config.json").is_file()]
    if missing:
        raise UserInputError(
            f"The model folder {path} is not {what}: it lacks {', '.join(name + '/config.json' for name in missing)}. "
            f"{remedy}"
        )


def refuse_missing_weights(missing_keys: Iterable[str], component: str, folder: Path) -> None:
    """Raise when the loader reports weights it had to leave at their random init."""
    missing = sorted(missing_keys)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserInputError(
            f"The {component} in {folder} lacks {len(missing)} weight(s) ({shown}), which would be left at "
            "random values; the folder is incomplete or does not match its config.json: re-save or re-download it."
        )


@contextlib.contextmanager
def folder_errors(component: str, folder: Path) -> Iterator[None]:
    """Reword the loader's error for a broken component folder into a UserInputError naming it."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as error:
        raise UserInputError(
            f"The {component} in {folder} could not be loaded ({error}); re-save or re-download the folder."
        ) from error
