"""Per-sample diffusion losses (`--loss_type`, `--huber_*`) and their weighted batch mean.

sd-scripts' order, kept here: elementwise loss -> mean over all non-batch dims -> times the
per-sample weights (`prior_loss_weight` for regularisation images, then the timestep weights of
`library.training.noise.snr_loss_weight`) -> mean over the batch. `per_sample_loss` compares any two
tensors of one shape, so the CAT objective uses it for its main term and its preservation term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.errors import UserInputError

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def check_loss_options(loss_type: str, huber_schedule: str = "snr", huber_c: float = 0.1) -> None:
    """Refuse an unknown `--loss_type` or `--huber_schedule`, or a `--huber_c` that is not positive."""
    if loss_type not in LOSS_TYPES:
        raise UserInputError(f"--loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}.")
    if loss_type in ("huber", "smooth_l1"):
        if huber_schedule not in HUBER_SCHEDULES:
            raise UserInputError(
                f"--huber_schedule {huber_schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}."
            )
        if huber_c <= 0:
            raise UserInputError(f"--huber_c must be positive (default 0.1), got {huber_c}.")


def huber_threshold(
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler | None = None,
    *,
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
    huber_schedule: str = "snr",
) -> torch.Tensor:
    """The Huber threshold c per sample (B,), sd-scripts' `get_huber_threshold_if_needed`.

    Scheduled pseudo-Huber loss (Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
    Resistance using Scheduled Pseudo-Huber Loss", arXiv 2403.16728):
    - constant: `huber_c * huber_scale`;
    - exponential: `exp(-a t) * huber_scale` with `a = -ln(huber_c) / T`, i.e. huber_scale at t=0
      down to huber_c * huber_scale at t=T;
    - snr: `(1 - huber_c) / (1 + sigma_t)^2 + huber_c` with `sigma_t = sqrt((1 - abar_t) / abar_t)`,
      near 1 at t=0 and near huber_c at high noise. sd-scripts does not apply `huber_scale` here.
    """
    check_loss_options("huber", huber_schedule, huber_c)
    if huber_schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if scheduler is None:
        raise ValueError(f"huber_schedule {huber_schedule!r} needs the noise scheduler.")
    if huber_schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * huber_scale
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    abar = alphas_cumprod[timesteps.long()]
    sigma = torch.sqrt((1.0 - abar) / abar)  # inf where abar = 0 (zero terminal SNR): c -> huber_c
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The unreduced loss of sd-scripts' `conditional_loss`, same shape as the inputs.

    l2: `(p - y)^2`; l1: `|p - y|`; huber (pseudo-Huber): `2 c (sqrt((p - y)^2 + c^2) - c)`;
    smooth_l1: `2 (sqrt((p - y)^2 + c^2) - c)`. `huber_c` is (B,), broadcast over the other dims.
    """
    check_loss_options(loss_type)
    diff = prediction - target
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs the per-sample threshold huber_c.")
    c = huber_c.to(device=diff.device, dtype=diff.dtype).view(-1, *([1] * (diff.dim() - 1)))
    # 2 (sqrt(d^2 + c^2) - c), written as 2 d^2 / (sqrt(d^2 + c^2) + c): the same value without the
    # cancellation that loses most float32 digits when c is large against d.
    squared = diff**2
    smooth = 2 * squared / (torch.sqrt(squared + c**2) + c)
    return c * smooth if loss_type == "huber" else smooth


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    *,
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
    huber_schedule: str = "snr",
    timesteps: torch.Tensor | None = None,
    scheduler: DDPMScheduler | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each sample (B,): elementwise loss in float32, weighted by the loss `mask` (B, H, W)
    if one is given (`apply_loss_mask`), mean over all non-batch dims.

    Both tensors are cast to float32 first, as sd-scripts does (`model_pred.float()`). For huber
    and smooth_l1 the threshold comes from `huber_threshold` (it needs `timesteps`, and
    `scheduler` unless the schedule is constant); l1 and l2 ignore the huber options.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape."
        )
    check_loss_options(loss_type, huber_schedule, huber_c)
    threshold = None
    if loss_type in ("huber", "smooth_l1"):
        if timesteps is None:
            raise ValueError(f"loss_type {loss_type!r} needs the timesteps of the batch.")
        threshold = huber_threshold(
            timesteps, scheduler, huber_c=huber_c, huber_scale=huber_scale, huber_schedule=huber_schedule
        )
    loss = elementwise_loss(prediction.float(), target.float(), loss_type, threshold)
    if mask is not None:
        loss = apply_loss_mask(loss, mask)
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The elementwise loss (B, C, h, w) times a pixel mask (B, H, W) in [0, 1] shrunk to (h, w) by
    averaging (area interpolation), as sd-scripts' `apply_masked_loss` does. The masked pixels still
    count in the mean that follows: the loss is not renormalised by the mask's area."""
    weights = F.interpolate(mask.to(loss.device, loss.dtype).unsqueeze(1), size=loss.shape[2:], mode="area")
    return loss * weights


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`mean_b(loss_b * weight_b)`: the batch loss after per-sample weights, as sd-scripts reduces it.

    `weights` is the product of everything that scales one sample (prior_loss_weight, min-SNR and
    the other timestep weights); note it is a plain mean, not normalised by the sum of weights.
    """
    if per_sample.shape != weights.shape:
        raise ValueError(
            f"per-sample loss {tuple(per_sample.shape)} and weights {tuple(weights.shape)} differ in shape."
        )
    return (per_sample * weights.to(per_sample)).mean()
