"""FLUX.1's LoRA targets under the names sd-scripts writes: Black Forest Labs' layout on diffusers' model.

sd-scripts trains FLUX.1 on BFL's own module tree, so its files name layers such as
`lora_unet_double_blocks_0_img_attn_qkv` or `lora_unet_single_blocks_0_linear1`. diffusers'
`FluxTransformer2DModel` has the same layers under other paths, some split in parts
(`transformer_blocks.0.attn.to_q/to_k/to_v` for `double_blocks.0.img_attn.qkv`). Each BFL layer is
adapted here as one adapter on its diffusers parts (`fused_layer.FusedLoRAModule` where there are
several), so our files are sd-scripts' files.

What is adapted by default is what sd-scripts adapts: every Linear of the double blocks (image and
text streams: attention qkv and projection, both MLP layers, the modulation) and of the single blocks
(linear1, linear2, modulation); not the embedders or the final layer. CLIP-L is `lora_te1`; T5-XXL,
`lora_te3`, is adapted only with `--network_args train_t5xxl=True`, as in sd-scripts.
"""

from __future__ import annotations

from torch import nn

from .fused_layer import LinearGroup

FLUX_TRANSFORMER_CLASS = "FluxTransformer2DModel"
CLIP_L_PREFIX, T5_PREFIX = "lora_te1", "lora_te3"
T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense")

# BFL layer in a double block -> its parts in diffusers' FluxTransformerBlock.
DOUBLE_BLOCK_LAYERS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# BFL layer in a single block -> its parts in diffusers' FluxSingleTransformerBlock.
SINGLE_BLOCK_LAYERS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


def is_flux_transformer(model: nn.Module) -> bool:
    return type(model).__name__ == FLUX_TRANSFORMER_CLASS


def flux_transformer_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """BFL module path -> the layer it is on diffusers' model (a Linear, or a `LinearGroup` of its parts)."""
    layers: dict[str, nn.Module] = {}
    for kind, blocks, table in (("double_blocks", transformer.transformer_blocks, DOUBLE_BLOCK_LAYERS),
                                ("single_blocks", transformer.single_transformer_blocks, SINGLE_BLOCK_LAYERS)):
        for index, block in enumerate(blocks):
            for bfl_path, parts in table.items():
                modules = [block.get_submodule(part) for part in parts]
                layers[f"{kind}.{index}.{bfl_path}"] = modules[0] if len(modules) == 1 else LinearGroup(modules)
    return layers
