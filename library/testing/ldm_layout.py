"""Convert diffusers/transformers state dicts to the original LDM single-file layout.

A1111, ComfyUI and sd-scripts read SD checkpoints in the layout of the original CompVis/Stability
code: the U-Net under `model.diffusion_model.` (`input_blocks`, `middle_block`, `output_blocks`), the
VAE under `first_stage_model.`, the text encoder under `cond_stage_model.` (SD1: the transformers CLIP
names; SD2: OpenCLIP's names). SDXL's files keep the layout of Stability's generative-models code
(SGM): the same U-Net and VAE names (the U-Net with `label_emb`), and the two text encoders under
`conditioner.embedders.0.` (CLIP names) and `conditioner.embedders.1.` (OpenCLIP's). diffusers
converts these layouts to its own when it loads a single file; these functions go the other way,
so that test models can be written as a user's checkpoint is and loaded back through the real
single-file path.

Block indices are derived from the model configs (number of blocks, `layers_per_block`), not fixed
SD numbers. Every key of the input is converted or the conversion fails: nothing is dropped.
"""

import math
from collections.abc import Mapping

import torch

# The U-Net map is the adapter's: SDXL LoRA files name U-Net layers by it (sd-scripts writes SGM names).
from networks.lora_cat.sgm_names import unet_module_map

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_ENCODER_PREFIX = "cond_stage_model.model."

StateDict = dict[str, torch.Tensor]

_VAE_RESNET_CHILDREN = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION_CHILDREN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_CHILDREN = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _add_children(module_map: dict[str, str], diffusers_path: str, ldm_path: str, children: Mapping[str, str]) -> None:
    """Map each named child of a block (a resnet, an attention, a text layer) under its new path."""
    for diffusers_child, ldm_child in children.items():
        module_map[f"{diffusers_path}.{diffusers_child}"] = f"{ldm_path}.{ldm_child}"


def vae_module_map(config: Mapping) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> LDM module path, for the VAE described by `config`.

    LDM numbers the decoder levels from the lowest resolution up in reverse (`up.{n-1}` is diffusers'
    `up_blocks.0`), and calls the mid-block pieces `block_1`, `attn_1`, `block_2`.
    """
    num_blocks = len(config["down_block_types"])
    layers = config["layers_per_block"]  # AutoencoderKL takes one count for all levels
    module_map = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        module_map[f"{part}.conv_in"] = f"{part}.conv_in"
        module_map[f"{part}.conv_out"] = f"{part}.conv_out"
        module_map[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        _add_children(module_map, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET_CHILDREN)
        _add_children(module_map, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET_CHILDREN)
        _add_children(module_map, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_CHILDREN)
    for block in range(num_blocks):
        down, up, ldm_down, ldm_up = (
            f"encoder.down_blocks.{block}",
            f"decoder.up_blocks.{block}",
            f"encoder.down.{block}",
            f"decoder.up.{num_blocks - 1 - block}",
        )
        for layer in range(layers):
            _add_children(module_map, f"{down}.resnets.{layer}", f"{ldm_down}.block.{layer}", _VAE_RESNET_CHILDREN)
        for layer in range(layers + 1):
            _add_children(module_map, f"{up}.resnets.{layer}", f"{ldm_up}.block.{layer}", _VAE_RESNET_CHILDREN)
        if block < num_blocks - 1:
            module_map[f"{down}.downsamplers.0.conv"] = f"{ldm_down}.downsample.conv"
            module_map[f"{up}.upsamplers.0.conv"] = f"{ldm_up}.upsample.conv"
    return module_map


def rename_by_module_map(state_dict: Mapping[str, torch.Tensor], module_map: Mapping[str, str]) -> StateDict:
    """Rename each key by the longest module path of `module_map` that contains it.

    Raises ValueError for a key no entry covers: a silently dropped weight would surface only as a
    checkpoint that loads with random weights somewhere else.
    """
    renamed = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in module_map:
                renamed[".".join([module_map[module], *parts[cut:]])] = tensor
                break
        else:
            raise ValueError(f"No LDM name for the key {key!r}: the conversion does not cover this module")
    return renamed


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """A diffusers UNet2DConditionModel state dict in LDM layout, under `model.diffusion_model.`."""
    renamed = rename_by_module_map(state_dict, unet_module_map(config))
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping, prefix: str = VAE_PREFIX) -> StateDict:
    """A diffusers AutoencoderKL state dict in LDM layout, under `prefix` ("" for a standalone VAE file).

    The LDM mid-block attention uses 1x1 convolutions where diffusers uses Linear layers, so its
    q/k/v/proj_out weights gain two trailing unit dimensions.
    """
    renamed = rename_by_module_map(state_dict, vae_module_map(config))
    attention_weights = tuple(f".mid.attn_1.{name}.weight" for name in ("q", "k", "v", "proj_out"))
    converted = {}
    for key, tensor in renamed.items():
        if key.endswith(attention_weights):
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        converted[prefix + key] = tensor
    return converted


def _flat_text_encoder_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIPTextModel keys without the `text_model.` level that transformers < 5.6 had."""
    return {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}


