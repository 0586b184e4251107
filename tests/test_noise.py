"""Noise, timesteps, noisy latents, targets and SNR weights against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.errors import UserInputError
from library.training.noise import (
    SNR_CAP,
    SNR_FLOOR,
    debiased_estimation_weight,
    min_snr_weight,
    noisy_latents,
    offset_noise,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    scale_v_pred_loss_like_noise_pred_weight,
    snr,
    snr_loss_weight,
    training_target,
    v_pred_like_loss_weight,
    zero_terminal_snr_scheduler,
)

SHAPE = (2, 4, 8, 8)


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The SD1/SD2 training schedule, as sd-scripts builds it."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents_fixture(seed: int = 123) -> torch.Tensor:
    return torch.randn(SHAPE, generator=gen(seed)) + 0.5


# --- timesteps ---------------------------------------------------------------------------------


def test_sample_timesteps_range_shape_and_dtype() -> None:
    t = sample_timesteps(4096, 100, 200, 1000, "cpu", generator=gen())
    assert t.shape == (4096,) and t.dtype == torch.long
    assert int(t.min()) == 100 and int(t.max()) == 199  # max is exclusive, both ends reached


def test_sample_timesteps_defaults_cover_the_whole_schedule() -> None:
    t = sample_timesteps(20000, None, None, 1000, "cpu", generator=gen())
    assert int(t.min()) == 0 and int(t.max()) == 999


def test_sample_timesteps_reproducible_with_generator_and_global_seed() -> None:
    a = sample_timesteps(16, None, None, 1000, "cpu", generator=gen(7))
    b = sample_timesteps(16, None, None, 1000, "cpu", generator=gen(7))
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randint(0, 1000, (16,), generator=gen(7)))
    torch.manual_seed(3)
    c = sample_timesteps(16, None, None, 1000, "cpu")
    torch.manual_seed(3)
    d = sample_timesteps(16, None, None, 1000, "cpu")
    assert torch.equal(c, d)


def test_sample_timesteps_min_equal_max_gives_that_timestep() -> None:
    assert torch.equal(sample_timesteps(3, 500, 500, 1000, "cpu"), torch.tensor([500, 500, 500]))


@pytest.mark.parametrize(("low", "high"), [(-1, 10), (10, 1001), (600, 500), (1000, 1000)])
def test_sample_timesteps_out_of_range_is_a_user_error(low: int, high: int) -> None:
    with pytest.raises(UserInputError, match="--min_timestep"):
        sample_timesteps(2, low, high, 1000, "cpu")


# --- noise -------------------------------------------------------------------------------------


def test_plain_noise_is_the_generator_stream() -> None:
    latents = latents_fixture()
    noise = sample_noise(latents, generator=gen(5))
    assert noise.shape == SHAPE and noise.dtype == latents.dtype
    assert torch.equal(noise, torch.randn(SHAPE, generator=gen(5)))
    assert torch.equal(noise, sample_noise(latents, generator=gen(5)))
    assert not torch.equal(noise, sample_noise(latents, generator=gen(6)))


def test_noise_keeps_half_precision_dtype_and_same_values() -> None:
    latents = latents_fixture().half()
    noise = sample_noise(latents, generator=gen(5))
    assert noise.dtype == torch.float16
    assert torch.equal(noise, torch.randn(SHAPE, generator=gen(5)).half())


def test_noise_offset_adds_a_per_channel_constant() -> None:
    latents = latents_fixture()
    plain = sample_noise(latents, generator=gen(1))
    shifted = sample_noise(latents, noise_offset=0.1, generator=gen(1))
    diff = shifted - plain
    per_channel = diff[:, :, :1, :1]
    assert torch.allclose(diff, per_channel.expand_as(diff), atol=1e-6)
    assert per_channel.flatten().unique().numel() == SHAPE[0] * SHAPE[1]  # one constant per (b, c)
    g = gen(1)
    torch.randn(SHAPE, generator=g)
    expected = 0.1 * torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=g)
    assert torch.allclose(per_channel, expected, atol=1e-6)


def test_noise_offset_random_strength_scales_by_a_uniform_draw() -> None:
    latents = latents_fixture()
    noisy = sample_noise(latents, noise_offset=0.2, noise_offset_random_strength=True, generator=gen(2))
    g = gen(2)
    plain = torch.randn(SHAPE, generator=g)
    strength = torch.rand(1, generator=g) * 0.2
    expected = plain + strength * torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=g)
    assert torch.allclose(noisy, expected, atol=1e-6)


def test_adaptive_noise_scale_adds_the_latent_mean_to_the_offset() -> None:
    latents = latents_fixture()
    noisy = sample_noise(latents, noise_offset=0.1, adaptive_noise_scale=0.5, generator=gen(3))
    g = gen(3)
    plain = torch.randn(SHAPE, generator=g)
    offset = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    expected = plain + offset * torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=g)
    assert torch.allclose(noisy, expected, atol=1e-6)


def test_negative_adaptive_offset_is_clamped_to_zero() -> None:
    latents = latents_fixture()
    noisy = sample_noise(latents, noise_offset=0.1, adaptive_noise_scale=-100.0, generator=gen(3))
    assert torch.equal(noisy, torch.randn(SHAPE, generator=gen(3)))


def test_adaptive_noise_scale_without_offset_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="--noise_offset"):
        sample_noise(latents_fixture(), adaptive_noise_scale=0.5)


def test_multires_noise_has_unit_std_and_spatial_correlation() -> None:
    latents = torch.zeros(4, 4, 64, 64)
    white = sample_noise(latents, generator=gen(0))
    pyramid = sample_noise(latents, multires_noise_iterations=6, multires_noise_discount=0.8, generator=gen(0))
    assert abs(float(pyramid.std()) - 1.0) < 1e-5
    default_discount = sample_noise(latents, multires_noise_iterations=6, generator=gen(0))
    assert abs(float(default_discount.std()) - 1.0) < 1e-5

    def neighbour_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(pyramid) > 0.1


def test_pyramid_noise_levels_by_hand() -> None:
    """Level 0 adds a full-resolution draw; level 1 a bilinear-upsampled coarse one times discount."""
    noise = torch.randn(SHAPE, generator=gen(10))
    before = noise.clone()
    result = pyramid_noise(noise, iterations=2, discount=0.3, generator=gen(11))
    assert torch.equal(noise, before)  # input untouched
    g = gen(11)
    torch.rand(1, generator=g)  # r of level 0 (r**0 = 1)
    total = noise + torch.randn(SHAPE, generator=g)
    r = float(torch.rand(1, generator=g)) * 2 + 2
    coarse_h, coarse_w = max(1, int(8 / r)), max(1, int(8 / r))
    coarse = torch.randn((2, 4, coarse_h, coarse_w), generator=g)
    total = total + F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False) * 0.3
    assert torch.allclose(result, total / total.std(), atol=1e-6)


def test_pyramid_noise_stops_at_one_pixel() -> None:
    """On an 8x8 latent r**i exceeds 8 by level 3 at the latest: more iterations change nothing."""
    noise = torch.randn(SHAPE, generator=gen(10))
    assert torch.equal(pyramid_noise(noise, 4, 0.3, gen(12)), pyramid_noise(noise, 50, 0.3, gen(12)))


def test_offset_and_multires_are_both_applied_offset_first() -> None:
    latents = latents_fixture()
    both = sample_noise(
        latents, noise_offset=0.1, multires_noise_iterations=3, multires_noise_discount=0.4, generator=gen(4)
    )
    g = gen(4)
    plain = torch.randn(SHAPE, generator=g)
    expected = pyramid_noise(offset_noise(latents, plain, 0.1, generator=g), 3, 0.4, generator=g)
    assert torch.allclose(both, expected, atol=1e-6)
    multires_only = sample_noise(
        latents, multires_noise_iterations=3, multires_noise_discount=0.4, generator=gen(4)
    )
    assert not torch.allclose(both, multires_only)


def test_zero_flags_turn_features_off() -> None:
    latents = latents_fixture()
    plain = sample_noise(latents, generator=gen(9))
    off = sample_noise(latents, noise_offset=0.0, multires_noise_iterations=0, generator=gen(9))
    assert torch.equal(off, plain)


# --- noisy latents and targets -----------------------------------------------------------------


def test_noisy_latents_is_the_ddpm_forward_process() -> None:
    scheduler = sd_scheduler()
    x0, noise = latents_fixture(), torch.randn(SHAPE, generator=gen(1))
    t = torch.tensor([10, 900])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(noisy_latents(scheduler, x0, noise, t), expected, atol=1e-6)


def test_input_perturbation_adds_gamma_times_fresh_noise() -> None:
    scheduler = sd_scheduler()
    x0, noise = latents_fixture(), torch.randn(SHAPE, generator=gen(1))
    t = torch.tensor([10, 900])
    z = noisy_latents(scheduler, x0, noise, t, ip_noise_gamma=0.1, generator=gen(2))
    perturbation = torch.randn(SHAPE, generator=gen(2))
    assert torch.allclose(z, scheduler.add_noise(x0, noise + 0.1 * perturbation, t), atol=1e-6)
    assert not torch.allclose(z, noisy_latents(scheduler, x0, noise, t))


def test_input_perturbation_random_strength() -> None:
    scheduler = sd_scheduler()
    x0, noise = latents_fixture(), torch.randn(SHAPE, generator=gen(1))
    t = torch.tensor([10, 900])
    z = noisy_latents(
        scheduler, x0, noise, t, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, generator=gen(2)
    )
    g = gen(2)
    strength = torch.rand(1, generator=g) * 0.1
    expected = scheduler.add_noise(x0, noise + strength * torch.randn(SHAPE, generator=g), t)
    assert torch.allclose(z, expected, atol=1e-6)


def test_epsilon_target_is_the_noise() -> None:
    x0, noise = latents_fixture(), torch.randn(SHAPE, generator=gen(1))
    assert training_target(sd_scheduler(), x0, noise, torch.tensor([1, 2])) is noise


def test_v_prediction_target_by_hand() -> None:
    scheduler = sd_scheduler("v_prediction")
    x0, noise = latents_fixture(), torch.randn(SHAPE, generator=gen(1))
    t = torch.tensor([0, 999])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    target = training_target(scheduler, x0, noise, t)
    assert torch.allclose(target, expected, atol=1e-6)
    assert not torch.allclose(target, noise)


def test_unknown_prediction_type_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="'sample'"):
        training_target(sd_scheduler("sample"), latents_fixture(), latents_fixture(), torch.tensor([1, 2]))


# --- zero terminal SNR and SNR -----------------------------------------------------------------


def test_zero_terminal_snr_matches_lin_et_al_algorithm_1() -> None:
    base = sd_scheduler("v_prediction")
    before = base.alphas_cumprod.clone()
    fixed = zero_terminal_snr_scheduler(base)
    assert float(fixed.alphas_cumprod[-1]) == 0.0
    assert torch.equal(base.alphas_cumprod, before)  # input untouched
    assert fixed.config.prediction_type == "v_prediction"

    root = before.double().sqrt()
    rescaled = (root - root[-1]) * root[0] / (root[0] - root[-1])
    assert torch.allclose(fixed.alphas_cumprod.double(), rescaled**2, atol=1e-6)
    assert math.isclose(float(fixed.alphas_cumprod[0]), float(before[0]), rel_tol=1e-6)


def test_snr_by_hand_and_zero_at_the_end_of_a_zero_terminal_schedule() -> None:
    scheduler = sd_scheduler()
    t = torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod[t]
    assert torch.allclose(snr(scheduler, t), abar / (1 - abar), rtol=1e-6)
    assert math.isclose(float(snr(scheduler, torch.tensor([999]))), 0.004682, rel_tol=1e-3)
    assert float(snr(zero_terminal_snr_scheduler(scheduler), torch.tensor([999]))) == 0.0


# --- timestep weights --------------------------------------------------------------------------


def test_min_snr_weight_at_known_snrs() -> None:
    s = torch.tensor([0.5, 5.0, 20.0])
    assert torch.allclose(min_snr_weight(s, 5.0, v_prediction=False), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.allclose(min_snr_weight(s, 5.0, v_prediction=True), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))


def test_min_snr_weight_is_finite_at_zero_snr() -> None:
    zero = torch.tensor([0.0])
    assert float(min_snr_weight(zero, 5.0, v_prediction=False)) == 1.0
    assert float(min_snr_weight(zero, 5.0, v_prediction=True)) == 0.0


def test_min_snr_gamma_must_be_positive() -> None:
    with pytest.raises(UserInputError, match="--min_snr_gamma"):
        min_snr_weight(torch.tensor([1.0]), 0.0, v_prediction=False)


def test_scale_v_pred_weight() -> None:
    s = torch.tensor([0.0, 1.0, 3.0, 1e6])
    expected = torch.tensor([0.0, 0.5, 0.75, SNR_CAP / (SNR_CAP + 1)])
    assert torch.allclose(scale_v_pred_loss_like_noise_pred_weight(s), expected)


def test_v_pred_like_loss_weight_equals_sd_scripts_sum() -> None:
    s = torch.tensor([1.0, 4.0])
    loss = torch.tensor([2.0, 3.0])
    scale = s / (s + 1)
    assert torch.allclose(loss * v_pred_like_loss_weight(s, 0.5), loss + loss / scale * 0.5)
    assert torch.allclose(v_pred_like_loss_weight(s, 0.5), torch.tensor([2.0, 1.625]))
    at_zero = v_pred_like_loss_weight(torch.tensor([0.0]), 0.5)
    assert math.isclose(float(at_zero), 1 + 0.5 * (SNR_FLOOR + 1) / SNR_FLOOR, rel_tol=1e-5)


def test_debiased_estimation_weight() -> None:
    s = torch.tensor([4.0, 1e6])
    assert torch.allclose(debiased_estimation_weight(s, v_prediction=False), torch.tensor([0.5, SNR_CAP**-0.5]))
    assert torch.allclose(debiased_estimation_weight(s, v_prediction=True), torch.tensor([0.2, 1 / (SNR_CAP + 1)]))
    at_zero = debiased_estimation_weight(torch.tensor([0.0]), v_prediction=False)
    assert torch.isfinite(at_zero).all() and math.isclose(float(at_zero), SNR_FLOOR**-0.5, rel_tol=1e-5)


def test_floor_leaves_every_snr_of_the_sd_schedule_alone() -> None:
    all_snr = snr(sd_scheduler(), torch.arange(1000))
    assert float(all_snr.min()) > SNR_FLOOR


def test_snr_loss_weight_is_one_without_flags_and_the_product_with_them() -> None:
    s = torch.tensor([0.5, 20.0])
    assert torch.equal(snr_loss_weight(s, v_prediction=False, min_snr_gamma=0), torch.ones(2))
    combined = snr_loss_weight(
        s, v_prediction=True, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True
    )
    expected = min_snr_weight(s, 5.0, True)
    expected = expected * scale_v_pred_loss_like_noise_pred_weight(s) * debiased_estimation_weight(s, True)
    assert torch.allclose(combined, expected)
    eps = snr_loss_weight(s, v_prediction=False, min_snr_gamma=5.0, v_pred_like_loss=0.2)
    assert torch.allclose(eps, min_snr_weight(s, 5.0, False) * v_pred_like_loss_weight(s, 0.2))


def test_snr_loss_weight_refuses_sd_scripts_conflicts() -> None:
    s = torch.tensor([1.0])
    with pytest.raises(UserInputError, match="--scale_v_pred_loss_like_noise_pred"):
        snr_loss_weight(s, v_prediction=False, scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(UserInputError, match="--v_pred_like_loss"):
        snr_loss_weight(s, v_prediction=True, v_pred_like_loss=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_gives_the_same_noise_on_gpu() -> None:
    latents = latents_fixture()
    cpu = sample_noise(latents, noise_offset=0.1, multires_noise_iterations=4, generator=gen(8))
    gpu = sample_noise(latents.cuda(), noise_offset=0.1, multires_noise_iterations=4, generator=gen(8))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
    t = sample_timesteps(8, None, None, 1000, "cuda", generator=gen(8))
    assert t.device.type == "cuda"
    assert torch.equal(t.cpu(), sample_timesteps(8, None, None, 1000, "cpu", generator=gen(8)))
