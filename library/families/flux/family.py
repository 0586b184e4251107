"""`FluxModels`: FLUX.1 (dev and schnell) as a `library.families.family.ModelFamily`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from library.families.family import ImageGeometry
from library.families.flux.denoiser import CLIP_TOKENS, FluxDenoiser
from library.families.vae_images import decode_pixels, vae_scale_factor
from networks.lora_cat.targets import model_text_encoder_targets, unet_targets

MODEL_VERSION = "flux1"  # sd-scripts' ss_base_model_version for FLUX.1 dev and schnell
# sd-scripts' default T5 token length: schnell was trained with 256 tokens, dev with 512.
T5_TOKENS_SCHNELL, T5_TOKENS_DEV = 256, 512


@dataclass
class FluxModels:
    """The parts of a FLUX.1 model a LoRA trainer needs, with the flags they were loaded under.

    `transformer` is diffusers' FluxTransformer2DModel (the kohya contract calls it `unet`); CLIP-L is
    `lora_te1` in files, T5-XXL `lora_te3`. `guidance_scale` is what FLUX.1-dev is told in training
    (`--guidance_scale`; schnell has no guidance input).
    """

    transformer: FluxTransformer2DModel
    clip_l: CLIPTextModel
    t5: T5EncoderModel
    clip_tokenizer: CLIPTokenizer
    t5_tokenizer: T5TokenizerFast
    vae: AutoencoderKL
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    guidance_scale: float = 3.5
    t5_max_length: int | None = None  # --t5xxl_max_token_length; None: 512 for dev, 256 for schnell
    apply_t5_attn_mask: bool = False

    @property
    def unet(self) -> FluxTransformer2DModel:
        return self.transformer

    @property
    def is_schnell(self) -> bool:
        """schnell has no guidance embedding (sd-scripts tells them apart the same way)."""
        return not self.transformer.config.guidance_embeds

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.clip_l, self.t5]

    @property
    def network_text_encoder(self) -> list[nn.Module]:
        return self.text_encoders

    @property
    def model_version(self) -> str:
        return MODEL_VERSION

    @property
    def modelspec_architecture(self) -> str:
        return "flux-1-schnell" if self.is_schnell else "flux-1-dev"

    @property
    def native_resolution(self) -> tuple[int, int]:
        return 1024, 1024  # FLUX.1's training resolution (its transformer has no sample size)

    @property
    def t5_tokens(self) -> int:
        if self.t5_max_length is not None:
            return self.t5_max_length
        return T5_TOKENS_SCHNELL if self.is_schnell else T5_TOKENS_DEV

    def tokenize(self, texts: list[str], max_token_length: int | None = None, weighted: bool = False) -> Tensor:
        """(B, 77 + L): CLIP-L's 77 ids then T5's L (`--t5xxl_max_token_length`), both padded.
        `max_token_length` (SD's long-prompt windows) does not apply: sd-scripts ignores it for FLUX too.
        No `weighted` ids: sd-scripts' FLUX tokenizer has no caption weights (the command line refuses the flag)."""
        if weighted:
            raise ValueError("FLUX.1 has no weighted captions; --weighted_captions is refused for it")
        clip = self.clip_tokenizer(texts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                                   return_tensors="pt").input_ids
        t5 = self.t5_tokenizer(texts, padding="max_length", max_length=self.t5_tokens, truncation=True,
                               return_tensors="pt").input_ids
        return torch.cat([clip, t5], dim=1)

    def denoiser(self, clip_skip: int | None = None) -> FluxDenoiser:
        """`clip_skip` is not used: FLUX reads CLIP-L's pooled output only."""
        return FluxDenoiser(self.transformer, self.clip_l, self.t5, apply_t5_attn_mask=self.apply_t5_attn_mask,
                            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
                            guidance_scale=self.guidance_scale)

    def image_conditioning(self, images: Sequence[ImageGeometry]) -> dict[str, Tensor]:
        """FLUX.1-dev's guidance value for each image (the same for all; {} for schnell)."""
        if self.is_schnell:
            return {}
        return {"guidance": torch.full((len(images),), float(self.guidance_scale))}

    def latents_from_vae(self, sample: Tensor) -> Tensor:
        """FLUX's AE latents are shifted, then scaled: (z - 0.1159) * 0.3611."""
        config = self.vae.config
        return (sample - config.shift_factor) * config.scaling_factor

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        factor = vae_scale_factor(self.vae)
        return batch, self.vae.config.latent_channels, height // factor, width // factor

    def lora_layers(self) -> dict[str, nn.Module]:
        """Transformer layers (BFL names, fused ones as groups), CLIP-L's (`lora_te1_`) and T5's (`lora_te3_`)."""
        targets = unet_targets(self.transformer, with_conv_blocks=False)
        targets += model_text_encoder_targets(self.transformer, self.text_encoders, with_t5=True)
        return {target.lora_name: target.module for target in targets}

    def pipeline(self) -> FluxPipeline:
        """A diffusers pipeline sharing these models; prompts reach it as embeddings (`prompt_kwargs`)."""
        return FluxPipeline(scheduler=self.noise_scheduler, vae=self.vae, text_encoder=self.clip_l,
                            tokenizer=self.clip_tokenizer, text_encoder_2=self.t5, tokenizer_2=self.t5_tokenizer,
                            transformer=self.transformer)

    def prompt_kwargs(self, prompt: str, negative_prompt: str, clip_skip: int | None = None,
                      max_token_length: int | None = None, weighted: bool = False) -> dict[str, Tensor]:
        """T5 states and CLIP-L's pooled embedding of the prompt, encoded as training encodes it (FLUX.1
        is guidance-distilled: the negative prompt is used only with the pipeline's true CFG). No
        `weighted`: sd-scripts' FLUX.1 samples read "(word:1.2)" as text, and so do these."""
        denoiser = self.denoiser(clip_skip)

        def encode(text: str):
            return denoiser.encode(self.tokenize([text], weighted=weighted).to(self.transformer.device))

        positive, negative = encode(prompt), encode(negative_prompt)
        return {"prompt_embeds": positive.states, "pooled_prompt_embeds": positive.pooled,
                "negative_prompt_embeds": negative.states, "negative_pooled_prompt_embeds": negative.pooled}

    def sample_latents(self, pipe: FluxPipeline, embeds: dict[str, Tensor], *, width: int, height: int, steps: int,
                       scale: float, guidance: float | None, generator: torch.Generator) -> Tensor:
        """`scale` is the pipeline's true CFG (off at 1.0, as sd-scripts' default), `guidance` dev's input
        (the run's --guidance_scale when the prompt gives none); latents unpacked to (B, 16, h, w)."""
        packed = pipe(**embeds, height=height, width=width, num_inference_steps=steps, true_cfg_scale=scale,
                      guidance_scale=self.guidance_scale if guidance is None else guidance,
                      max_sequence_length=self.t5_tokens, generator=generator, output_type="latent").images
        return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor(self.vae))

    def decode_image(self, latents: Tensor) -> Image.Image:
        config = self.vae.config
        return decode_pixels(self.vae, latents / config.scaling_factor + config.shift_factor)
