"""`ModelFamily`: everything the trainer, the CAT objective, sampling and evaluation know about a model.

A family (Stable Diffusion 1.x/2.x today, SDXL and FLUX.1 next) is loaded once into an object with
this interface; the code above `library.families` talks to the model only through it, never through
checks of which family it is. A new family is one sub-package that provides such an object and a
`load(model_args)` function, plus the training script that passes that function to
`library.training.trainer.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from library.cat.objective import Denoiser
from library.config.train_config import ModelArgs
from library.families.vae_images import decode_first_image


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image's pixels came from, in pixels: what size-conditioned families (SDXL) are told."""

    original_size: tuple[int, int]  # (width, height) of the image file
    crop_left_top: tuple[int, int]  # (left, top) of the crop in the resized image, as the model sees it (flips included)
    target_size: tuple[int, int]  # (width, height) of the training image: its bucket


class ModelFamily(Protocol):
    """One loaded model of a family: its parts, and what is specific to the family about them."""

    unet: nn.Module  # the denoiser network the adapters attach to (the kohya contract calls it `unet`)
    vae: nn.Module
    noise_scheduler: Any  # the training noise schedule (a diffusers scheduler)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """Every text encoder, in the order the kohya contract and the files number them."""

    @property
    def network_text_encoder(self) -> nn.Module | list[nn.Module]:
        """What the network module's `text_encoder` argument gets (one model, or a list of them)."""

    @property
    def model_version(self) -> str:
        """sd-scripts' `ss_base_model_version` (the metadata id of the family and its variant)."""

    @property
    def modelspec_architecture(self) -> str | None:
        """The `modelspec.architecture` of the model when its version alone does not tell it (FLUX.1's
        "flux-1-dev" / "flux-1-schnell"); None: the one `model_version` implies."""

    @property
    def native_resolution(self) -> tuple[int, int]:
        """(width, height) in pixels the model was trained at."""

    def tokenize(self, texts: list[str], max_token_length: int | None = None, weighted: bool = False) -> Any:
        """Token ids for `texts`, in the form this family's `Denoiser.encode` takes: a tensor, or with
        `weighted` (`--weighted_captions`, where the family has it) a `prompt_weights.WeightedTokens`."""

    def denoiser(self, clip_skip: int | None = None) -> Denoiser:
        """The text encoders and the denoiser network as CAT's objective calls them."""

    def image_conditioning(self, images: Sequence[ImageGeometry]) -> dict[str, Tensor]:
        """The denoiser's per-sample inputs besides z_t, t and the text (keyword arguments of its
        `predict`), from where each training image came from: SDXL's size/crop numbers; {} for SD."""

    def latents_from_vae(self, sample: Tensor) -> Tensor:
        """A VAE latent sample in the space the denoiser works in (scaled, and shifted where the family does)."""

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        """The shape of a batch of latents for images of `width` x `height` pixels."""

    def lora_layers(self) -> dict[str, nn.Module]:
        """Every layer a LoRA file for this family may name, by its kohya name."""

    def pipeline(self) -> Any:
        """A diffusers pipeline sharing these models (e.g. for `load_lora_weights` or sampling)."""

    def prompt_kwargs(self, prompt: str, negative_prompt: str, clip_skip: int | None = None,
                      max_token_length: int | None = None, weighted: bool = False) -> dict[str, Tensor]:
        """The pipeline's prompt arguments (embeddings), encoded as training encodes prompts; `weighted`
        (where the family's sd-scripts sampler reads `(word:1.2)` weights: `SampleDefaults.weights`),
        as that sampler encodes them."""

    def sample_latents(self, pipe: Any, embeds: dict[str, Tensor], *, width: int, height: int, steps: int,
                       scale: float, guidance: float | None, generator: torch.Generator) -> Tensor:
        """Denoised latents (B, C, h, w) from `pipe` (this family's `pipeline()`) for prompt embeddings
        `embeds` (`prompt_kwargs`): `scale` is classifier-free guidance, `guidance` FLUX.1-dev's input."""

    def decode_image(self, latents: Tensor) -> Image.Image:
        """The first image of a batch of denoised latents."""


class GuidedPipelineSampling:
    """`sample_latents` and `decode_image` of a family whose diffusers pipeline is classifier-free
    guided (SD's, SDXL's): such a family's class takes both from here."""

    vae: nn.Module

    def sample_latents(self, pipe: Any, embeds: dict[str, Tensor], *, width: int, height: int, steps: int,
                       scale: float, guidance: float | None, generator: torch.Generator) -> Tensor:
        """`scale` is the pipeline's `guidance_scale`; `guidance` is FLUX.1's input, which these models lack."""
        return pipe(**embeds, height=height, width=width, num_inference_steps=steps, guidance_scale=scale,
                    generator=generator, output_type="latent").images

    def decode_image(self, latents: Tensor) -> Image.Image:
        return decode_first_image(self.vae, latents)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its parameters', not the fp8 its weights may be stored in
    (--fp8_base), which are upcast to it. diffusers' `model.dtype` is the first parameter's: fp8 then."""
    return next((p.dtype for p in model.parameters() if p.dtype not in FP8_DTYPES), torch.float32)


def freeze_models(models: ModelFamily, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> None:
    """Put every model in `dtype` (the VAE in `vae_dtype`, default `dtype`), eval mode and without
    gradients; training code opts in explicitly."""
    for model in (*models.text_encoders, models.unet, models.vae):
        wanted = vae_dtype if model is models.vae and vae_dtype is not None else dtype
        if model.dtype != wanted:
            model.to(dtype=wanted)
        model.eval()
        model.requires_grad_(False)


ModelLoader = Callable[[ModelArgs], ModelFamily]
"""A family's `load`: the model named by `--pretrained_model_name_or_path` and its flags."""
