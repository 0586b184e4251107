"""The FLUX.1 transformer's two state-dict layouts, converted both ways for any width and depth.

FLUX users have the transformer as Black Forest Labs released it (flux1-dev.safetensors, and the
fine-tunes and reduced-depth files made from it): `double_blocks.N.img_attn.qkv`, one fused `linear1`
per single block, the final modulation ordered (shift, scale). diffusers' `FluxTransformer2DModel`
names the same weights otherwise: separate q/k/v (and MLP-in) projections, `norm1.linear`, and a
final `AdaLayerNormContinuous` that splits its modulation as (scale, shift), so those two halves
are swapped. diffusers' own converter fixes the width at 3072 and the MLP ratio at 4; the sizes
here come from the config, so the tiny test transformer converts the same way the real one does.

The conversion is one table (`key_table`): each BFL key and the diffusers keys whose concatenation
along dim 0 it is. Every key of the input must be in the table, or the conversion raises: a weight
dropped here would load as random weights elsewhere without a word.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserInputError

# ComfyUI/ldm-style full checkpoints keep the transformer under this prefix; sd-scripts and diffusers strip it.
BFL_PREFIX = "model.diffusion_model."

# diffusers' FluxSingleTransformerBlock and BFL's SingleStreamBlock both widen the MLP by 4.
MLP_RATIO = 4

StateDict = dict[str, torch.Tensor]

# Keys that only one layout has; detection reads them (after the prefix is stripped).
_BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
_BFL_SINGLE_MARKER = "single_blocks.0.linear1.weight"
_DIFFUSERS_MARKERS = ("x_embedder.weight", "transformer_blocks.0.attn.add_k_proj.bias")
_GUIDANCE_KEYS = ("guidance_in.in_layer.bias", "time_text_embed.guidance_embedder.linear_1.bias")


@dataclass(frozen=True)
class KeyEntry:
    """One BFL tensor and the diffusers tensors it is made of (dim-0 concatenation, in this order).

    `sizes` are the dim-0 sizes of the `diffusers` parts. `swap_halves` marks the final modulation,
    whose BFL halves (shift, scale) are diffusers' (scale, shift): the one diffusers key holds both.
    """

    bfl: str
    diffusers: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap_halves: bool = False


def _linear(bfl: str, diffusers: Iterable[str], sizes: tuple[int, ...] | None = None,
            swap_halves: bool = False) -> list[KeyEntry]:
    """The weight and bias entries of a Linear layer (or of a fused group of them)."""
    diffusers = tuple(diffusers)
    return [
        KeyEntry(f"{bfl}.{kind}", tuple(f"{name}.{kind}" for name in diffusers), sizes, swap_halves)
        for kind in ("weight", "bias")
    ]


def _qk_norms(bfl_norm: str, diffusers_q: str, diffusers_k: str) -> list[KeyEntry]:
    """BFL's QKNorm RMSNorm `.scale`s as diffusers' `norm_q`/`norm_k` `.weight`s."""
    return [
        KeyEntry(f"{bfl_norm}.query_norm.scale", (f"{diffusers_q}.weight",)),
        KeyEntry(f"{bfl_norm}.key_norm.scale", (f"{diffusers_k}.weight",)),
    ]


def _embedder_entries(guidance: bool) -> list[KeyEntry]:
    """The input embedders and the final layer: the same for every depth."""
    embedders = {
        "img_in": ["x_embedder"],
        "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "final_layer.linear": ["proj_out"],
    }
    if guidance:
        embedders["guidance_in.in_layer"] = ["time_text_embed.guidance_embedder.linear_1"]
        embedders["guidance_in.out_layer"] = ["time_text_embed.guidance_embedder.linear_2"]
    entries = [entry for bfl, diffusers in embedders.items() for entry in _linear(bfl, diffusers)]
    return entries + _linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap_halves=True)


def _double_block_entries(index: int, hidden: int) -> list[KeyEntry]:
    """One double-stream block: an image and a text stream, each with modulation, attention and MLP."""
    bfl, diffusers = f"double_blocks.{index}", f"transformer_blocks.{index}"
    attn = f"{diffusers}.attn"
    streams = {
        # BFL stream: (modulation, q/k/v, q norm, k norm, attention out, MLP module)
        "img": ("norm1", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
        "txt": ("norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k",
                "to_add_out", "ff_context"),
    }
    entries = []
    for stream, (modulation, qkv, norm_q, norm_k, attn_out, mlp) in streams.items():
        entries += _linear(f"{bfl}.{stream}_mod.lin", [f"{diffusers}.{modulation}.linear"])
        entries += _linear(f"{bfl}.{stream}_attn.qkv", [f"{attn}.{name}" for name in qkv], (hidden,) * 3)
        entries += _qk_norms(f"{bfl}.{stream}_attn.norm", f"{attn}.{norm_q}", f"{attn}.{norm_k}")
        entries += _linear(f"{bfl}.{stream}_attn.proj", [f"{attn}.{attn_out}"])
        entries += _linear(f"{bfl}.{stream}_mlp.0", [f"{diffusers}.{mlp}.net.0.proj"])
        entries += _linear(f"{bfl}.{stream}_mlp.2", [f"{diffusers}.{mlp}.net.2"])
    return entries


def _single_block_entries(index: int, hidden: int) -> list[KeyEntry]:
    """One single-stream block: `linear1` is q, k, v and the MLP input fused; `linear2` their joint output."""
    bfl, diffusers = f"single_blocks.{index}", f"single_transformer_blocks.{index}"
    fused = [f"{diffusers}.attn.to_q", f"{diffusers}.attn.to_k", f"{diffusers}.attn.to_v", f"{diffusers}.proj_mlp"]
    return [
        *_linear(f"{bfl}.modulation.lin", [f"{diffusers}.norm.linear"]),
        *_linear(f"{bfl}.linear1", fused, (hidden, hidden, hidden, MLP_RATIO * hidden)),
        *_linear(f"{bfl}.linear2", [f"{diffusers}.proj_out"]),
        *_qk_norms(f"{bfl}.norm", f"{diffusers}.attn.norm_q", f"{diffusers}.attn.norm_k"),
    ]


def key_table(config: Mapping[str, Any]) -> list[KeyEntry]:
    """Every weight of the transformer `config` describes (a diffusers FluxTransformer2DModel config)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    entries = _embedder_entries(bool(config.get("guidance_embeds", False)))
    for index in range(config["num_layers"]):
        entries += _double_block_entries(index, hidden)
    for index in range(config["num_single_layers"]):
        entries += _single_block_entries(index, hidden)
    return entries


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The state dict without the `model.diffusion_model.` prefix of full-checkpoint wrappers."""
    return {key.removeprefix(BFL_PREFIX): tensor for key, tensor in state_dict.items()}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: its own inverse, so the same call goes either way."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_covered(state_dict: Mapping[str, torch.Tensor], known: set[str], layout: str) -> None:
    """Raise for keys the table does not cover, naming a few: they would otherwise be dropped."""
    unknown = sorted(set(state_dict) - known)
    if unknown:
        raise ValueError(
            f"{len(unknown)} {layout} FLUX transformer keys have no counterpart for this config "
            f"(first: {unknown[:3]}); the config's depth or guidance_embeds does not match the weights."
        )


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A BFL-layout transformer state dict (prefixed or not) in diffusers FluxTransformer2DModel layout.

    Fused tensors are split into views of the input; callers that save them clone first.
    """
    state_dict = strip_prefix(state_dict)
    table = key_table(config)
    _check_covered(state_dict, {entry.bfl for entry in table}, "BFL")
    converted = {}
    for entry in table:
        if entry.bfl not in state_dict:
            raise ValueError(f"The BFL FLUX transformer weights lack {entry.bfl!r}, which the config calls for.")
        tensor = state_dict[entry.bfl]
        if entry.swap_halves:
            tensor = _swap_halves(tensor)
        if entry.sizes is None:
            converted[entry.diffusers[0]] = tensor
            continue
        if tensor.shape[0] != sum(entry.sizes):
            raise ValueError(
                f"{entry.bfl!r} has {tensor.shape[0]} rows; the config's width calls for {sum(entry.sizes)}."
            )
        converted.update(zip(entry.diffusers, tensor.split(list(entry.sizes), dim=0)))
    return converted


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers FluxTransformer2DModel state dict in BFL layout (no prefix), as flux1-dev.safetensors has it."""
    table = key_table(config)
    _check_covered(state_dict, {key for entry in table for key in entry.diffusers}, "diffusers")
    converted = {}
    for entry in table:
        missing = [key for key in entry.diffusers if key not in state_dict]
        if missing:
            raise ValueError(f"The diffusers FLUX transformer weights lack {missing[0]!r}, which the config calls for.")
        parts = [state_dict[key] for key in entry.diffusers]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        converted[entry.bfl] = _swap_halves(tensor) if entry.swap_halves else tensor
    return converted


def is_bfl_flux(keys: Iterable[str]) -> bool:
    """Whether the keys are a FLUX transformer in BFL layout (with or without `model.diffusion_model.`)."""
    stripped = {key.removeprefix(BFL_PREFIX) for key in keys}
    return _BFL_MARKER in stripped or _BFL_SINGLE_MARKER in stripped


def is_diffusers_flux(keys: Iterable[str]) -> bool:
    """Whether the keys are a diffusers FluxTransformer2DModel (SD3's transformer, also joint, has no `x_embedder`)."""
    keys = set(keys)
    return all(marker in keys for marker in _DIFFUSERS_MARKERS)


def has_guidance(keys: Iterable[str]) -> bool:
    """Whether the transformer embeds a guidance scale: FLUX.1-dev (and its distillates) do, schnell does not."""
    stripped = {key.removeprefix(BFL_PREFIX) for key in keys}
    return any(key in stripped for key in _GUIDANCE_KEYS)


def _block_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest block index under `prefix` ("double_blocks."), 0 when there is none."""
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_bfl_config(state_dict: Mapping[str, torch.Tensor], base_config: Mapping[str, Any]) -> dict[str, Any]:
    """The FluxTransformer2DModel config overrides a BFL-layout state dict calls for, over `base_config`.

    Depths come from the largest block indices, as sd-scripts reads them, so reduced-depth files
    (fewer double or single blocks) load; guidance from the presence of `guidance_in`; the widths
    from the embedders' shapes, with the number of heads the width over `base_config`'s head dim.
    The head dim itself stays: the rotary axes (`axes_dims_rope`) are split to fit it, so a file
    whose query norms have another length is refused.
    """
    state_dict = strip_prefix(state_dict)
    if "img_in.weight" not in state_dict:
        raise UserInputError(
            "The FLUX transformer weights have no img_in.weight; this is not a BFL-layout FLUX.1 transformer."
        )
    hidden, in_channels = state_dict["img_in.weight"].shape
    head_dim = base_config["attention_head_dim"]
    for key in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"):
        if key in state_dict and state_dict[key].shape[0] != head_dim:
            raise UserInputError(
                f"The FLUX transformer's {key} has length {state_dict[key].shape[0]}, a head dim other than "
                f"the architecture's {head_dim}; this is not a FLUX.1 transformer of that architecture."
            )
    if hidden % head_dim:
        raise UserInputError(
            f"The FLUX transformer's width {hidden} (img_in.weight) is not a multiple of its head dim {head_dim}."
        )
    return {
        "in_channels": in_channels,
        "out_channels": state_dict["final_layer.linear.weight"].shape[0],
        "num_layers": _block_count(state_dict, "double_blocks."),
        "num_single_layers": _block_count(state_dict, "single_blocks."),
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": state_dict["txt_in.weight"].shape[1],
        "pooled_projection_dim": state_dict["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": has_guidance(state_dict),
    }
