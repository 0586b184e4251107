"""Read and write LoRA files in the kohya format that A1111/Forge, ComfyUI and diffusers load.

A file holds, per adapted layer `<name>`: `<name>.lora_down.weight`, `<name>.lora_up.weight` and
a 0-dim `<name>.alpha`; nothing else (diffusers rejects any other tensor). Metadata values are
strings. Writes are atomic: a temporary file in the same folder, then a rename, so a crash never
leaves a truncated LoRA where a good one was.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserInputError
from .targets import LORA_PREFIXES

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


@dataclass(frozen=True)
class LoRAFileEntry:
    """One adapted layer described by a file: its rank, alpha (None when absent) and down shape."""

    lora_name: str
    rank: int
    alpha: float | None
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]

    @property
    def is_conv_kxk(self) -> bool:
        return len(self.down_shape) == 4 and tuple(self.down_shape[2:]) != (1, 1)


def save_lora_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Write `state_dict` (already in the kohya layout) with `metadata`, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserInputError(
            f"Cannot save LoRA as {str(path)!r}: only .safetensors is written (--save_model_as safetensors)."
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a kohya LoRA file: (tensors, metadata). Refuses anything that is not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"LoRA file {str(path)!r} does not exist; check the path.")
    if path.suffix != ".safetensors":
        raise UserInputError(
            f"LoRA file {str(path)!r} is not a .safetensors file; only safetensors LoRAs are read "
            "(pickled .pt/.ckpt files can run code). Convert it to safetensors first."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserInputError(f"LoRA file {str(path)!r} is not a readable safetensors file ({err}).") from None
    return tensors, metadata


def describe_lora_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, LoRAFileEntry]:
    """Check the kohya layout of `state_dict` and describe each adapted layer.

    Every key must be `<lora_prefix>_...` with one of the three suffixes; every `lora_down` needs
    its `lora_up` and their ranks must agree. `source` (a file name) goes into the errors.
    """
    names: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, suffix = _split_key(key, source)
        names.setdefault(name, {})[suffix] = tensor
    return {name: _entry(name, parts, source) for name, parts in names.items()}


def _split_key(key: str, source: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        if key.endswith(suffix) and key.startswith(tuple(p + "_" for p in LORA_PREFIXES)):
            return key[: -len(suffix)], suffix
    raise UserInputError(
        f"{source}: key {key!r} is not a kohya LoRA tensor (expected lora_unet_*/lora_te*_* names ending in "
        f"{', '.join(SUFFIXES)}). Is it a LyCORIS or diffusers-format file?"
    )


def _entry(name: str, parts: dict[str, torch.Tensor], source: str) -> LoRAFileEntry:
    down, up = parts.get(".lora_down.weight"), parts.get(".lora_up.weight")
    if down is None or up is None:
        missing = "lora_up" if up is None else "lora_down"
        raise UserInputError(f"{source}: {name!r} has no {name}.{missing}.weight; the file is incomplete or damaged.")
    if down.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
        raise UserInputError(
            f"{source}: {name}.lora_up.weight {tuple(up.shape)} does not fit {name}.lora_down.weight "
            f"{tuple(down.shape)}; the file is damaged."
        )
    alpha = parts.get(".alpha")
    return LoRAFileEntry(
        lora_name=name,
        rank=int(down.shape[0]),
        alpha=float(alpha) if alpha is not None else None,
        down_shape=tuple(down.shape),
        up_shape=tuple(up.shape),
    )
