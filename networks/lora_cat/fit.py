"""Does a layer of a kohya LoRA file fit a layer of the model? The shape rule, written once.

A rank-r LoRA on `Linear(in, out)` stores `lora_down` (r, in) and `lora_up` (out, r); on
`Conv2d(in, out, k)` `lora_down` (r, in, *k) and `lora_up` (out, r, 1, 1), as `LoRAModule` builds
them. Two callers check a file against a model with it, each wording its own errors: the network,
when it loads a file (`network.py`), and `evaluate_kps.py` before it scores a LoRA
(`library.evaluation.lora_fit`).

Before shapes, the model family: `file_family` tells a FLUX.1 file (BFL block names), an SDXL file
(`lora_te1_`/`lora_te2_`, Stability-layout U-Net names) and an SD 1.x/2.x one (`lora_te_`) apart by
their names alone.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .file_format import LoRAFileEntry
from .fused_layer import LinearGroup

Shape = tuple[int, ...]

SDXL = "SDXL"
SD = "Stable Diffusion 1.x/2.x"
FLUX = "FLUX.1"
# FLUX files' transformer layers are BFL's (`double_blocks`, `single_blocks`); T5 is `lora_te3_`. Their
# CLIP-L is `lora_te1_`, as SDXL's first encoder, so these are looked for first.
_FLUX_MARKERS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te3_")
_SDXL_MARKERS = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_SD_MARKERS = ("lora_te_",)


def lora_shapes(layer: nn.Module, rank: int) -> tuple[Shape, Shape]:
    """(lora_down, lora_up) weight shapes of a rank-`rank` LoRA on `layer` (a Linear or Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    if isinstance(layer, (nn.Linear, LinearGroup)):
        return (rank, layer.in_features), (layer.out_features, rank)
    raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(layer).__name__}")


def fits(entry: LoRAFileEntry, layer: nn.Module) -> bool:
    """Whether the file's layer, at its own rank, has the shapes a LoRA on `layer` has."""
    return (entry.down_shape, entry.up_shape) == lora_shapes(layer, entry.rank)


def file_family(lora_names: Iterable[str]) -> tuple[str, str] | None:
    """(`FLUX`, `SDXL` or `SD`, a name that shows it), or None when the names do not tell.

    FLUX.1 files name BFL's transformer blocks (`lora_unet_double_blocks_...`) or T5 (`lora_te3_`).
    SD 1.x/2.x files have one text encoder (`lora_te_`) and diffusers-layout U-Net names; SDXL files
    two (`lora_te1_`, `lora_te2_`) and, from sd-scripts, Stability-layout U-Net names. A U-Net-only
    file in diffusers layout can be either (some tools write SDXL U-Net names so), and a file with
    markers of both is left to the layer-by-layer check.
    """
    names = list(lora_names)
    flux = next((name for name in names if name.startswith(_FLUX_MARKERS)), None)
    if flux is not None:
        return FLUX, flux
    sdxl = next((name for name in names if name.startswith(_SDXL_MARKERS)), None)
    sd = next((name for name in names if name.startswith(_SD_MARKERS)), None)
    if sdxl is not None and sd is None:
        return SDXL, sdxl
    if sd is not None and sdxl is None:
        return SD, sd
    return None
