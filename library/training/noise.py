"""The forward diffusion process of training: noise, timesteps, noisy latents, targets and SNR weights.

Each function is one piece of sd-scripts' `get_noise_noisy_latents_and_timesteps` and
`custom_train_functions`, kept pure so that it can be tested without a model:

    noise = sample_noise(latents, noise_offset=..., multires_noise_iterations=..., generator=g)
    t = sample_timesteps(B, min_t, max_t, scheduler.config.num_train_timesteps, device, generator=g)
    z_t = noisy_latents(scheduler, latents, noise, t, ip_noise_gamma=..., generator=g)
    target = training_target(scheduler, latents, noise, t)
    weight = snr_loss_weight(snr(scheduler, t), v_prediction=..., min_snr_gamma=...)

Randomness: every function that draws takes an optional `torch.Generator`. With one, all draws
come from it (on the generator's device, then moved), so a seeded generator gives the same noise
on CPU and GPU runs. Without one, draws come from torch's global RNG, as in sd-scripts (noise on
the latents' device, timesteps on the CPU). sd-scripts also draws the multires factor from
Python's `random`; here it comes from torch like everything else, so one seed covers all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from library.errors import UserInputError

# sd-scripts caps the SNR at 1000 before dividing by it (its comment: "if timestep is 0, snr_t is
# inf"); SD's real maximum is about 1175 at t=0.
SNR_CAP = 1000.0
# Ours: the SNR is floored here where a weight divides by it. Every SNR of the SD1/SD2 schedule is
# above it (the minimum is 0.0047 at t=999), so sd-scripts' values are unchanged; it only bites
# under --zero_terminal_snr, where the SNR reaches 0 at t=999 and 2e-7 at t=998.
SNR_FLOOR = 1e-3


def _draw_device(generator: torch.Generator | None, default: torch.device | str) -> torch.device:
    """Where a draw happens: on the generator's device when one is given, else on `default`."""
    return generator.device if generator is not None else torch.device(default)


