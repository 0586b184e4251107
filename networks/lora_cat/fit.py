"""Does a layer of a kohya LoRA file fit a layer of the model? The shape rule, written once.

A rank-r LoRA on `Linear(in, out)` stores `lora_down` (r, in) and `lora_up` (out, r); on
`Conv2d(in, out, k)` `lora_down` (r, in, *k) and `lora_up` (out, r, 1, 1), as `LoRAModule` builds
them. Two callers check a file against a model with it, each wording its own errors: the network,
when it loads a file (`network.py`), and `evaluate_kps.py` before it scores a LoRA
(`library.evaluation.lora_fit`).
"""

from __future__ import annotations

from torch import nn

from .file_format import LoRAFileEntry

Shape = tuple[int, ...]


def lora_shapes(layer: nn.Module, rank: int) -> tuple[Shape, Shape]:
    """(lora_down, lora_up) weight shapes of a rank-`rank` LoRA on `layer` (a Linear or Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(layer).__name__}")


def fits(entry: LoRAFileEntry, layer: nn.Module) -> bool:
    """Whether the file's layer, at its own rank, has the shapes a LoRA on `layer` has."""
    return (entry.down_shape, entry.up_shape) == lora_shapes(layer, entry.rank)
