"""`SDXLModels`: SDXL as a `library.families.family.ModelFamily`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.families.family import GuidedPipelineSampling, ImageGeometry
from library.families.prompt_tokens import tokenize
from library.families.prompt_weights import WeightedTokens, tokenize_weighted
from library.families.sdxl.denoiser import SDXLDenoiser
from library.families.vae_images import vae_scale_factor
from networks.lora_cat.targets import text_encoder_targets, unet_targets

MODEL_VERSION = "sdxl_base_v1-0"  # sd-scripts' ss_base_model_version for every SDXL-based model


@dataclass
class SDXLModels(GuidedPipelineSampling):
    """The parts of an SDXL model a LoRA trainer needs, with the flag they were loaded under.

    `text_encoder_1` is CLIP ViT-L (768 wide, pads with <|endoftext|>), `text_encoder_2` OpenCLIP
    ViT-bigG with its projection (1280 wide, pads with "!"), as the kohya files number them.
    """

    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    v_parameterization: bool

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder_1, self.text_encoder_2]

    @property
    def network_text_encoder(self) -> list[nn.Module]:
        return self.text_encoders

    @property
    def model_version(self) -> str:
        return MODEL_VERSION

    @property
    def modelspec_architecture(self) -> None:
        return None  # the model version's

    @property
    def native_resolution(self) -> tuple[int, int]:
        size = self.unet.config.sample_size * vae_scale_factor(self.vae)
        return size, size

    def tokenize(self, texts: list[str], max_token_length: int | None = None,
                 weighted: bool = False) -> Tensor | WeightedTokens:
        """(B, 2, 77) ids of both tokenizers, or (B, 2, n, 77) windows for sd-scripts' long prompts; with
        their weights if `weighted`."""
        tokenize_with = tokenize_weighted if weighted else tokenize
        return torch.stack([tokenize_with(self.tokenizer_1, texts, max_token_length),
                            tokenize_with(self.tokenizer_2, texts, max_token_length)], dim=1)

    def denoiser(self, clip_skip: int | None = None) -> SDXLDenoiser:
        """`clip_skip` is not used: SDXL is conditioned on fixed layers (sd-scripts warns about the flag too)."""
        return SDXLDenoiser(self.unet, self.text_encoder_1, self.text_encoder_2, vae_scale_factor(self.vae))

    def image_conditioning(self, images: Sequence[ImageGeometry]) -> dict[str, Tensor]:
        """`time_ids` (B, 6): original (h, w), crop (top, left), target (h, w) of each training image."""
        rows = [
            [image.original_size[1], image.original_size[0], image.crop_left_top[1], image.crop_left_top[0],
             image.target_size[1], image.target_size[0]]
            for image in images
        ]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def latents_from_vae(self, sample: Tensor) -> Tensor:
        return sample * self.vae.config.scaling_factor

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        factor = vae_scale_factor(self.vae)
        return batch, self.unet.config.in_channels, height // factor, width // factor

    def lora_layers(self) -> dict[str, nn.Module]:
        """U-Net layers (SGM names) with conv blocks, and both text encoders' (`lora_te1_`, `lora_te2_`)."""
        targets = unet_targets(self.unet, with_conv_blocks=True)
        targets += text_encoder_targets(self.text_encoder_1, "lora_te1")
        targets += text_encoder_targets(self.text_encoder_2, "lora_te2")
        return {target.lora_name: target.module for target in targets}

    def pipeline(self) -> StableDiffusionXLPipeline:
        """A diffusers pipeline sharing these models; prompts reach it as embeddings (`prompt_kwargs`)."""
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder_1, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer_1, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.noise_scheduler,
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        )

    def prompt_kwargs(self, prompt: str, negative_prompt: str, clip_skip: int | None = None,
                      max_token_length: int | None = None, weighted: bool = False) -> dict[str, Tensor]:
        """Per-token and pooled embeddings of prompt and negative prompt, encoded as training encodes them;
        `weighted`: with their `(word:1.2)` weights, as weighted captions are (sd-scripts' SDXL sample
        images encode them so)."""
        denoiser = self.denoiser(clip_skip)

        def encode(text: str):
            return denoiser.encode(self.tokenize([text], max_token_length, weighted).to(self.unet.device))

        positive, negative = encode(prompt), encode(negative_prompt)
        return {
            "prompt_embeds": positive.states, "pooled_prompt_embeds": positive.pooled,
            "negative_prompt_embeds": negative.states, "negative_pooled_prompt_embeds": negative.pooled,
        }
