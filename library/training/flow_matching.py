"""Flow-matching training (FLUX.1; SD3 trains the same way): sigmas, noisy latents, the target and its loss.

The forward process is a straight line from the image to noise (Lipman et al. 2023, "Flow Matching
for Generative Modeling", arXiv 2210.02747; Esser et al. 2024, "Scaling Rectified Flow
Transformers", arXiv 2403.03206):

    z_sigma = (1 - sigma) * x0 + sigma * noise,     target = noise - x0   (the velocity)

for sigma in (0, 1]; the model is told `t = 1000 * sigma` (our timesteps keep the DDPM families' 0..1000
scale; the FLUX denoiser divides by 1000, as sd-scripts does before calling the transformer).

Everything follows sd-scripts' `flux_train_utils` (flags, defaults, formulas), so a TOML written for
`flux_train_network.py` trains the same way here:
- `--timestep_sampling`: `uniform`, `sigmoid` (sigmoid of a scaled normal), `shift` (sigmoid, then
  the schedule shift `s*u / (1 + (s-1)*u)` with `--discrete_flow_shift`), `flux_shift` (sigmoid, then
  FLUX's resolution-dependent shift), and the default `sigma`: an index into the 1000-step schedule
  shifted by `--discrete_flow_shift` (3.0), drawn by `--weighting_scheme`'s density (uniform,
  logit-normal, mode);
- `--model_prediction_type`: `raw` (the output is the velocity), `additive` (output + z), or the
  default `sigma_scaled` (`output * -sigma + z`, with `--weighting_scheme`'s loss weight). The target is
  `noise - x0` in every case, as in sd-scripts (its documentation recommends `raw`).
The CAT term compares the model's raw outputs (velocities): the space the network predicts in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Mapping

import torch
from torch import Tensor

from library.cat.objective import CATBatch, LossFn
from library.config.train_config import FlowMatchArgs, LossArgs, NoiseArgs
from library.training.losses import per_sample_loss

NUM_TRAIN_TIMESTEPS = 1000
# FLUX's resolution-dependent shift (`flux_shift`): mu grows linearly with the packed sequence
# length, from 0.5 at 256 tokens (256 px) to 1.15 at 4096 (1024 px); diffusers' `calculate_shift`.
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def _normal(batch: int, generator: torch.Generator | None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(batch, generator=generator, device=device) * std + mean


def _uniform(batch: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, generator=generator, device=device)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The schedule shift of SD3/FLUX: more steps at high noise for `shift` > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(sequence_length: int) -> float:
    """FLUX's shift exponent for a packed image of `sequence_length` tokens (linear in the length)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (sequence_length - BASE_SEQ_LEN)


