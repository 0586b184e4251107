"""`StableDiffusionModels`: Stable Diffusion 1.x/2.x as a `library.families.family.ModelFamily`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from library.families.family import GuidedPipelineSampling, ImageGeometry
from library.families.prompt_tokens import tokenize
from library.families.prompt_weights import WeightedTokens, tokenize_weighted
from library.families.sd.denoiser import SDDenoiser
from library.families.sd.sample_prompts import sample_prompt_states
from library.families.vae_images import vae_scale_factor
from networks.lora_cat.targets import text_encoder_targets, unet_targets


@dataclass
class StableDiffusionModels(GuidedPipelineSampling):
    """The parts of an SD1/SD2 model a LoRA trainer needs, with the flags they were loaded under."""

    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    v2: bool
    v_parameterization: bool

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    @property
    def network_text_encoder(self) -> nn.Module:
        return self.text_encoder

    @property
    def model_version(self) -> str:
        """sd-scripts' `ss_base_model_version`: "sd_v1", "sd_v2", "sd_v2_v" (or "sd_v1_v", as sd-scripts
        writes for --v_parameterization without --v2)."""
        base = "sd_v2" if self.v2 else "sd_v1"
        return base + "_v" if self.v_parameterization else base

    @property
    def modelspec_architecture(self) -> None:
        return None  # the model version's

    @property
    def native_resolution(self) -> tuple[int, int]:
        size = self.unet.config.sample_size * self._vae_scale_factor
        return size, size

    def tokenize(self, texts: list[str], max_token_length: int | None = None,
                 weighted: bool = False) -> Tensor | WeightedTokens:
        """(B, 77) CLIP ids, or (B, n, 77) windows for sd-scripts' long prompts; with their weights if `weighted`."""
        if weighted:
            return tokenize_weighted(self.tokenizer, texts, max_token_length)
        return tokenize(self.tokenizer, texts, max_token_length)

    def denoiser(self, clip_skip: int | None = None) -> SDDenoiser:
        return SDDenoiser(self.unet, self.text_encoder, clip_skip)

    def image_conditioning(self, images: Sequence[ImageGeometry]) -> dict[str, Tensor]:
        """Nothing: SD 1.x/2.x is not told the image sizes."""
        return {}

    def latents_from_vae(self, sample: Tensor) -> Tensor:
        return sample * self.vae.config.scaling_factor

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        factor = self._vae_scale_factor
        return batch, self.unet.config.in_channels, height // factor, width // factor

    def lora_layers(self) -> dict[str, nn.Module]:
        """U-Net layers with conv blocks (a file may carry LoCon layers) and the text encoder's."""
        targets = unet_targets(self.unet, with_conv_blocks=True) + text_encoder_targets(self.text_encoder)
        return {target.lora_name: target.module for target in targets}

    def pipeline(self) -> StableDiffusionPipeline:
        """A diffusers pipeline sharing these models (no safety checker), e.g. to `load_lora_weights` or save."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def prompt_kwargs(self, prompt: str, negative_prompt: str, clip_skip: int | None = None,
                      max_token_length: int | None = None, weighted: bool = False) -> dict[str, Tensor]:
        """`prompt_embeds` / `negative_prompt_embeds` encoded as training does (clip skip, long prompts);
        `weighted`: as sd-scripts' sample images encode them (library.families.sd.sample_prompts: weights,
        up to 225 tokens whatever `max_token_length` is)."""
        denoiser = self.denoiser(clip_skip)
        if weighted:
            positive, negative = sample_prompt_states(self.tokenizer, denoiser.encode, [prompt, negative_prompt],
                                                      self.unet.device)
            return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

        def encode(text: str) -> Tensor:
            return denoiser.encode(self.tokenize([text], max_token_length).to(self.unet.device))

        return {"prompt_embeds": encode(prompt), "negative_prompt_embeds": encode(negative_prompt)}

    @property
    def _vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

