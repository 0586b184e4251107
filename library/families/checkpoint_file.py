"""Read the tensors of a single-file checkpoint (`.safetensors`, `.ckpt`, `.pt`) without running its code.

A `.ckpt` is a Python pickle, and a pickle can name any function to call while it is read. It is
therefore read only with `torch.load(..., weights_only=True)`, which accepts tensors and plain
containers and refuses everything else before calling it. Beyond those, only the few globals that
2022-era training checkpoints carry next to their weights are allowed (`TRAINING_STATE_GLOBALS`). A
file that needs more is refused with the names of the code it asks for; converting it is left to
the user, who can judge whether it is trustworthy.

diffusers has a reader of its own (`diffusers.models.model_loading_utils.load_state_dict`, which
`load_single_file_checkpoint` calls); it keeps weights_only=True, but turns every failure, a refused
pickle as much as a truncated download, into the same "Unable to load weights" OSError, after reading
the whole file once more as text to look for a git-lfs pointer. This reader is kept so that the user
learns which of these happened, what the file asked for, and what to do.
"""

import pickle
from pathlib import Path

import numpy
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from library.errors import UserInputError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")


class LightningStandIn:
    """What a pickled PyTorch Lightning object is read as: the state it saved, kept as data.

    Lightning before 1.5 keyed a checkpoint's "callbacks" by the callback class itself, so the
    class is named in the pickle although only its saved state (best score, paths) is stored. The
    weights never depend on it, and nothing of Lightning is imported or run to read it.
    """

    def __setstate__(self, state: object) -> None:
        # Kept under one attribute, never spread into attributes: the file cannot give it behaviour.
        self.saved_state = state


# The Lightning classes found pickled in Stable Diffusion training checkpoints, read as stand-ins.
LIGHTNING_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)

# numpy rebuilds a scalar (a `global_step` of numpy.int64) from its dtype and raw bytes with this
# function; numpy 1.x pickles name it numpy.core.multiarray.scalar, numpy 2.x numpy._core.multiarray.scalar.
_NUMPY_SCALAR = numpy.int64(0).__reduce__()[0]
# The dtypes of numeric scalars: the unpickler sets a dtype's state only when its type is allowed.
_NUMPY_DTYPE_CLASSES = [
    type(numpy.dtype(name))
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    + ("float16", "float32", "float64")
]

TRAINING_STATE_GLOBALS = [
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    (_NUMPY_SCALAR, "numpy._core.multiarray.scalar"),
    numpy.dtype,
    *_NUMPY_DTYPE_CLASSES,
    *((LightningStandIn, name) for name in LIGHTNING_CLASSES),
]


def read_state_dict(
    path: str | Path, what: str = "checkpoint", skip_prefixes: tuple[str, ...] = (), disable_mmap: bool = False
) -> dict[str, torch.Tensor]:
    """All tensors of the file at `path`, keyed by name, on the CPU.

    `what` names the file's role in error messages ("checkpoint", "--vae file"). A pickled
    checkpoint's top-level "state_dict" is unwrapped, and non-tensor entries (step counters) dropped.
    Keys starting with one of `skip_prefixes` are left out; a safetensors file's bytes for them are not read,
    unless `disable_mmap` (sd-scripts' --disable_mmap_load_safetensors) reads the whole file into memory
    in one go instead of memory-mapping it (sd-scripts offers the flag to speed up loading under WSL).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES and disable_mmap:
        state_dict = _read_safetensors_bytes(path, what)
    elif suffix in SAFETENSORS_SUFFIXES:
        state_dict = _read_safetensors(path, what, skip_prefixes)
    elif suffix in PICKLE_SUFFIXES:
        state_dict = _read_pickle(path, what)
    else:
        known = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise UserInputError(
            f"The {what} {path} has the extension {suffix or '(none)'!r}, which is not a checkpoint format "
            f"read here; give a diffusers folder or a file ending in {known}."
        )
    return {
        key: value
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and not str(key).startswith(skip_prefixes)
    }


def _read_safetensors(path: Path, what: str, skip_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Load a safetensors file but its skipped keys, turning a damaged file into a sentence."""
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            return {key: file.get_tensor(key) for key in file.keys() if not key.startswith(skip_prefixes)}
    except (SafetensorError, OSError) as error:
        raise UserInputError(
            f"The {what} {path} could not be read as safetensors ({error}); check that the download is complete."
        ) from error


def _read_safetensors_bytes(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file from its bytes, read in one go: no memory map stays open on the file."""
    try:
        return safetensors.torch.load(path.read_bytes())
    except (SafetensorError, OSError) as error:
        raise UserInputError(
            f"The {what} {path} could not be read as safetensors ({error}); check that the download is complete."
        ) from error


def _read_pickle(path: Path, what: str) -> dict:
    """Load a pickled checkpoint with `weights_only=True`, refusing any file that would run code."""
    with torch.serialization.safe_globals(TRAINING_STATE_GLOBALS):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UserInputError(
                f"The {what} {path} was refused and not executed: only pickles of plain tensors are read "
                f"(torch.load with weights_only=True), and this one asks for {_unsafe_globals(path)}. If you "
                "trust the file, convert it once to .safetensors (torch.load with weights_only=False, then "
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
    """The code objects a pickle names beyond the allowed ones, listed by torch without unpickling it.

    Called inside the `safe_globals` context, so that the allowed training-state globals are not listed.
    """
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the listing only decorates the message; the refusal stands either way
        names = []
    return ", ".join(names) if names else "content the safe loader does not support"
