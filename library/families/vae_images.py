"""Latents to a PIL image through a family's VAE, shared by the families whose VAE is diffusers' AutoencoderKL."""

from __future__ import annotations

from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import Tensor, nn


def vae_scale_factor(vae: nn.Module) -> int:
    """How many pixels one latent covers along each side (8 for every SD-family VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_first_image(vae: nn.Module, latents: Tensor) -> Image.Image:
    """The first image of a batch of denoised, scaled latents (SD's scaling, no shift)."""
    return decode_pixels(vae, latents / vae.config.scaling_factor)


def decode_pixels(vae: nn.Module, latents: Tensor) -> Image.Image:
    """The first image of a batch of latents in the VAE's own space (unscaled), decoded in the VAE's
    own dtype (outside autocast, so --no_half_vae keeps float32)."""
    pixels = vae.decode(latents.to(vae.device, vae.dtype)).sample
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).postprocess(pixels.float(), output_type="pil")[0]
