"""Cheap numbers for "did the LoRA learn, and did it leave the rest alone?", with no CLIP model.

- `prediction_drift`: mean squared difference between the adapted and the base U-Net's predictions
  on trigger-free prompts, at fixed noise and timesteps. 0 means the adapter leaves those prompts
  exactly as the base model had them (what CAT's term pushes towards).
- `denoising_loss`: the plain training loss on given latents and captions, at fixed noise and
  timesteps; its drop from the base model is how much the adapter learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from library.cat.objective import Denoiser
from library.cat.network_protocol import multiplier_set_to


@dataclass(frozen=True)
class FixedNoise:
    """Noise and timesteps drawn once, so every evaluation sees the same ones."""

    noise: Tensor
    timesteps: Tensor

    @classmethod
    def draw(cls, shape: tuple[int, ...], seed: int, num_train_timesteps: int = 1000) -> "FixedNoise":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=gen)
        timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=gen)
        return cls(noise, timesteps)


@torch.no_grad()
def prediction_drift(denoiser: Denoiser, network, input_ids: Tensor, latents: Tensor, fixed: FixedNoise, scheduler) -> float:
    """Mean of (eps_adapted - eps_base)^2 on these captions (adapters on vs. every adapter off);
    `scheduler` noises the latents (`add_noise(latents, noise, timesteps)`: a diffusers DDPM
    scheduler, or a run's `Noising`)."""
    z_t = scheduler.add_noise(latents, fixed.noise, fixed.timesteps)
    adapted = denoiser.predict(z_t, fixed.timesteps, denoiser.encode(input_ids))
    with multiplier_set_to(network, 0.0):
        base = denoiser.predict(z_t, fixed.timesteps, denoiser.encode(input_ids))
    return (adapted.float() - base.float()).square().mean().item()


@torch.no_grad()
def denoising_loss(denoiser: Denoiser, input_ids: Tensor, latents: Tensor, fixed: FixedNoise, scheduler,
                   target: Tensor) -> float:
    """The mean squared training loss on `latents` with these captions, at fixed noise and timesteps;
    `target` is what the model should predict there (`library.training.noise.training_target`)."""
    z_t = scheduler.add_noise(latents, fixed.noise, fixed.timesteps)
    prediction = denoiser.predict(z_t, fixed.timesteps, denoiser.encode(input_ids))
    return (prediction.float() - target.float()).square().mean().item()
