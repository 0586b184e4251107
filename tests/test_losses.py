"""Per-sample losses (l1, l2, huber, smooth_l1), Huber schedules and the weighted batch mean."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from library.errors import UserInputError
from library.training.losses import elementwise_loss, huber_threshold, per_sample_loss, weighted_mean
from library.training.noise import zero_terminal_snr_scheduler


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )


PRED = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
ZERO = torch.zeros(2, 2)


def test_l2_and_l1_by_hand() -> None:
    assert torch.equal(per_sample_loss(PRED, ZERO, "l2"), torch.tensor([2.5, 12.5]))
    assert torch.equal(per_sample_loss(PRED, ZERO, "l1"), torch.tensor([1.5, 3.5]))


def test_per_sample_loss_reduces_every_non_batch_dim() -> None:
    pred = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    target = torch.zeros_like(pred)
    loss = per_sample_loss(pred, target, "l2")
    assert loss.shape == (3,)
    assert torch.allclose(loss, (pred**2).mean(dim=(1, 2, 3)))
    assert per_sample_loss(torch.tensor([1.0, 3.0]), torch.zeros(2)).tolist() == [1.0, 9.0]


def test_per_sample_loss_is_float32_and_backpropagates_to_the_prediction() -> None:
    pred = PRED.clone().half().requires_grad_(True)
    loss = per_sample_loss(pred, ZERO.half(), "l2")
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert torch.allclose(pred.grad.float(), 2 * PRED / 2)  # d/dp mean(p^2) over 2 elements = p


def test_l2_compares_any_two_predictions_symmetrically() -> None:
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(per_sample_loss(a, b), per_sample_loss(b, a))


def test_constant_huber_by_hand() -> None:
    pred, target = torch.tensor([[3.0], [0.0]]), torch.zeros(2, 1)
    t = torch.tensor([0, 999])
    loss = per_sample_loss(pred, target, "huber", huber_c=0.5, huber_scale=2.0, huber_schedule="constant", timesteps=t)
    assert torch.allclose(loss, torch.tensor([2 * 1.0 * (math.sqrt(9 + 1) - 1), 0.0]))
    smooth = per_sample_loss(
        pred, target, "smooth_l1", huber_c=0.5, huber_scale=2.0, huber_schedule="constant", timesteps=t
    )
    assert torch.allclose(smooth, torch.tensor([2 * (math.sqrt(10) - 1), 0.0]))


def test_huber_with_tiny_c_is_2c_times_l1_and_with_large_c_is_l2() -> None:
    t = torch.tensor([0, 0])
    tiny = per_sample_loss(PRED, ZERO, "huber", huber_c=1e-4, huber_schedule="constant", timesteps=t)
    l1 = per_sample_loss(PRED, ZERO, "l1")
    assert torch.allclose(tiny, 2e-4 * l1, rtol=1e-3)
    large = per_sample_loss(PRED, ZERO, "huber", huber_c=1e3, huber_schedule="constant", timesteps=t)
    assert torch.allclose(large, per_sample_loss(PRED, ZERO, "l2"), rtol=1e-3)
    smooth_tiny = per_sample_loss(PRED, ZERO, "smooth_l1", huber_c=1e-4, huber_schedule="constant", timesteps=t)
    assert torch.allclose(smooth_tiny, 2 * l1, rtol=1e-3)


def test_exponential_threshold_runs_from_scale_to_c_times_scale() -> None:
    t = torch.tensor([0, 500, 1000])
    c = huber_threshold(t, sd_scheduler(), huber_c=0.1, huber_scale=2.0, huber_schedule="exponential")
    assert torch.allclose(c, torch.tensor([2.0, 2.0 * math.sqrt(0.1), 0.2]))


def test_snr_threshold_by_hand_without_huber_scale() -> None:
    scheduler = sd_scheduler()
    t = torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    expected = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
    c = huber_threshold(t, scheduler, huber_c=0.1, huber_scale=5.0, huber_schedule="snr")
    assert torch.allclose(c, expected)
    assert float(c[0]) > 0.9 and float(c[2]) < 0.11


def test_snr_threshold_is_huber_c_at_zero_terminal_snr() -> None:
    c = huber_threshold(torch.tensor([999]), zero_terminal_snr_scheduler(sd_scheduler()), huber_c=0.1)
    assert torch.isfinite(c).all() and math.isclose(float(c), 0.1, rel_tol=1e-6)


def test_scheduled_huber_uses_each_samples_own_threshold() -> None:
    scheduler = sd_scheduler()
    pred = torch.full((2, 4), 2.0)
    t = torch.tensor([0, 999])
    loss = per_sample_loss(pred, torch.zeros(2, 4), "huber", timesteps=t, scheduler=scheduler)
    c = huber_threshold(t, scheduler)
    assert torch.allclose(loss, 2 * c * (torch.sqrt(4 + c**2) - c))
    assert not math.isclose(float(loss[0]), float(loss[1]))


def test_elementwise_loss_keeps_the_shape() -> None:
    pred = torch.randn(2, 3, 4)
    out = elementwise_loss(pred, torch.zeros_like(pred), "huber", torch.tensor([0.1, 1.0]))
    assert out.shape == pred.shape
    assert torch.allclose(out[1], 2 * (torch.sqrt(pred[1] ** 2 + 1) - 1))


@pytest.mark.parametrize("loss_type", ["mse", "L2", "huberr", ""])
def test_unknown_loss_type_is_a_user_error(loss_type: str) -> None:
    with pytest.raises(UserInputError, match="--loss_type"):
        per_sample_loss(PRED, ZERO, loss_type)


def test_bad_huber_options_are_user_errors() -> None:
    t = torch.tensor([0, 1])
    with pytest.raises(UserInputError, match="--huber_schedule"):
        per_sample_loss(PRED, ZERO, "huber", huber_schedule="linear", timesteps=t)
    with pytest.raises(UserInputError, match="--huber_c"):
        per_sample_loss(PRED, ZERO, "smooth_l1", huber_c=0.0, huber_schedule="constant", timesteps=t)


def test_l2_ignores_huber_options() -> None:
    assert torch.equal(per_sample_loss(PRED, ZERO, "l2", huber_schedule="whatever"), torch.tensor([2.5, 12.5]))


def test_programming_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        per_sample_loss(PRED, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="timesteps"):
        per_sample_loss(PRED, ZERO, "huber")
    with pytest.raises(ValueError, match="scheduler"):
        per_sample_loss(PRED, ZERO, "huber", timesteps=torch.tensor([0, 1]), huber_schedule="snr")


def test_weighted_mean_is_the_plain_batch_mean_of_weighted_losses() -> None:
    per_sample = torch.tensor([1.0, 2.0, 3.0])
    weights = torch.tensor([1.0, 0.5, 2.0])
    assert math.isclose(float(weighted_mean(per_sample, weights)), (1 + 1 + 6) / 3, rel_tol=1e-6)
    assert math.isclose(float(weighted_mean(per_sample, torch.ones(3))), 2.0)
    with pytest.raises(ValueError, match="shape"):
        weighted_mean(per_sample, torch.ones(2))