def sd1_text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A CLIPTextModel state dict (either transformers layout) under `cond_stage_model.transformer.text_model.`."""
    return {SD1_TEXT_ENCODER_PREFIX + key: tensor for key, tensor in _flat_text_encoder_keys(state_dict).items()}


def sd2_text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A CLIPTextModel state dict in OpenCLIP layout under `cond_stage_model.model.` (SD2).

    CLIPTextModel has no text projection (SD2 conditions on hidden states, not on the pooled
    embedding); an identity stands in for it because OpenCLIP readers expect the key and diffusers
    reads the attention width from its first dimension. SD2's 24th OpenCLIP layer, which SD2 skips,
    is not in a 23-layer CLIPTextModel and is not written.
    """
    converted = _open_clip_text_tower(_flat_text_encoder_keys(state_dict))
    width = converted["positional_embedding"].shape[1]
    converted["text_projection"] = torch.eye(width, dtype=converted["positional_embedding"].dtype)
    return {SD2_TEXT_ENCODER_PREFIX + key: tensor for key, tensor in converted.items()}


def _open_clip_text_tower(flat: Mapping[str, torch.Tensor]) -> StateDict:
    """Flat CLIPTextModel keys (no `text_model.` level) renamed to OpenCLIP's text tower, without prefix.

    OpenCLIP keeps one fused `in_proj` for q, k and v, and its positional embedding as a bare tensor.
    """
    num_layers = 1 + max(int(key.split(".")[2]) for key in flat if key.startswith("encoder.layers."))
    module_map = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
    for layer in range(num_layers):
        _add_children(
            module_map, f"encoder.layers.{layer}", f"transformer.resblocks.{layer}", _OPEN_CLIP_LAYER_CHILDREN
        )
    position_key = "embeddings.position_embedding.weight"
    fused_keys = {key for key in flat if key.split(".")[-2] in ("q_proj", "k_proj", "v_proj")}
    converted = rename_by_module_map(
        {key: tensor for key, tensor in flat.items() if key not in fused_keys and key != position_key}, module_map
    )
    converted.update(_fuse_qkv(flat, num_layers))
    converted["positional_embedding"] = flat[position_key]
    return converted


def _fuse_qkv(flat: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    """Concatenate each layer's q, k, v projections into OpenCLIP's `in_proj_weight`/`in_proj_bias`."""
    fused = {}
    for layer in range(num_layers):
        source = f"encoder.layers.{layer}.self_attn"
        for kind in ("weight", "bias"):
            parts = [flat[f"{source}.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            fused[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return fused


# --- SDXL: the SGM layout of Stability's generative-models code (sd_xl_base_1.0.safetensors) ---------

SDXL_TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

# The text-time embedding (pooled text + size/crop numbers) of an SDXL U-Net, SGM's `label_emb.0`.
_SDXL_UNET_EXTRAS = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# OpenCLIP's initial temperature: SGM files carry it beside the text tower; readers ignore it.
_OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)


def sdxl_unet_to_sgm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """An SDXL UNet2DConditionModel state dict in SGM layout, under `model.diffusion_model.`.

    The SGM U-Net is the LDM one plus `label_emb.0` (diffusers' `add_embedding`); several transformer
    layers per attention keep their `transformer_blocks.N` names, so the LDM map covers them.
    """
    module_map = {**unet_module_map(config), **_SDXL_UNET_EXTRAS}
    renamed = rename_by_module_map(state_dict, module_map)
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def sdxl_text_encoder_1_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SDXL's CLIPTextModel (TE1) under `conditioner.embedders.0.transformer.text_model.`.

    With the `embeddings.position_ids` buffer that SGM files carry (transformers no longer saves it).
    """
    flat = _flat_text_encoder_keys(state_dict)
    positions = flat["embeddings.position_embedding.weight"].shape[0]
    flat.setdefault("embeddings.position_ids", torch.arange(positions).unsqueeze(0))
    return {SDXL_TEXT_ENCODER_1_PREFIX + key: tensor for key, tensor in flat.items()}


def sdxl_text_encoder_2_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SDXL's CLIPTextModelWithProjection (TE2) in OpenCLIP layout under `conditioner.embedders.1.model.`.

    OpenCLIP applies its projection as `x @ text_projection`, so it stores the transpose of the
    Linear weight transformers keeps: (width, projection_dim).
    """
    flat = _flat_text_encoder_keys(state_dict)
    projection = flat.pop("text_projection.weight")
    converted = _open_clip_text_tower(flat)
    converted["text_projection"] = projection.T.contiguous()
    converted["logit_scale"] = torch.tensor(_OPEN_CLIP_LOGIT_SCALE, dtype=projection.dtype)
    return {SDXL_TEXT_ENCODER_2_PREFIX + key: tensor for key, tensor in converted.items()}
