"""Which layers of Stable Diffusion get a LoRA, and their names in kohya files.

Names are `<prefix>_<module path with '.' replaced by '_'>`, e.g.
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` or
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`. Since transformers 5.6 `CLIPTextModel`
has no `text_model` level, so its module paths are re-rooted under `text_model.` to keep the
names every UI expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserInputError

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
LORA_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX, "lora_te1", "lora_te2")

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
    """Targets in the U-Net: transformer blocks, plus ResNet/down/up-sample blocks when asked."""
    _refuse_sdxl(unet)
    blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if with_conv_blocks else ())
    return _targets_in(unet, blocks, UNET_PREFIX, path_root="")


def text_encoder_targets(text_encoder: nn.Module, prefix: str = TEXT_ENCODER_PREFIX) -> list[LoRATarget]:
    """Targets in a CLIP text encoder's attention and MLP layers, named as kohya files name them."""
    # transformers >= 5.6 flattened CLIPTextModel; older versions (and CLIPTextModelWithProjection)
    # keep the `text_model.` level that kohya names contain.
    path_root = "" if hasattr(text_encoder, "text_model") else "text_model."
    return _targets_in(text_encoder, TEXT_ENCODER_BLOCKS, prefix, path_root)


def text_encoder_prefixes(count: int) -> list[str]:
    """`lora_te` for one text encoder, `lora_te1`/`lora_te2` for two (SDXL naming)."""
    if count == 1:
        return [TEXT_ENCODER_PREFIX]
    return [f"{TEXT_ENCODER_PREFIX}{i + 1}" for i in range(count)]


def _targets_in(root: nn.Module, block_classes: tuple[str, ...], prefix: str, path_root: str) -> list[LoRATarget]:
    targets = []
    for block_path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = path_root + ".".join(p for p in (block_path, child_path) if p)
            is_kxk = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
            targets.append(LoRATarget(lora_name(prefix, path), child, is_kxk))
    return targets


def _refuse_sdxl(unet: nn.Module) -> None:
    config = getattr(unet, "config", None)
    if config is not None and getattr(config, "addition_embed_type", None) == "text_time":
        raise UserInputError(
            "This U-Net is SDXL (addition_embed_type 'text_time'); networks.lora_cat supports "
            "Stable Diffusion 1.x and 2.x. Use an SD 1.x/2.x checkpoint."
        )
