"""From latents and captions to a noised `CATBatch` and its loss function: the `Noising` of a run.

A family's noise schedule decides how it is trained: a DDPM schedule (SD 1.x/2.x, SDXL) is noised
here, by `DiffusionNoising`; a flow-matching one (FLUX.1) by `library.training.flow_matching`.
`noising_for` picks by the schedule's type, so a new family on either objective needs nothing here.

For DDPM schedules:
Noise, timesteps and targets follow sd-scripts (`library.training.noise`); the per-sample weight is the
prior-loss weight of regularisation images times the SNR weights (min-SNR and friends). SNR
weights use the schedule as loaded, also under `--zero_terminal_snr` (whose rescaled schedule only
drives noising and targets), as sd-scripts does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Protocol

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from library.cat.objective import CATBatch, LossFn
from library.data.buckets import size_conditioning_crop
from library.data.image_loading import Augmentation
from library.data.training_data import Sample
from library.families.family import ImageGeometry
from library.training.flow_matching import FlowMatchNoising
from library.training.losses import per_sample_loss
from library.training.noise import (
    noisy_latents, sample_noise, sample_timesteps, snr, snr_loss_weight, training_target, zero_terminal_snr_scheduler,
)
from library.config.train_config import FlowMatchArgs, LossArgs, NoiseArgs


class Noising(Protocol):
    """How a run noises its batches: z_t, t, the target, per-sample weights and the main loss."""

    num_train_timesteps: int

    def batch(self, latents: Tensor, trigger_ids: Tensor, free_ids: Tensor, loss_weights: Tensor,
              noise_args: NoiseArgs, loss_args: LossArgs, generator: torch.Generator | None = None,
              conditioning: Mapping[str, Tensor] | None = None, timestep: int | None = None,
              loss_mask: Tensor | None = None) -> tuple[CATBatch, LossFn]:
        """Noise `latents` once: the batch all three CAT predictions share, and the main term's loss.
        Timesteps are drawn as training draws them, or all `timestep` (validation's fixed ones). The
        main term's loss is weighted by `loss_mask` (B, H, W) when given (--masked_loss); the CAT
        term, which is not computed by that loss, stays over the whole image."""

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """z_t of fixed noise at fixed timesteps (the drift probe's, evaluation's)."""


@dataclass
class NoiseSchedule:
    """The schedule that noises (`train`, maybe zero-terminal-SNR) and the one SNR weights read (`weights`)."""

    train: DDPMScheduler
    weights: DDPMScheduler

    @property
    def v_prediction(self) -> bool:
        return self.train.config.prediction_type == "v_prediction"


@dataclass(frozen=True)
class DiffusionNoising:
    """The `Noising` of DDPM-schedule families: `build_cat_batch` on the run's schedule."""

    schedule: NoiseSchedule

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.train.config.num_train_timesteps

    def batch(self, latents: Tensor, trigger_ids: Tensor, free_ids: Tensor, loss_weights: Tensor,
              noise_args: NoiseArgs, loss_args: LossArgs, generator: torch.Generator | None = None,
              conditioning: Mapping[str, Tensor] | None = None, timestep: int | None = None,
              loss_mask: Tensor | None = None) -> tuple[CATBatch, LossFn]:
        return build_cat_batch(latents, trigger_ids, free_ids, loss_weights, self.schedule, noise_args, loss_args,
                               generator, conditioning=conditioning, timestep=timestep, loss_mask=loss_mask)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.schedule.train.add_noise(latents, noise, timesteps)


def noising_for(scheduler, noise_args: NoiseArgs, flow_args: FlowMatchArgs | None) -> Noising:
    """The run's `Noising` for a family's training schedule (`ModelFamily.noise_scheduler`); `flow_args`
    (sd-scripts' defaults when None) shape a flow-matching one."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchNoising(flow_args or FlowMatchArgs(), scheduler.config.num_train_timesteps)
    train = zero_terminal_snr_scheduler(scheduler) if noise_args.zero_terminal_snr else scheduler
    return DiffusionNoising(NoiseSchedule(train=train, weights=scheduler))


def build_cat_batch(
    latents: Tensor,
    trigger_ids: Tensor,
    free_ids: Tensor,
    loss_weights: Tensor,
    schedule: NoiseSchedule,
    noise_args: NoiseArgs,
    loss_args: LossArgs,
    generator: torch.Generator | None = None,
    conditioning: Mapping[str, Tensor] | None = None,
    timestep: int | None = None,
    loss_mask: Tensor | None = None,
) -> tuple[CATBatch, LossFn]:
    """Noise `latents` once; the batch carries z_t, t, the target and the image `conditioning` (the
    family's, e.g. SDXL's size/crop numbers) that all CAT predictions share. `timestep`: every
    sample at that timestep instead of drawn ones (sd-scripts' validation sets min = max timestep)."""
    scheduler = schedule.train
    noise = sample_noise(
        latents,
        noise_offset=noise_args.noise_offset,
        noise_offset_random_strength=noise_args.noise_offset_random_strength,
        adaptive_noise_scale=noise_args.adaptive_noise_scale,
        multires_noise_iterations=noise_args.multires_noise_iterations,
        multires_noise_discount=noise_args.multires_noise_discount,
        generator=generator,
    )
    low, high = noise_args.timestep_range if timestep is None else (timestep, timestep)
    timesteps = sample_timesteps(latents.shape[0], low, high, scheduler.config.num_train_timesteps, latents.device, generator)
    z_t = noisy_latents(scheduler, latents, noise, timesteps, ip_noise_gamma=noise_args.ip_noise_gamma,
                        ip_noise_gamma_random_strength=noise_args.ip_noise_gamma_random_strength, generator=generator)
    weights = loss_weights.to(latents.device) * snr_loss_weight(
        snr(schedule.weights, timesteps), v_prediction=schedule.v_prediction, min_snr_gamma=loss_args.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred=loss_args.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=loss_args.v_pred_like_loss, debiased_estimation_loss=loss_args.debiased_estimation_loss,
    ).to(latents.device)
    batch = CATBatch(
        noisy_latents=z_t,
        timesteps=timesteps,
        target=training_target(scheduler, latents, noise, timesteps),
        trigger_ids=trigger_ids.to(latents.device),
        free_ids=free_ids.to(latents.device),
        weights=weights,
        conditioning={name: value.to(latents.device) for name, value in (conditioning or {}).items()},
    )
    loss_fn = partial(
        per_sample_loss, loss_type=loss_args.loss_type, huber_c=loss_args.huber_c, huber_scale=loss_args.huber_scale,
        huber_schedule=loss_args.huber_schedule, timesteps=timesteps, scheduler=scheduler, mask=loss_mask,
    )
    return batch, loss_fn


def image_geometry(sample: Sample, augmentation: Augmentation) -> ImageGeometry:
    """Where the sample's pixels came from, for size-conditioned families (SDXL's image conditioning).
    A face-cropped sample is told as sd-scripts tells it: an original of the training size, uncropped."""
    placement = sample.placement
    if augmentation.face_crop is not None:
        return ImageGeometry(original_size=placement.bucket, crop_left_top=(0, 0), target_size=placement.bucket)
    original = placement.original or placement.resized
    crop = size_conditioning_crop(placement.bucket, original, augmentation.flip)
    return ImageGeometry(original_size=original, crop_left_top=crop, target_size=placement.bucket)
