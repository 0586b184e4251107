"""Build FLUX.1's parts from the single files a ComfyUI/sd-scripts setup has, checked against an architecture.

- the transformer, as Black Forest Labs released it (flux1-dev.safetensors: `double_blocks.*`,
  possibly under `model.diffusion_model.`) or in diffusers' layout; its depths and guidance
  embedding are read from the keys (reduced-depth and schnell files load), the rest comes from the
  architecture folder's transformer/config.json;
- --clip_l: CLIP-L's text tower in transformers' layout (`text_model.*`, clip_l.safetensors);
- --t5xxl: T5-XXL's encoder in transformers' T5EncoderModel layout (t5xxl_fp16.safetensors);
- --ae: the autoencoder in BFL's layout, which is LDM's (ae.safetensors), read as a VAE file is.

Every tensor the model has must be in the file with the model's shape; the first that is not is
named with both shapes, before the weights are loaded. Tensors a file has beyond the model's (a
CLIP file's `logit_scale`, `text_projection`) are not used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.config.training_script import SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.families import ldm_single_file
from library.families.checkpoint_file import read_state_dict
from library.families.detect import has_sdxl_keys
from library.families.diffusers_folder import refuse_missing_weights
from library.families.flux import bfl_layout

# Key prefixes of an SD 1.x/2.x checkpoint (its text encoder, its LDM U-Net) that a FLUX file never has.
SD_KEY_PREFIXES = ("cond_stage_model.", "model.diffusion_model.input_blocks.")
CLIP_PREFIX = "text_model."  # clip_l.safetensors keeps it; transformers >= 5.6 dropped it from the model's keys
AE_CONV_OUT_KEYS = ("encoder.conv_out.weight", "first_stage_model.encoder.conv_out.weight")

TextEncoder = TypeVar("TextEncoder", CLIPTextModel, T5EncoderModel)


def transformer_layout(keys: list[str], path: Path) -> str:
    """The layout of a FLUX transformer file, "bfl" or "diffusers"; another family's checkpoint is named."""
    if bfl_layout.is_bfl_flux(keys):
        return "bfl"
    if bfl_layout.is_diffusers_flux(keys):
        return "diffusers"
    if has_sdxl_keys(keys):
        raise UserInputError(
            f"The checkpoint {path} is SDXL (text encoders under 'conditioner.embedders.'), not a FLUX.1 "
            f"transformer; train a LoRA for it with {SDXL_SCRIPT.name}."
        )
    if any(key.startswith(SD_KEY_PREFIXES) for key in keys):
        raise UserInputError(
            f"The checkpoint {path} is Stable Diffusion 1.x/2.x (an LDM U-Net and cond_stage_model.), not a FLUX.1 "
            f"transformer; train a LoRA for it with {SD_SCRIPT.name}."
        )
    raise UserInputError(
        f"The checkpoint {path} is not a FLUX.1 transformer: it has neither BFL keys (double_blocks.*) nor "
        "diffusers ones (transformer_blocks.*). Give flux1-dev.safetensors (or a model made from it), "
        "or a diffusers FLUX.1 folder."
    )


