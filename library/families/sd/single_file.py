"""The text encoder of a Stable Diffusion 1.x/2.x single-file checkpoint (LDM layout), and which one it is.

The conversion is diffusers' own (`create_diffusers_clip_model_from_ldm`), run offline against an
architecture config folder; the U-Net and the VAE go through `library.families.ldm_single_file`.
The text encoder family must match `--v2`, and no weight may be left unloaded.
"""

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel

from library.errors import UserInputError
from library.families.ldm_single_file import component_errors, missing_weights_error

SD1_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_ENCODER_KEY = "cond_stage_model.model.token_embedding.weight"


def is_open_clip_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> bool:
    """True for an SD2 checkpoint (OpenCLIP text tower), False for SD1 (CLIP ViT-L); else a UserInputError."""
    if SD2_TEXT_ENCODER_KEY in state_dict:
        return True
    if any(key.startswith(SD1_TEXT_ENCODER_PREFIX) for key in state_dict):
        return False
    raise UserInputError(
        f"The checkpoint {path} has no SD1 or SD2 text encoder (no keys under {SD1_TEXT_ENCODER_PREFIX!r} or "
        "'cond_stage_model.model.'); give a full Stable Diffusion 1.x/2.x checkpoint, "
        "not a LoRA, a VAE or an SDXL model."
    )


def with_text_model_level(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1 keys as diffusers expects them: some old checkpoints lack the `text_model.` level."""
    fixed = {}
    for key, tensor in state_dict.items():
        if key.startswith(SD1_TEXT_ENCODER_PREFIX) and not key.startswith(SD1_TEXT_ENCODER_PREFIX + "text_model."):
            key = SD1_TEXT_ENCODER_PREFIX + "text_model." + key.removeprefix(SD1_TEXT_ENCODER_PREFIX)
        fixed[key] = tensor
    return fixed


def load_text_encoder(state_dict: dict, config_dir: Path, path: Path, dtype: torch.dtype) -> CLIPTextModel:
    """The text encoder of an LDM checkpoint: SD1's CLIP or SD2's OpenCLIP, as a CLIPTextModel."""
    with component_errors(CLIPTextModel, path, config_dir):
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel,
            state_dict,
            subfolder="text_encoder",
            config=str(config_dir),
            torch_dtype=dtype,
            local_files_only=True,
        )
    # Unlike from_single_file, this leaves the weights the file lacked on the meta device, silently.
    tensors = [*text_encoder.named_parameters(), *text_encoder.named_buffers()]
    missing = [name for name, tensor in tensors if tensor.is_meta]
    if missing:
        raise missing_weights_error(CLIPTextModel, path, missing)
    return text_encoder