def schedule_sigmas(shift: float, steps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The training schedule's sigmas, highest first: (steps - i) / steps for i = 0..steps-1, shifted."""
    return shift_sigmas(torch.arange(steps, 0, -1, dtype=torch.float32) / steps, shift)


def density_samples(batch: int, args: FlowMatchArgs, generator: torch.Generator | None) -> Tensor:
    """u in [0, 1) drawn by `--weighting_scheme`'s density (SD3's `compute_density_for_timestep_sampling`)."""
    if args.weighting_scheme == "logit_normal":
        return torch.sigmoid(_normal(batch, generator, args.logit_mean, args.logit_std))
    if args.weighting_scheme == "mode":
        v = _uniform(batch, generator)
        return 1 - v - args.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return _uniform(batch, generator)


def sample_sigmas(batch: int, args: FlowMatchArgs, sequence_length: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """(B,) sigmas in (0, 1] by `--timestep_sampling`; `sequence_length` is the packed image's token
    count (only `flux_shift` reads it)."""
    mode = args.timestep_sampling
    if mode == "uniform":
        return _uniform(batch, generator)
    if mode in ("sigmoid", "shift", "flux_shift"):
        u = torch.sigmoid(args.sigmoid_scale * _normal(batch, generator))
        if mode == "shift":
            return shift_sigmas(u, args.discrete_flow_shift)
        if mode == "flux_shift":
            mu = math.exp(flux_mu(sequence_length))
            return mu / (mu + (1 / u - 1))
        return u
    if mode == "sigma":
        indices = (density_samples(batch, args, generator) * NUM_TRAIN_TIMESTEPS).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)
        return schedule_sigmas(args.discrete_flow_shift)[indices.cpu()].to(indices.device)
    raise ValueError(f"unknown timestep sampling {mode!r}")


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """SD3's per-sample loss weight for `sigma_scaled` predictions (1 for the density schemes)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def in_target_space(prediction: Tensor, noisy: Tensor, sigmas: Tensor, prediction_type: str) -> Tensor:
    """The model's output as the main loss compares it with the target (`--model_prediction_type`)."""
    if prediction_type == "raw":
        return prediction
    if prediction_type == "additive":
        return prediction + noisy
    if prediction_type == "sigma_scaled":
        return prediction * -_per_sample(sigmas, prediction) + noisy
    raise ValueError(f"unknown model prediction type {prediction_type!r}")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values shaped to broadcast against `like` (B, ...)."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """z_sigma = (1 - sigma) x0 + sigma * noise."""
    sigma = _per_sample(sigmas, latents)
    return (1 - sigma) * latents + sigma * noise


def _flow_loss(prediction: Tensor, target: Tensor, *, noisy: Tensor, sigmas: Tensor, flow: FlowMatchArgs,
               loss_args: LossArgs, timesteps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample main loss: the output moved into the target's space, compared (weighted by the
    loss `mask` if any), weighted by sigma."""
    moved = in_target_space(prediction, noisy, sigmas, flow.model_prediction_type)
    loss = per_sample_loss(moved, target, loss_args.loss_type, huber_c=loss_args.huber_c,
                           huber_scale=loss_args.huber_scale, huber_schedule=loss_args.huber_schedule,
                           timesteps=timesteps, mask=mask)
    if flow.model_prediction_type != "sigma_scaled":
        return loss
    return loss * loss_weighting(flow.weighting_scheme, sigmas).to(loss.device)


@dataclass(frozen=True)
class FlowMatchNoising:
    """The `library.training.train_batch.Noising` of flow-matching families."""

    flow: FlowMatchArgs
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def batch(self, latents: Tensor, trigger_ids: Tensor, free_ids: Tensor, loss_weights: Tensor,
              noise_args: NoiseArgs, loss_args: LossArgs, generator: torch.Generator | None = None,
              conditioning: Mapping[str, Tensor] | None = None, timestep: int | None = None,
              loss_mask: Tensor | None = None) -> tuple[CATBatch, LossFn]:
        """Noise `latents` (B, C, H, W) once; timesteps are 1000 * sigma (all `timestep` when given)."""
        batch, _, height, width = latents.shape
        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device).to(latents.device, latents.dtype)
        if timestep is None:
            sigmas = sample_sigmas(batch, self.flow, (height // 2) * (width // 2), generator).to(latents.device)
        else:
            sigmas = torch.full((batch,), timestep / self.num_train_timesteps, device=latents.device)
        z_t = noisy_latents(latents, self._input_noise(noise, noise_args, generator), sigmas).to(latents.dtype)
        timesteps = sigmas * self.num_train_timesteps
        cat_batch = CATBatch(
            noisy_latents=z_t, timesteps=timesteps, target=noise - latents,
            trigger_ids=trigger_ids.to(latents.device), free_ids=free_ids.to(latents.device),
            weights=loss_weights.to(latents.device),
            conditioning={name: value.to(latents.device) for name, value in (conditioning or {}).items()},
        )
        loss_fn = partial(_flow_loss, noisy=z_t, sigmas=sigmas, flow=self.flow, loss_args=loss_args, timesteps=timesteps,
                          mask=loss_mask)
        return cat_batch, loss_fn

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """z at `timesteps` (0..1000 scale): what the drift probe and evaluation noise fixed latents with."""
        return noisy_latents(latents, noise, timesteps.float() / self.num_train_timesteps).to(latents.dtype)

    @staticmethod
    def _input_noise(noise: Tensor, noise_args: NoiseArgs, generator: torch.Generator | None) -> Tensor:
        """The noise the input is made with: `--ip_noise_gamma` perturbs it (the target keeps the original)."""
        gamma = noise_args.ip_noise_gamma
        if not gamma:
            return noise
        device = generator.device if generator is not None else noise.device
        if noise_args.ip_noise_gamma_random_strength:
            gamma = torch.rand(1, generator=generator, device=device).item() * gamma
        extra = torch.randn(noise.shape, generator=generator, device=device).to(noise.device, noise.dtype)
        return noise + gamma * extra
