"""Which layers of Stable Diffusion get a LoRA, and their names in kohya files.

Names are `<prefix>_<module path with '.' replaced by '_'>`, e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` or
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`. Since transformers 5.6 `CLIPTextModel`
has no `text_model` level, so its module paths are re-rooted under `text_model.` to keep the
names every UI expects.

SD 1.x/2.x U-Net paths are diffusers' own. An SDXL U-Net's are renamed to the original Stability
layout (`sgm_names`), because sd-scripts' SDXL LoRAs carry those:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; its text encoders are `lora_te1`
(CLIPTextModel) and `lora_te2` (CLIPTextModelWithProjection, which keeps `text_model.`).

FLUX.1's transformer layers are named in Black Forest Labs' layout, as sd-scripts names them
(`flux_names`): `lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from .flux_names import CLIP_L_PREFIX, T5_BLOCKS, T5_PREFIX, flux_transformer_layers, is_flux_transformer
from .sgm_names import is_sdxl_unet, is_sgm_layout, renamed_module_path, sdxl_sgm_to_diffusers_map, unet_module_map

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
LORA_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, "lora_te1", "lora_te2", "lora_te3")

# The blocks whose Linear / Conv2d children are adapted (class names, as kohya matches them).
UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


@dataclass(frozen=True)
class LoRATarget:
    """One base layer to adapt, its kohya name, and whether it is a kxk conv (uses `conv_dim`)."""

    lora_name: str
    module: nn.Module
    is_conv_kxk: bool


def lora_name(prefix: str, module_path: str) -> str:
    """`lora_name("lora_unet", "mid_block.attentions.0.proj_in")` -> `lora_unet_mid_block_attentions_0_proj_in`."""
    return f"{prefix}.{module_path}".replace(".", "_")


def unet_targets(unet: nn.Module, with_conv_blocks: bool) -> list[LoRATarget]:
    """Targets in the U-Net: transformer blocks, plus ResNet/down/up-sample blocks when asked.

    Named in diffusers' layout for SD 1.x/2.x, in Stability's (SGM) layout for SDXL: a diffusers
    SDXL U-Net's paths are renamed, sd-scripts' own SDXL U-Net has SGM paths already.
    """
    if is_flux_transformer(unet):
        return [LoRATarget(lora_name(UNET_PREFIX, path), layer, False) for path, layer in flux_transformer_layers(unet).items()]
    blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if with_conv_blocks else ())
    return _targets_in(unet, blocks, UNET_PREFIX, _unet_renamers(unet)[0])


def diffusers_layout_unet_names(unet: nn.Module) -> dict[str, str]:
    """For an SDXL U-Net: diffusers-layout name -> SGM name of every possible target (conv blocks included).

    Some tools write SDXL LoRAs with diffusers-layout U-Net names (`lora_unet_down_blocks_1_attentions_0_...`);
    sd-scripts renames them to SGM when it loads them, and so does this network. Empty for SD 1.x/2.x,
    whose names are the diffusers ones already.
    """
    if not is_sdxl_unet(unet):
        return {}
    to_file, to_diffusers = _unet_renamers(unet)
    blocks = UNET_ATTENTION_BLOCKS + UNET_CONV_BLOCKS
    sgm_names = _targets_in(unet, blocks, UNET_PREFIX, to_file)
    diffusers_names = _targets_in(unet, blocks, UNET_PREFIX, to_diffusers)
    return {old.lora_name: new.lora_name for old, new in zip(diffusers_names, sgm_names)}


def text_encoder_targets(text_encoder: nn.Module, prefix: str = TEXT_ENCODER_PREFIX) -> list[LoRATarget]:
    """Targets in a CLIP text encoder's attention and MLP layers, named as kohya files name them."""
    # transformers >= 5.6 flattened CLIPTextModel; older versions (and CLIPTextModelWithProjection)
    # keep the `text_model.` level that kohya names contain.
    if hasattr(text_encoder, "text_model"):
        return _targets_in(text_encoder, TEXT_ENCODER_BLOCKS, prefix, _keep_path)
    return _targets_in(text_encoder, TEXT_ENCODER_BLOCKS, prefix, _under_text_model)


def model_text_encoder_targets(unet: nn.Module, text_encoders: list[nn.Module], with_t5: bool) -> list[LoRATarget]:
    """Targets in every text encoder of the model `unet` belongs to, under that family's prefixes.

    SD: `lora_te`; SDXL: `lora_te1`, `lora_te2`; FLUX.1: CLIP-L `lora_te1` and, when `with_t5`,
    T5-XXL `lora_te3` (its attention q/k/v/o and gated MLP wi_0/wi_1/wo, as sd-scripts names them).
    """
    if is_flux_transformer(unet):
        clip_l, t5 = (list(text_encoders) + [None, None])[:2]
        targets = text_encoder_targets(clip_l, CLIP_L_PREFIX) if clip_l is not None else []
        if t5 is not None and with_t5:
            targets += _targets_in(t5, T5_BLOCKS, T5_PREFIX, _keep_path)
        return targets
    prefixes = text_encoder_prefixes(len(text_encoders))
    return [t for te, prefix in zip(text_encoders, prefixes) for t in text_encoder_targets(te, prefix)]


def text_encoder_prefixes(count: int) -> list[str]:
    """`lora_te` for one text encoder, `lora_te1`/`lora_te2` for two (SDXL naming)."""
    if count == 1:
        return [TEXT_ENCODER_PREFIX]
    return [f"{TEXT_ENCODER_PREFIX}{i + 1}" for i in range(count)]


def _targets_in(
    root: nn.Module, block_classes: tuple[str, ...], prefix: str, rename: Callable[[str], str]
) -> list[LoRATarget]:
    """Linear/Conv2d layers inside blocks of `block_classes`, named `prefix` + `rename(module path)`."""
    targets = []
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = rename(".".join(p for p in (block_path, child_path) if p))
            is_kxk = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
            targets.append(LoRATarget(lora_name(prefix, path), child, is_kxk))
    return targets


def _keep_path(path: str) -> str:
    return path


def _under_text_model(path: str) -> str:
    return "text_model." + path


def _unet_renamers(unet: nn.Module) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(module path -> path the file names it by, module path -> diffusers-layout path) for this U-Net."""
    if not is_sdxl_unet(unet):
        return _keep_path, _keep_path
    if is_sgm_layout(unet):
        return _keep_path, partial(renamed_module_path, sdxl_sgm_to_diffusers_map())
    return partial(renamed_module_path, unet_module_map(unet.config)), _keep_path
