"""Flow-matching training (library.training.flow_matching): sd-scripts' FLUX formulas, and the run's
`Noising` chosen by the family's schedule."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from library.config.train_config import FlowMatchArgs, LossArgs, NoiseArgs
from library.training.flow_matching import (
    FlowMatchNoising,
    flux_mu,
    in_target_space,
    loss_weighting,
    noisy_latents,
    sample_sigmas,
    schedule_sigmas,
    shift_sigmas,
)
from library.training.train_batch import DiffusionNoising, noising_for

NOISE = NoiseArgs(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                  multires_noise_iterations=None, multires_noise_discount=0.3, ip_noise_gamma=None,
                  ip_noise_gamma_random_strength=False, zero_terminal_snr=False, min_timestep=None, max_timestep=None)
LOSS = LossArgs(loss_type="l2", huber_c=0.1, huber_scale=1.0, huber_schedule="constant", prior_loss_weight=1.0,
                min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
                debiased_estimation_loss=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_the_schedule_runs_from_one_down_to_one_step_and_shifts_towards_noise():
    plain = schedule_sigmas(1.0)
    assert plain[0] == 1.0 and plain[-1] == pytest.approx(0.001) and len(plain) == 1000
    shifted = schedule_sigmas(3.0)
    assert shifted[0] == 1.0 and bool((shifted[1:] > plain[1:]).all()), "shift > 1 moves every step towards noise"
    assert shift_sigmas(torch.tensor(0.5), 3.0) == pytest.approx(0.75)


def test_each_timestep_sampling_follows_its_formula():
    draws = torch.randn(8, generator=_gen())
    u = torch.sigmoid(2.0 * draws)
    args = FlowMatchArgs(sigmoid_scale=2.0, discrete_flow_shift=3.0)
    for mode, expected in (
        ("sigmoid", u),
        ("shift", 3.0 * u / (1 + 2.0 * u)),
        ("flux_shift", math.exp(flux_mu(1024)) / (math.exp(flux_mu(1024)) + (1 / u - 1))),
    ):
        got = sample_sigmas(8, replace(args, timestep_sampling=mode), 1024, _gen())
        assert torch.allclose(got, expected), mode
    uniform = sample_sigmas(8, replace(args, timestep_sampling="uniform"), 1024, _gen())
    assert torch.equal(uniform, torch.rand(8, generator=_gen()))


def test_flux_shift_grows_with_the_image_from_256_to_4096_tokens():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    args = FlowMatchArgs(timestep_sampling="flux_shift")
    small, large = (sample_sigmas(64, args, length, _gen()) for length in (256, 4096))
    assert bool((large > small).all()), "larger images are trained at more noise"


def test_default_sigma_sampling_draws_steps_of_the_shifted_schedule():
    args = FlowMatchArgs()  # sd-scripts' defaults: sigma, shift 3.0, uniform density
    got = sample_sigmas(256, args, 1024, _gen())
    schedule = schedule_sigmas(3.0)
    indices = (torch.rand(256, generator=_gen()) * 1000).long()
    assert torch.equal(got, schedule[indices])
    logit = sample_sigmas(256, replace(args, weighting_scheme="logit_normal", logit_mean=2.0), 1024, _gen())
    # The schedule runs from noise down (index 0 = sigma 1), so a density centred high draws late steps.
    assert logit.mean() < got.mean(), "a logit-normal density centred at 2 draws high indices: low sigmas"


def test_noisy_latents_run_in_a_straight_line_from_image_to_noise():
    x, noise = torch.randn(3, 16, 4, 4, generator=_gen(1)), torch.randn(3, 16, 4, 4, generator=_gen(2))
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    z = noisy_latents(x, noise, sigmas)
    assert torch.equal(z[0], noise[0]) and torch.equal(z[2], x[2])
    assert torch.allclose(z[1], (x[1] + noise[1]) / 2)


def test_prediction_types_move_the_output_as_sd_scripts_does():
    out, z = torch.randn(2, 4, 2, 2, generator=_gen(1)), torch.randn(2, 4, 2, 2, generator=_gen(2))
    sigmas = torch.tensor([0.25, 0.5])
    assert torch.equal(in_target_space(out, z, sigmas, "raw"), out)
    assert torch.equal(in_target_space(out, z, sigmas, "additive"), out + z)
    assert torch.allclose(in_target_space(out, z, sigmas, "sigma_scaled")[1], -0.5 * out[1] + z[1])
    with pytest.raises(ValueError, match="'eps'"):
        in_target_space(out, z, sigmas, "eps")


def test_loss_weighting_schemes():
    half = torch.tensor([0.5])
    assert loss_weighting("sigma_sqrt", half).item() == pytest.approx(4.0)
    assert loss_weighting("cosmap", half).item() == pytest.approx(4 / math.pi)
    assert loss_weighting("logit_normal", half).item() == 1.0


def _noised(args: FlowMatchArgs, noise_args: NoiseArgs = NOISE):
    latents = torch.randn(4, 16, 8, 8, generator=_gen(5))
    ids = torch.zeros(4, 77, dtype=torch.long)
    batch, loss_fn = FlowMatchNoising(args).batch(latents, ids, ids, torch.ones(4), noise_args, LOSS, _gen(7))
    return latents, batch, loss_fn


def test_a_batch_shares_one_draw_and_its_target_is_the_velocity():
    latents, batch, loss_fn = _noised(FlowMatchArgs(model_prediction_type="raw"))
    sigmas = batch.timesteps / 1000
    assert bool(((sigmas > 0) & (sigmas <= 1)).all())
    noise = batch.target + latents
    assert torch.allclose(batch.noisy_latents, FlowMatchNoising(FlowMatchArgs()).add_noise(latents, noise, batch.timesteps),
                          atol=1e-6), "z_t = (1 - sigma) x0 + sigma * noise with the target's noise"
    assert torch.equal(loss_fn(batch.target, batch.target), torch.zeros(4))
    assert bool((loss_fn(torch.zeros_like(latents), batch.target) > 0).all())


def test_sigma_scaled_loss_moves_the_output_and_weights_it():
    args = FlowMatchArgs(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    latents, batch, loss_fn = _noised(args)
    sigmas = batch.timesteps / 1000
    output = torch.randn(latents.shape, generator=_gen(9))
    moved = -sigmas.view(-1, 1, 1, 1) * output + batch.noisy_latents
    expected = (moved - batch.target).square().mean(dim=(1, 2, 3)) * sigmas**-2
    assert torch.allclose(loss_fn(output, batch.target), expected, rtol=1e-5)


def test_input_noise_gamma_perturbs_the_input_only():
    args = FlowMatchArgs(model_prediction_type="raw")
    latents, plain, _ = _noised(args)
    _, perturbed, _ = _noised(args, replace(NOISE, ip_noise_gamma=0.1))
    assert torch.equal(plain.target, perturbed.target) and torch.equal(plain.timesteps, perturbed.timesteps)
    assert not torch.equal(plain.noisy_latents, perturbed.noisy_latents)


def test_the_family_schedule_picks_the_noising():
    flow = noising_for(FlowMatchEulerDiscreteScheduler(shift=3.0), NOISE, FlowMatchArgs())
    assert isinstance(flow, FlowMatchNoising) and flow.num_train_timesteps == 1000
    ddpm = DDPMScheduler(beta_schedule="scaled_linear")
    plain = noising_for(ddpm, NOISE, FlowMatchArgs())
    assert isinstance(plain, DiffusionNoising) and plain.schedule.train is ddpm
    zero_snr = noising_for(ddpm, replace(NOISE, zero_terminal_snr=True), FlowMatchArgs())
    assert zero_snr.schedule.weights is ddpm and zero_snr.schedule.train.alphas_cumprod[-1] == 0
