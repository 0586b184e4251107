"""--lr_scheduler and friends: the lr curve per optimizer step, sd-scripts' special cases, logging keys."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers

from library.errors import UserInputError
from library.training.lr_schedulers import build_lr_scheduler, current_learning_rates, resolve_step_count
from library.training.optimizers import build_optimizer

BASE_LR = 1.0
STEPS = 10


def _optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _curve(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int = STEPS) -> list[float]:
    """The lr used at optimizer steps 0..steps, stepping the scheduler once per optimizer step."""
    lrs = []
    for _ in range(steps + 1):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def _build(name: str, **kwargs: object) -> torch.optim.lr_scheduler.LRScheduler:
    return build_lr_scheduler(_optimizer(), name, num_training_steps=STEPS, **kwargs)


@pytest.mark.parametrize("warmup", [2, 0.2, 2.0])
def test_linear_with_warmup_as_steps_or_ratio(warmup: int | float) -> None:
    lrs = _curve(_build("linear", warmup_steps=warmup))
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 6: 0.5, 8: 0.25, 10: 0.0}
    assert {k: lrs[k] for k in expected} == pytest.approx(expected)


def test_cosine_without_warmup() -> None:
    lrs = _curve(_build("cosine"))
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_warmup_ratio() -> None:
    lrs = _curve(_build("Cosine", warmup_steps=0.25))  # int(0.25 * 10) = 2 steps, as sd-scripts
    assert lrs[1] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5)


def test_constant_with_warmup() -> None:
    lrs = _curve(_build("constant_with_warmup", warmup_steps=4))
    assert lrs[:6] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[10] == pytest.approx(1.0)


def test_cosine_with_restarts_restarts_num_cycles_times() -> None:
    lrs = _curve(_build("cosine_with_restarts", num_cycles=2))
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert lrs[5] == pytest.approx(1.0), "the second cycle starts at full lr"
    assert lrs[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


def test_polynomial_uses_power_and_warmup() -> None:
    lrs = _curve(_build("polynomial", warmup_steps=2, power=2.0))
    lr_end = 1e-7  # transformers' default
    for step in (2, 4, 6, 10):
        remaining = 1 - (step - 2) / (STEPS - 2)
        assert lrs[step] == pytest.approx((BASE_LR - lr_end) * remaining**2 + lr_end)
    assert lrs[1] == pytest.approx(0.5)


def test_default_power_is_linear_decay() -> None:
    lrs = _curve(_build("polynomial"))
    assert lrs[5] == pytest.approx(0.5, abs=1e-6)


def test_each_group_keeps_its_own_peak_lr() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 5e-5}])
    scheduler = build_lr_scheduler(optimizer, "linear", num_training_steps=STEPS, warmup_steps=2)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.5e-4, 2.5e-5])


def test_constant_refuses_warmup_like_sd_scripts() -> None:
    with pytest.raises(UserInputError, match="--lr_scheduler constant takes no warmup.*constant_with_warmup"):
        _build("constant", warmup_steps=5)
    assert _curve(_build("constant", warmup_steps=0)) == pytest.approx([1.0] * (STEPS + 1))


def test_warmup_ratio_of_zero_is_allowed_with_constant() -> None:
    assert _curve(_build("constant", warmup_steps=0.0))[0] == pytest.approx(1.0)


@pytest.mark.parametrize("warmup", [-1, 1.5, True, "10"])
def test_bad_warmup_values_are_user_errors(warmup: object) -> None:
    with pytest.raises(UserInputError, match="--lr_warmup_steps"):
        _build("linear", warmup_steps=warmup)


def test_resolve_step_count_follows_sd_scripts_int_of_ratio() -> None:
    assert resolve_step_count(0.05, 1000, "--lr_warmup_steps") == 50
    assert resolve_step_count(0.333, 10, "--lr_warmup_steps") == 3
    assert resolve_step_count(100, 10, "--lr_warmup_steps") == 100
    assert resolve_step_count(100.0, 10, "--lr_warmup_steps") == 100


def test_adafactor_scheduler_needs_the_adafactor_optimizer() -> None:
    with pytest.raises(UserInputError, match="--lr_scheduler adafactor only works with --optimizer_type Adafactor"):
        _build("adafactor")


def test_adafactor_scheduler_needs_relative_step() -> None:
    optimizer, _ = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "lr": 1e-3}],
                                   "Adafactor", 1e-3, {"relative_step": False})
    with pytest.raises(UserInputError, match="relative_step=True"):
        build_lr_scheduler(optimizer, "adafactor", num_training_steps=STEPS)


def test_adafactor_with_relative_step_always_gets_the_adafactor_schedule() -> None:
    param = torch.nn.Parameter(torch.randn(4, 4))
    optimizer, _ = build_optimizer([{"params": [param], "lr": 1e-3}], "Adafactor", 1e-3, {})
    scheduler = build_lr_scheduler(optimizer, "cosine", num_training_steps=STEPS, learning_rate=1e-3)
    assert isinstance(scheduler, transformers.optimization.AdafactorSchedule)
    assert scheduler.get_last_lr() == pytest.approx([1e-3]), "before the first step it reports --learning_rate"
    param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] != pytest.approx(1e-3), "after a step it reports Adafactor's own step size"


def test_adafactor_with_relative_step_refuses_warmup() -> None:
    optimizer, _ = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "lr": 1e-3}],
                                   "Adafactor", 1e-3, {})
    with pytest.raises(UserInputError, match="takes no warmup"):
        build_lr_scheduler(optimizer, "adafactor", num_training_steps=STEPS, warmup_steps=2)


def test_cosine_with_min_lr_ends_at_the_ratio_and_needs_one() -> None:
    lrs = _curve(_build("cosine_with_min_lr", min_lr_ratio=0.1))
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(1.0)
    with pytest.raises(UserInputError, match="--lr_scheduler_min_lr_ratio"):
        _build("cosine_with_min_lr")
    assert _curve(_build("cosine_with_min_lr", scheduler_args={"min_lr": 0.2}))[10] == pytest.approx(0.2)


def test_warmup_stable_decay_uses_warmup_decay_and_the_rest_as_stable() -> None:
    lrs = _curve(_build("warmup_stable_decay", warmup_steps=2, decay_steps=4, min_lr_ratio=0.0))
    assert lrs[1] == pytest.approx(0.5)
    assert lrs[2:7] == pytest.approx([1.0] * 5)
    assert lrs[8] == pytest.approx(0.5)  # half-way through a cosine decay
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserInputError, match="add up to more than the 10 training steps"):
        _build("warmup_stable_decay", warmup_steps=6, decay_steps=6)


def test_inverse_sqrt_after_warmup() -> None:
    lrs = _curve(_build("inverse_sqrt", warmup_steps=4, timescale=4))
    assert lrs[2] == pytest.approx(0.5)
    shift = 4 - 4  # transformers: timescale - warmup
    assert lrs[8] == pytest.approx(1 / math.sqrt((8 + shift) / 4))


def test_piecewise_constant_uses_step_rules_and_requires_them() -> None:
    lrs = _curve(_build("piecewise_constant", scheduler_args={"step_rules": "1:3,0.1:6,0.01"}))
    assert lrs[:8] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(UserInputError, match="step_rules="):
        _build("piecewise_constant")


def test_scheduler_args_reach_the_schedule_and_cannot_repeat_a_flag() -> None:
    lrs = _curve(_build("polynomial", scheduler_args={"lr_end": 0.5}))
    assert lrs[10] == pytest.approx(0.5)
    with pytest.raises(UserInputError, match="--lr_scheduler_args num_cycles=3 repeats"):
        _build("cosine_with_restarts", scheduler_args={"num_cycles": 3})
    with pytest.raises(UserInputError, match="--lr_scheduler_args"):
        _build("linear", scheduler_args={"bogus": 1})


def test_unknown_scheduler_name_lists_the_choices() -> None:
    with pytest.raises(UserInputError, match="--lr_scheduler 'cosin' is not a known schedule.*cosine_with_restarts"):
        _build("cosin")


@pytest.mark.parametrize("scheduler_type", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_lr_scheduler_type_builds_a_class_with_lr_scheduler_args(scheduler_type: str) -> None:
    scheduler = _build("cosine", scheduler_type=scheduler_type, scheduler_args={"step_size": 2, "gamma": 0.5})
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert _curve(scheduler, 4) == pytest.approx([1, 1, 0.5, 0.5, 0.25])


def test_lr_scheduler_type_errors_name_the_flag() -> None:
    with pytest.raises(UserInputError, match="--lr_scheduler_type StepLR gets only --lr_scheduler_args"):
        _build("constant", scheduler_type="StepLR", scheduler_args={"step_size": 2}, warmup_steps=3)
    with pytest.raises(UserInputError, match="--lr_scheduler_type 'StepLr' is not a class"):
        _build("constant", scheduler_type="StepLr")
    with pytest.raises(UserInputError, match="--lr_scheduler_type StepLR could not be built"):
        _build("constant", scheduler_type="StepLR")  # step_size is required
    with pytest.raises(UserInputError, match="module 'nope.sched' cannot be imported"):
        _build("constant", scheduler_type="nope.sched.Cls")


def test_training_steps_must_be_positive() -> None:
    with pytest.raises(UserInputError, match="--max_train_steps"):
        build_lr_scheduler(_optimizer(), "linear", num_training_steps=0)


class _FakeScheduleFree(torch.optim.SGD):
    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass


def test_schedule_free_optimizer_gets_a_constant_schedule_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    optimizer = _FakeScheduleFree([torch.nn.Parameter(torch.zeros(2))], lr=0.3)
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        scheduler = build_lr_scheduler(optimizer, "cosine", num_training_steps=STEPS, warmup_steps=2)
    assert _curve(scheduler) == pytest.approx([0.3] * (STEPS + 1))
    assert "--lr_scheduler cosine and --lr_warmup_steps 2 are ignored" in caplog.text


def test_current_learning_rates_uses_the_network_descriptions() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 5e-5}, {"params": [params[1]], "lr": 1e-4}])
    scheduler = build_lr_scheduler(optimizer, "constant", num_training_steps=STEPS)
    assert current_learning_rates(scheduler, ["textencoder", "unet"]) == pytest.approx(
        {"lr/textencoder": 5e-5, "lr/unet": 1e-4}
    )
    assert set(current_learning_rates(scheduler, None)) == {"lr/group0", "lr/group1"}


def test_current_learning_rates_adds_d_times_lr_for_adaptive_optimizers() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    optimizer.param_groups[0]["d"] = 2e-6  # D-Adaptation and Prodigy keep their estimate here
    scheduler = build_lr_scheduler(optimizer, "linear", num_training_steps=STEPS, warmup_steps=2)
    optimizer.step()
    scheduler.step()
    assert current_learning_rates(scheduler, ["unet"]) == pytest.approx({"lr/unet": 0.5, "lr/d*lr/unet": 1e-6})