def load_transformer(path: Path, config_dir: Path, dtype: torch.dtype, disable_mmap: bool) -> FluxTransformer2DModel:
    """The transformer of a BFL- or diffusers-layout file, its depths and guidance read from the keys."""
    state_dict = read_state_dict(path, "FLUX transformer file", disable_mmap=disable_mmap)
    base = dict(FluxTransformer2DModel.load_config(config_dir, subfolder="transformer"))
    if transformer_layout(list(state_dict), path) == "bfl":
        try:
            config = {**base, **bfl_layout.infer_bfl_config(state_dict, base)}
        except UserInputError as error:
            raise UserInputError(f"In {path}: {error}") from error
        try:
            state_dict = bfl_layout.bfl_to_diffusers(state_dict, config)
        except ValueError as error:
            raise UserInputError(f"The FLUX transformer {path} could not be converted from BFL layout: {error}") from error
    else:
        config = {**base, **_diffusers_depths(state_dict)}
    with torch.device("meta"), _default_dtype(dtype):
        transformer = FluxTransformer2DModel.from_config(config)
    check_fits(state_dict, transformer, f"FLUX transformer {path}", config_dir / "transformer" / "config.json")
    # Allocated in `dtype` and filled by copying: no parameter stays a view of a fused BFL tensor, and
    # no float32 copy of 12B parameters is made on the way to bf16.
    transformer = transformer.to_empty(device="cpu")
    transformer.load_state_dict(state_dict, strict=True)
    return transformer


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Models built inside have their parameters in `dtype` (diffusers' `.to(dtype)` logs a misleading warning)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _diffusers_depths(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The block counts and guidance embedding of a diffusers-layout transformer file, as sd-scripts reads them."""
    def blocks(prefix: str) -> int:
        indices = {int(key[len(prefix):].split(".", 1)[0]) for key in state_dict if key.startswith(prefix)}
        return max(indices) + 1 if indices else 0

    return {
        "num_layers": blocks("transformer_blocks."),
        "num_single_layers": blocks("single_transformer_blocks."),
        "guidance_embeds": bfl_layout.has_guidance(state_dict),
    }


def load_clip_l(path: Path, config_dir: Path, dtype: torch.dtype, disable_mmap: bool) -> CLIPTextModel:
    """CLIP-L's text tower from a --clip_l file, against `config_dir/text_encoder/config.json`."""
    config = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder", local_files_only=True)
    return _load_text_encoder(CLIPTextModel, config, path, config_dir / "text_encoder", "--clip_l",
                              "CLIP-L text encoder", dtype, disable_mmap)


def load_t5(path: Path, config_dir: Path, dtype: torch.dtype, disable_mmap: bool) -> T5EncoderModel:
    """T5-XXL's encoder from a --t5xxl file, against `config_dir/text_encoder_2/config.json`."""
    config = T5Config.from_pretrained(config_dir, subfolder="text_encoder_2", local_files_only=True)
    return _load_text_encoder(T5EncoderModel, config, path, config_dir / "text_encoder_2", "--t5xxl",
                              "T5-XXL encoder", dtype, disable_mmap)


def _load_text_encoder(model_class: type[TextEncoder], config: Any, path: Path, config_folder: Path, flag: str,
                       component: str, dtype: torch.dtype, disable_mmap: bool) -> TextEncoder:
    """A transformers text encoder from a file in its own layout; transformers maps the key levels and ties
    (T5's `encoder.embed_tokens` is `shared`), and its report of missing weights is checked."""
    state_dict = read_state_dict(path, f"{flag} file", disable_mmap=disable_mmap)
    with torch.device("meta"):
        empty = model_class(config)
    check_fits(state_dict, empty, f"{flag} file {path}", config_folder / "config.json", component)
    model, report = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                                output_loading_info=True)
    refuse_missing_weights(report["missing_keys"], f"{component} file", path)
    return model


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, what: str, config_file: Path,
               component: str | None = None) -> None:
    """Raise unless `state_dict` has `model`'s tensors with `model`'s shapes (CLIP's `text_model.` level aside).

    With `component` (the model expected, in words), a file with none of them is another model
    altogether, and the weights it lacks are left to the loader's report; without, the state dict
    must hold exactly the model's tensors. One tensor of another shape is the same model of
    another size: both shapes are named.
    """
    expected = {key.removeprefix(CLIP_PREFIX): tensor.shape for key, tensor in model.state_dict().items()}
    found = {key.removeprefix(CLIP_PREFIX): tensor.shape for key, tensor in state_dict.items()}
    if component is not None and not set(expected) & set(found):
        raise UserInputError(
            f"The {what} is not a {component}: it has none of its tensors (such as {min(expected)}); "
            f"give the {component} file (in transformers' layout, as ComfyUI and sd-scripts use it)."
        )
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise UserInputError(
                f"The {what} does not fit the architecture {config_file}: {key} is {list(found[key])} in the file "
                f"but {list(shape)} in the config. Give the file of this model's size, or a model_config folder "
                "(laid out like configs/models/flux_dev) that matches the file."
            )
    if component is None:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            raise UserInputError(
                f"The {what} does not fit the architecture {config_file}: it lacks {len(missing)} of its tensors "
                f"(first: {missing[:3]}) and has {len(unexpected)} it does not (first: {unexpected[:3]}); "
                "the file is incomplete or of another architecture."
            )


def load_ae(path: Path, config_dir: Path, dtype: torch.dtype, disable_mmap: bool) -> AutoencoderKL:
    """FLUX's AE from an --ae file (BFL/LDM layout, bare or under `first_stage_model.`, or diffusers layout)."""
    state_dict = read_state_dict(path, "--ae file", disable_mmap=disable_mmap)
    check_ae_channels(state_dict, path, config_dir)
    return ldm_single_file.load_vae(state_dict, config_dir, path, dtype)


def check_ae_channels(state_dict: Mapping[str, Tensor], path: Path, config_dir: Path) -> None:
    """Raise unless the AE's latents have the config's channels (16 for FLUX.1; SD's and SDXL's VAEs have 4).

    The encoder's last conv outputs a mean and a log-variance per latent channel: twice the channels.
    """
    channels = AutoencoderKL.load_config(config_dir, subfolder="vae")["latent_channels"]
    key = next((key for key in AE_CONV_OUT_KEYS if key in state_dict), None)
    if key is None:
        raise UserInputError(
            f"The --ae file {path} has no autoencoder encoder ({' or '.join(AE_CONV_OUT_KEYS)}); "
            "give FLUX.1's ae.safetensors."
        )
    file_channels = state_dict[key].shape[0] // 2
    if file_channels != channels:
        raise UserInputError(
            f"The --ae file {path} is a {file_channels}-channel autoencoder ({key} is {list(state_dict[key].shape)}), "
            f"not FLUX.1's {channels}-channel AE ({config_dir / 'vae' / 'config.json'}); an SD or SDXL VAE does "
            "not fit FLUX.1: give FLUX.1's ae.safetensors."
        )
