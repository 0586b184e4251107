"""Read the tensors of a single-file checkpoint (`.safetensors`, `.ckpt`, `.pt`) without running its code.

A `.ckpt` is a Python pickle, and a pickle can name any function to call while it is read. It is
therefore read only with `torch.load(..., weights_only=True)`, which accepts tensors and plain
containers and refuses everything else before calling it. A file that needs more is refused with
the names of the code it asks for; converting it is left to the user, who can judge whether it is
trustworthy.
"""

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from library.errors import UserInputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """All tensors of the file at `path`, keyed by name, on the CPU.

    `what` names the file's role in error messages ("checkpoint", "--vae file"). A pickled
    checkpoint's top-level "state_dict" is unwrapped, and non-tensor entries (step counters) dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state_dict = _read_safetensors(path, what)
    elif suffix in PICKLE_SUFFIXES:
        state_dict = _read_pickle(path, what)
    else:
        known = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise UserInputError(
            f"The {what} {path} has the extension {suffix or '(none)'!r}, which is not a checkpoint format "
            f"read here; give a diffusers folder or a file ending in {known}."
        )
    return {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a damaged file into a sentence."""
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserInputError(
            f"The {what} {path} could not be read as safetensors ({error}); check that the download is complete."
        ) from error


def _read_pickle(path: Path, what: str) -> dict:
    """Load a pickled checkpoint with `weights_only=True`, refusing any file that would run code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(
            f"The {what} {path} was refused and not executed: only pickles of plain tensors are read "
            f"(torch.load with weights_only=True), and this one asks for {_unsafe_globals(path)}. If you trust "
            "the file, convert it once to .safetensors (torch.load with weights_only=False, then "
            "safetensors.torch.save_file on its state dict) and pass that file instead."
        ) from error
    except Exception as error:  # a damaged pickle fails in many ways (KeyError, EOFError, RuntimeError...)
        raise UserInputError(
            f"The {what} {path} could not be read as a PyTorch checkpoint ({type(error).__name__}: {error}); "
            "check that the file is complete."
        ) from error
    if not isinstance(loaded, dict):
        raise UserInputError(
            f"The {what} {path} holds a {type(loaded).__name__}, not a dict of tensors; save a state dict instead."
        )
    state_dict = loaded.get("state_dict", loaded)
    return state_dict if isinstance(state_dict, dict) else loaded


def _unsafe_globals(path: Path) -> str:
    """The code objects a pickle names, listed by torch without unpickling it, for the error message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing only decorates the message; the refusal stands either way
        names = []
    return ", ".join(names) if names else "content the safe loader does not support"