def _randn(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn in float32, returned on `like`'s device and dtype."""
    device = _draw_device(generator, like.device)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def _rand_scalar(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform draw in [0, 1), shape (1,), as sd-scripts' `torch.rand(1)`."""
    value = torch.rand(1, generator=generator, device=_draw_device(generator, device))
    return value.to(device)


def sample_timesteps(
    batch: int,
    min_timestep: int | None,
    max_timestep: int | None,
    num_train_timesteps: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Timesteps `t ~ U{min, max - 1}`, one per sample (sd-scripts' `get_timesteps`).

    `min_timestep` defaults to 0 and `max_timestep` (exclusive) to `num_train_timesteps`, as
    `--min_timestep`/`--max_timestep`. When min == max every sample gets that timestep. Drawn on
    the CPU (or the generator's device) and moved to `device`, as sd-scripts does.
    """
    low = 0 if min_timestep is None else int(min_timestep)
    high = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not (0 <= low < num_train_timesteps and 1 <= high <= num_train_timesteps and low <= high):
        raise UserInputError(
            f"--min_timestep {low} / --max_timestep {high} are out of range: they need "
            f"0 <= min_timestep <= max_timestep <= {num_train_timesteps} "
            f"and min_timestep < {num_train_timesteps}."
        )
    if low == high:
        return torch.full((batch,), low, dtype=torch.long, device=device)
    draw_device = _draw_device(generator, "cpu")
    timesteps = torch.randint(low, high, (batch,), generator=generator, device=draw_device)
    return timesteps.long().to(device)


def offset_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float,
    adaptive_noise_scale: float | None = None,
    random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add a random per-(sample, channel) constant: `noise + offset * randn(B, C, 1, 1)`.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org), sd-scripts'
    `apply_noise_offset`. With `random_strength` the offset is `U[0, 1) * noise_offset`
    (`--noise_offset_random_strength`). With `adaptive_noise_scale` the offset becomes
    `max(0, offset + scale * |mean_hw(latents)|)` per sample and channel (`--adaptive_noise_scale`).
    """
    offset: float | torch.Tensor = noise_offset
    if random_strength:
        offset = _rand_scalar(generator, latents.device) * noise_offset
    if adaptive_noise_scale is not None:
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, min=0.0)
    per_channel = _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)
    return noise + offset * per_channel


def pyramid_noise(
    noise: torch.Tensor,
    iterations: int,
    discount: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, rescaled to unit standard deviation.

    Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training" (wandb report), as
    sd-scripts' `pyramid_noise_like` (`--multires_noise_iterations`, `--multires_noise_discount`):
    for i = 0 .. iterations-1, draw r ~ U[2, 4), add `discount**i * bilinear_upsample(randn(B, C,
    max(1, int(H / r**i)), max(1, int(W / r**i))))` (i = 0 adds a full-resolution draw), stop after
    the first level that is 1 pixel high or wide, then divide by the std of the whole batch.
    The input is not modified.
    """
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for level in range(iterations):
        r = float(_rand_scalar(generator, noise.device)) * 2 + 2
        level_h = max(1, int(height / (r**level)))
        level_w = max(1, int(width / (r**level)))
        coarse = _randn((batch, channels, level_h, level_w), noise, generator)
        result = result + upsample_bilinear(coarse, (height, width)) * discount**level
        if level_h == 1 or level_w == 1:
            break
    return result / result.std()


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, what sd-scripts' `nn.Upsample(mode="bilinear")` does."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)


def sample_noise(
    latents: torch.Tensor,
    *,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training noise for `latents` (B, C, H, W): Gaussian, then offset, then pyramid.

    Current sd-scripts applies both when both flags are given: first the offset noise, then the
    pyramid noise on top of it (which rescales the sum to unit std). Older releases refused the
    combination; that check is commented out in sd-scripts today. Falsy `noise_offset` or
    `multires_noise_iterations` (None or 0) turn the feature off, as sd-scripts' `if args.x:`.
    """
    if adaptive_noise_scale is not None and not noise_offset:
        raise UserInputError(
            f"--adaptive_noise_scale {adaptive_noise_scale} needs --noise_offset: it scales the offset "
            "noise with the latent mean. Give --noise_offset (e.g. 0.05) or drop --adaptive_noise_scale."
        )
    noise = _randn(tuple(latents.shape), latents, generator)
    if noise_offset:
        noise = offset_noise(
            latents, noise, noise_offset, adaptive_noise_scale, noise_offset_random_strength, generator
        )
    if multires_noise_iterations:
        noise = pyramid_noise(noise, multires_noise_iterations, multires_noise_discount, generator)
    return noise


def noisy_latents(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n` via `scheduler.add_noise` (Ho et al. 2020, DDPM).

    With input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in
    Diffusion Models", arXiv 2301.11706; `--ip_noise_gamma`), the noise put into z_t is
    `noise + gamma * randn_like(latents)` while the training target keeps the plain `noise`.
    `--ip_noise_gamma_random_strength` draws gamma from U[0, ip_noise_gamma) each step.
    """
    if ip_noise_gamma:
        strength: float | torch.Tensor = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = _rand_scalar(generator, latents.device) * ip_noise_gamma
        noise = noise + strength * _randn(tuple(latents.shape), latents, generator)
    return scheduler.add_noise(latents, noise, timesteps)


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the U-Net must predict: `noise` (epsilon) or `v = sqrt(abar) n - sqrt(1 - abar) x0`.

    v-prediction: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
    Models", arXiv 2202.00512; computed by `scheduler.get_velocity`.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserInputError(
        f"The noise scheduler predicts {prediction_type!r}, which this trainer does not train; "
        "use a model whose scheduler predicts 'epsilon', or pass --v_parameterization for 'v_prediction'."
    )


def zero_terminal_snr_scheduler(scheduler: DDPMScheduler) -> DDPMScheduler:
    """A copy of `scheduler` whose betas are rescaled so that the SNR at the last timestep is 0.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv
    2305.08891, Algorithm 1 (sd-scripts' `--zero_terminal_snr`): shift sqrt(abar) so its last value
    is 0 and rescale it so its first value is unchanged. diffusers implements the same algorithm
    behind `rescale_betas_zero_snr=True`; the input scheduler is left as it is.
    """
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio `abar_t / (1 - abar_t)` per timestep, float32 on the timesteps' device.

    Note for compatibility: sd-scripts tabulates the SNR once, *before* `--zero_terminal_snr`
    rescales the betas, so its min-SNR and debiased weights keep the original schedule's SNR
    (never 0). Pass the un-rescaled scheduler here to reproduce that; pass the rescaled one for
    the SNR the model actually sees (0 at the last timestep).
    """
    return compute_snr(scheduler, timesteps.long()).float()  # diffusers' (alpha / sigma)^2


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weight `min(snr, gamma) / snr`, or `min(snr, gamma) / (snr + 1)` for v-prediction.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv
    2303.09556; sd-scripts' `apply_snr_weight` (`--min_snr_gamma`). For epsilon the weight is
    written `gamma / max(snr, gamma)`, equal for snr > 0 and 1 (its limit) at snr = 0, where the
    literal formula would give 0/0.
    """
    if gamma <= 0:
        raise UserInputError(f"--min_snr_gamma must be positive (the paper uses 5), got {gamma}.")
    if v_prediction:
        return torch.clamp(snr_t, max=gamma) / (snr_t + 1)
    return gamma / torch.clamp(snr_t, min=gamma)


def scale_v_pred_loss_like_noise_pred_weight(snr_t: torch.Tensor) -> torch.Tensor:
    """`snr / (snr + 1)` with snr capped at 1000: turns a v-prediction loss into an epsilon-like one.

    sd-scripts' `scale_v_prediction_loss_like_noise_prediction` (`--scale_v_pred_loss_like_noise_pred`).
    For one prediction, `||eps - eps_hat||^2 = snr / (snr + 1) * ||v - v_hat||^2`, so this weight
    turns the v loss into the epsilon loss of the same prediction.
    """
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return capped / (capped + 1)


def v_pred_like_loss_weight(snr_t: torch.Tensor, strength: float) -> torch.Tensor:
    """`1 + strength * (snr + 1) / snr` (snr in [SNR_FLOOR, 1000]): adds a v-like loss to an epsilon loss.

    sd-scripts' `add_v_prediction_like_loss` (`--v_pred_like_loss`) computes
    `loss + loss / scale * strength` with `scale = snr / (snr + 1)`, that is this factor times the
    loss: the epsilon loss plus `strength` times the v loss of the same prediction.
    """
    capped = torch.clamp(snr_t, min=SNR_FLOOR, max=SNR_CAP)
    return 1 + strength * (capped + 1) / capped


def debiased_estimation_weight(snr_t: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """`1 / sqrt(snr)`, or `1 / (snr + 1)` for v-prediction, with snr in [SNR_FLOOR, 1000].

    Yu et al. 2024, "Debias the Training of Diffusion Models", arXiv 2310.08442; sd-scripts'
    `apply_debiased_estimation` (`--debiased_estimation_loss`), which caps the SNR at 1000.
    """
    capped = torch.clamp(snr_t, min=SNR_FLOOR, max=SNR_CAP)
    if v_prediction:
        return 1 / (capped + 1)
    return 1 / torch.sqrt(capped)


def check_snr_weighting_flags(
    *, v_prediction: bool, scale_v_pred_loss_like_noise_pred: bool, v_pred_like_loss: float | None
) -> None:
    """Refuse the flag combinations sd-scripts refuses (its `verify_training_args`)."""
    if scale_v_pred_loss_like_noise_pred and not v_prediction:
        raise UserInputError(
            "--scale_v_pred_loss_like_noise_pred only applies to v-prediction; "
            "add --v_parameterization or drop it."
        )
    if v_pred_like_loss and v_prediction:
        raise UserInputError(
            f"--v_pred_like_loss {v_pred_like_loss} adds a v-like loss to an epsilon loss and cannot be "
            "used with --v_parameterization; drop one of them."
        )


def snr_loss_weight(
    snr_t: torch.Tensor,
    *,
    v_prediction: bool,
    min_snr_gamma: float | None = None,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: float | None = None,
    debiased_estimation_loss: bool = False,
) -> torch.Tensor:
    """The per-sample timestep weight (B,) of sd-scripts' `post_process_loss`, all flags multiplied.

    sd-scripts multiplies the per-sample loss by min-SNR, then the v-pred scale, then the v-like
    factor, then the debiased weight; all are factors, so their product is that. Ones when no flag
    is on. Falsy values (None, 0) turn a flag off, as in sd-scripts.
    """
    check_snr_weighting_flags(
        v_prediction=v_prediction,
        scale_v_pred_loss_like_noise_pred=scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=v_pred_like_loss,
    )
    weight = torch.ones_like(snr_t, dtype=torch.float32)
    if min_snr_gamma:
        weight = weight * min_snr_weight(snr_t, min_snr_gamma, v_prediction)
    if scale_v_pred_loss_like_noise_pred:
        weight = weight * scale_v_pred_loss_like_noise_pred_weight(snr_t)
    if v_pred_like_loss:
        weight = weight * v_pred_like_loss_weight(snr_t, v_pred_like_loss)
    if debiased_estimation_loss:
        weight = weight * debiased_estimation_weight(snr_t, v_prediction)
    return weight
