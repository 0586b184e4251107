"""diffusers U-Net module paths in the original Stability (LDM / SGM) layout, as SDXL LoRA files name them.

sd-scripts trains SDXL on its own copy of Stability's U-Net, so its SDXL LoRAs name U-Net layers
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_1_proj_in`,
`lora_unet_output_blocks_2_2_conv`, not diffusers' `down_blocks_1_attentions_0_...`. The same map
turns diffusers checkpoints into LDM single files (`library.testing.ldm_layout`).

The layout: `input_blocks` 0 is conv_in, then one slot per resnet (its attention beside it, at `.1`)
and one per downsampler (`.0.op`); `middle_block` 0, 1, 2 are resnet, attention, resnet;
`output_blocks` have one slot per resnet, a level's upsampler sitting after its last resnet (at `.2`
behind an attention, else `.1`). Resnet children are renamed (`conv1` -> `in_layers.2`,
`time_emb_proj` -> `emb_layers.1`, ...); attentions keep their children's names, so several
transformer layers (`transformer_blocks.0`, `.1`, ...) need no entry of their own. Block indices
come from the config (levels, `layers_per_block`, which levels have attention), not fixed SDXL numbers.
"""

from __future__ import annotations

from typing import Mapping

# ResnetBlock2D children: diffusers name -> LDM ResBlock name.
UNET_RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
SDXL_ADDITION_EMBED_TYPE = "text_time"
# sd-scripts' own SDXL U-Net class (its library/sdxl_original_unet.py): module paths already in SGM layout.
SGM_SDXL_UNET_CLASS = "SdxlUNet2DConditionModel"
# The block layout of every SDXL U-Net sd-scripts builds (SDXL base 1.0's).
SDXL_BASE_LAYOUT = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "addition_embed_type": SDXL_ADDITION_EMBED_TYPE,
}


def is_sdxl_unet(unet: object) -> bool:
    """An SDXL U-Net: diffusers' with the text-time embedding (`addition_embed_type` "text_time", which takes
    the pooled text and size/crop numbers), or sd-scripts' own SDXL U-Net (`is_sgm_layout`)."""
    config = getattr(unet, "config", None)
    is_diffusers_sdxl = config is not None and getattr(config, "addition_embed_type", None) == SDXL_ADDITION_EMBED_TYPE
    return is_diffusers_sdxl or is_sgm_layout(unet)


def is_sgm_layout(unet: object) -> bool:
    """sd-scripts' SDXL U-Net (or a subclass), whose module paths are SGM's already (sd-scripts checks the class too)."""
    return any(cls.__name__ == SGM_SDXL_UNET_CLASS for cls in type(unet).__mro__)


def unet_module_map(config: Mapping) -> dict[str, str]:
    """diffusers U-Net module path -> LDM module path, for the U-Net described by `config`.

    SD 1.x/2.x and SDXL alike; SDXL's text-time embedding (`add_embedding`) is `label_emb.0`.
    """
    mid_block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_block_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {mid_block_type!r} has no LDM layout here")
    module_map = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    if config.get("addition_embed_type") == SDXL_ADDITION_EMBED_TYPE:
        module_map["add_embedding.linear_1"] = "label_emb.0.0"
        module_map["add_embedding.linear_2"] = "label_emb.0.2"
    _add_children(module_map, "mid_block.resnets.0", "middle_block.0", UNET_RESNET_CHILDREN)
    _add_children(module_map, "mid_block.resnets.1", "middle_block.2", UNET_RESNET_CHILDREN)
    _add_unet_down_path(module_map, config)
    _add_unet_up_path(module_map, config)
    return module_map


def sdxl_sgm_to_diffusers_map() -> dict[str, str]:
    """LDM module path -> diffusers module path for sd-scripts' SDXL U-Net (the inverse of SDXL base's map)."""
    return {ldm: diffusers for diffusers, ldm in unet_module_map(SDXL_BASE_LAYOUT).items()}


def renamed_module_path(module_map: Mapping[str, str], module_path: str) -> str:
    """`module_path` renamed by the longest entry of `module_map` that is it or contains it.

    With `unet_module_map(tiny SDXL config)`: `down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k`
    -> `input_blocks.4.1.transformer_blocks.1.attn2.to_k`. Raises KeyError for a path no entry covers.
    """
    parts = module_path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in module_map:
            return ".".join([module_map[head], *parts[cut:]])
    raise KeyError(f"no entry of the U-Net layout map covers the module {module_path!r}")


def _per_block(value: int | list[int], num_blocks: int) -> list[int]:
    """diffusers accepts `layers_per_block` as one int or one int per block."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_blocks


def _has_attention(block_type: str) -> bool:
    """CrossAttn*Block2D blocks carry a Transformer2DModel per resnet; plain ones (SDXL's first level) do not."""
    return block_type.startswith("CrossAttn")


def _add_children(module_map: dict[str, str], diffusers_path: str, ldm_path: str, children: Mapping[str, str]) -> None:
    for diffusers_child, ldm_child in children.items():
        module_map[f"{diffusers_path}.{diffusers_child}"] = f"{ldm_path}.{ldm_child}"


def _add_unet_down_path(module_map: dict[str, str], config: Mapping) -> None:
    """Fill `input_blocks` slots: resnets (+ attentions) of each level, then its downsampler."""
    block_types = config["down_block_types"]
    layers = _per_block(config["layers_per_block"], len(block_types))
    slot = 1
    for block, block_type in enumerate(block_types):
        for layer in range(layers[block]):
            resnet = f"down_blocks.{block}.resnets.{layer}"
            _add_children(module_map, resnet, f"input_blocks.{slot}.0", UNET_RESNET_CHILDREN)
            if _has_attention(block_type):
                module_map[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{slot}.1"
            slot += 1
        if block < len(block_types) - 1:
            module_map[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{slot}.0.op"
            slot += 1


def _add_unet_up_path(module_map: dict[str, str], config: Mapping) -> None:
    """Fill `output_blocks` slots: each level has one resnet more than its down counterpart."""
    block_types = config["up_block_types"]
    layers = list(reversed(_per_block(config["layers_per_block"], len(block_types))))
    slot = 0
    for block, block_type in enumerate(block_types):
        for layer in range(layers[block] + 1):
            resnet = f"up_blocks.{block}.resnets.{layer}"
            _add_children(module_map, resnet, f"output_blocks.{slot}.0", UNET_RESNET_CHILDREN)
            if _has_attention(block_type):
                module_map[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{slot}.1"
            slot += 1
        if block < len(block_types) - 1:
            upsampler_index = 2 if _has_attention(block_type) else 1
            module_map[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{slot - 1}.{upsampler_index}.conv"
