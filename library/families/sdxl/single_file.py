"""Build SDXL's U-Net, VAE and two text encoders from one checkpoint file in the original SGM layout.

SGM is the layout of Stability's generative-models code, in which sd_xl_base_1.0.safetensors and
the models built on it are published: the U-Net under `model.diffusion_model.` (the LDM layout plus
`label_emb`), the VAE under `first_stage_model.`, CLIP ViT-L under
`conditioner.embedders.0.transformer.` and OpenCLIP ViT-bigG, with its `text_projection`, under
`conditioner.embedders.1.model.`. The conversion is diffusers' own, run offline against an
architecture config folder; U-Net and VAE go through the same checked path as SD's
(`library.families.ldm_single_file`).

Each text encoder is given only the keys under its own prefix: diffusers picks the conversion from
the keys it finds, and with the whole file it would read TE1's keys for TE2 whenever both towers
have the same width (as the tiny test model's do).
"""

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserInputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
REFINER_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.model."  # the refiner has OpenCLIP alone, at index 0
SD_TEXT_ENCODER_PREFIX = "cond_stage_model."  # SD 1.x/2.x checkpoints

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection

_TEXT_ENCODERS = {
    # class: (key prefix, config subfolder, name in messages)
    CLIPTextModel: (TEXT_ENCODER_1_PREFIX, "text_encoder", "first text encoder (CLIP ViT-L)"),
    CLIPTextModelWithProjection: (TEXT_ENCODER_2_PREFIX, "text_encoder_2", "second text encoder (OpenCLIP ViT-bigG)"),
}


def check_sdxl_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise unless the checkpoint holds an SDXL base-architecture U-Net and both text encoders."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in state_dict)

    if has(SD_TEXT_ENCODER_PREFIX):
        raise UserInputError(
            f"The checkpoint {path} is Stable Diffusion 1.x/2.x (its text encoder is under "
            f"{SD_TEXT_ENCODER_PREFIX!r}), not SDXL; train a LoRA for it with train_network_cat.py."
        )
    if has(REFINER_TEXT_ENCODER_PREFIX) and not has(TEXT_ENCODER_2_PREFIX):
        raise UserInputError(
            f"The checkpoint {path} is an SDXL refiner (one OpenCLIP text encoder), which is not trained here; "
            "give SDXL base or a model built on it (Pony, Illustrious, NoobAI, ...)."
        )
    missing = [prefix for prefix in (UNET_PREFIX, TEXT_ENCODER_1_PREFIX, TEXT_ENCODER_2_PREFIX) if not has(prefix)]
    if missing:
        raise UserInputError(
            f"The checkpoint {path} is not a full SDXL checkpoint: it has no keys under "
            f"{', '.join(repr(prefix) for prefix in missing)}; give an SDXL model file, "
            "not a LoRA, a VAE or a U-Net alone."
        )


def load_text_encoder(
    model_class: type[TextEncoder],
    state_dict: dict[str, torch.Tensor],
    config_dir: Path,
    path: Path,
    dtype: torch.dtype,
) -> TextEncoder:
    """TE1 (`CLIPTextModel`) or TE2 (`CLIPTextModelWithProjection`) of an SGM checkpoint, every weight present."""
    prefix, subfolder, component = _TEXT_ENCODERS[model_class]
    own_keys = {key: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    try:
        text_encoder = create_diffusers_clip_model_from_ldm(
            model_class, own_keys, subfolder=subfolder, config=str(config_dir), torch_dtype=dtype, local_files_only=True
        )
    except ValueError as error:  # another width than the config's, or a weight of another shape
        raise UserInputError(
            f"The {component} in {path} does not fit the architecture config {config_dir} ({error}); the file "
            "is of another architecture: give a model_config folder (laid out like configs/models/sdxl_base) "
            "that matches it."
        ) from error
    # diffusers leaves the weights the file lacked on the meta device, silently.
    tensors = [*text_encoder.named_parameters(), *text_encoder.named_buffers()]
    missing = sorted(name for name, tensor in tensors if tensor.is_meta)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserInputError(
            f"The {component} in {path} lacks {len(missing)} weight(s) the architecture needs ({shown}); "
            "the file is incomplete or of another architecture: give a model_config folder that matches it."
        )
    return text_encoder
