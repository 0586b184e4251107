"""--optimizer_type / --optimizer_args: sd-scripts' names, defaults, special cases, display names and errors."""

from __future__ import annotations

import logging
import sys
import types

import bitsandbytes as bnb
import pytest
import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer

from library.errors import UserInputError
from library.training.optimizers import (
    build_optimizer,
    is_schedule_free,
    optimizer_eval_mode,
    set_optimizer_mode,
)

EIGHT_BIT_ELEMENTS = 64 * 80  # above bitsandbytes' min_8bit_size (4096): the state really is 8-bit


def _groups(seed: int = 0) -> list[dict]:
    """Two groups as a network gives them: a large "unet" tensor and a small "textencoder" one."""
    generator = torch.Generator().manual_seed(seed)
    unet = torch.nn.Parameter(torch.randn(64, 80, generator=generator))
    text_encoder = torch.nn.Parameter(torch.randn(8, 8, generator=generator))
    return [{"params": [text_encoder], "lr": 5e-3}, {"params": [unet], "lr": 1e-2}]


def _step_changes_every_parameter(optimizer: torch.optim.Optimizer) -> bool:
    """One optimizer step on random gradients; True when every parameter moved."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return all(not torch.equal(old, p.detach()) for old, p in zip(before, params))


@pytest.mark.parametrize(
    ("optimizer_type", "expected_class"),
    [
        ("AdamW", torch.optim.AdamW),
        ("adamw8bit", bnb.optim.AdamW8bit),
        ("PagedAdamW", bnb.optim.PagedAdamW),
        ("PagedAdamW8bit", bnb.optim.PagedAdamW8bit),
        ("PAGEDADAMW32BIT", bnb.optim.PagedAdamW32bit),
        ("Lion8bit", bnb.optim.Lion8bit),
        ("PagedLion8bit", bnb.optim.PagedLion8bit),
        ("SGDNesterov8bit", bnb.optim.SGD8bit),
        ("SGDNesterov", torch.optim.SGD),
        ("RAdam", torch.optim.RAdam),
        ("radam", torch.optim.RAdam),
        ("torch.optim.RAdam", torch.optim.RAdam),
        ("bitsandbytes.optim.AdEMAMix8bit", bnb.optim.AdEMAMix8bit),
        ("AdEMAMix8bit", bnb.optim.AdEMAMix8bit),
    ],
)
def test_each_name_builds_its_class_and_one_step_trains_on_cpu(optimizer_type: str, expected_class: type) -> None:
    optimizer, _ = build_optimizer(_groups(), optimizer_type, 1e-3, {})
    assert type(optimizer) is expected_class
    assert _step_changes_every_parameter(optimizer)


def test_lion_uses_bitsandbytes_32bit_lion_when_lion_pytorch_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    optimizer, name = build_optimizer(_groups(), "Lion", 1e-4, {})
    assert type(optimizer) is bnb.optim.Lion
    assert name == "bitsandbytes.optim.lion.Lion"
    assert _step_changes_every_parameter(optimizer)


def test_adamw8bit_keeps_8bit_state_for_large_tensors_on_cpu() -> None:
    optimizer, name = build_optimizer(_groups(), "AdamW8bit", 1e-3, {})
    assert _step_changes_every_parameter(optimizer)
    unet = optimizer.param_groups[1]["params"][0]
    assert unet.numel() == EIGHT_BIT_ELEMENTS
    assert optimizer.state[unet]["state1"].dtype == torch.uint8
    assert name == "bitsandbytes.optim.adamw.AdamW8bit"


@pytest.mark.parametrize("optimizer_type", ["", None, "  "])
def test_empty_name_means_adamw(optimizer_type: str | None) -> None:
    optimizer, name = build_optimizer(_groups(), optimizer_type, 1e-3, None)
    assert type(optimizer) is torch.optim.AdamW
    assert name == "torch.optim.adamw.AdamW"


def test_use_8bit_adam_means_adamw8bit_and_conflicts_with_another_type() -> None:
    optimizer, _ = build_optimizer(_groups(), "", 1e-3, {}, use_8bit_adam=True)
    assert type(optimizer) is bnb.optim.AdamW8bit
    with pytest.raises(UserInputError, match="--use_8bit_adam and --optimizer_type 'Lion'"):
        build_optimizer(_groups(), "Lion", 1e-3, {}, use_8bit_adam=True)


def test_group_learning_rates_are_kept_and_the_default_fills_the_others() -> None:
    groups = _groups()
    groups.append({"params": [torch.nn.Parameter(torch.zeros(3))]})
    optimizer, _ = build_optimizer(groups, "AdamW", 2e-4, {})
    assert [group["lr"] for group in optimizer.param_groups] == [5e-3, 1e-2, 2e-4]
    assert "lr" not in groups[2]


def test_display_name_has_sd_scripts_ss_optimizer_format() -> None:
    _, name = build_optimizer(_groups(), "AdamW", 1e-3, {"weight_decay": 0.01, "betas": (0.9, 0.999)})
    assert name == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"


def test_sgd_nesterov_defaults_momentum_to_0_9_and_shows_it() -> None:
    optimizer, name = build_optimizer(_groups(), "SGDNesterov", 1e-3, {})
    assert optimizer.defaults["nesterov"] is True
    assert optimizer.defaults["momentum"] == 0.9
    assert name == "torch.optim.sgd.SGD(momentum=0.9)"


def test_sgd_nesterov_keeps_a_given_momentum_and_refuses_nesterov_in_args() -> None:
    optimizer, name = build_optimizer(_groups(), "sgdnesterov8bit", 1e-3, {"momentum": 0.5})
    assert optimizer.defaults["betas"][0] == 0.5  # bitsandbytes stores SGD momentum as betas[0]
    assert name == "bitsandbytes.optim.sgd.SGD8bit(momentum=0.5)"
    with pytest.raises(UserInputError, match="--optimizer_args nesterov=False"):
        build_optimizer(_groups(), "SGDNesterov", 1e-3, {"nesterov": False})


def test_adafactor_defaults_to_relative_step_without_lr() -> None:
    groups = _groups()
    optimizer, name = build_optimizer(groups, "Adafactor", 1e-3, {})
    assert type(optimizer) is transformers.optimization.Adafactor
    assert optimizer.defaults["relative_step"] is True
    assert optimizer.defaults["scale_parameter"] is True
    assert optimizer.defaults["warmup_init"] is False
    assert all(group["lr"] is None for group in optimizer.param_groups)
    assert [group["lr"] for group in groups] == [5e-3, 1e-2], "the caller's groups must not change"
    assert name == "transformers.optimization.Adafactor(relative_step=True)"
    assert _step_changes_every_parameter(optimizer)


def test_adafactor_without_relative_step_keeps_the_learning_rates() -> None:
    optimizer, name = build_optimizer(_groups(), "adafactor", 1e-3, {"relative_step": False, "scale_parameter": False})
    assert [group["lr"] for group in optimizer.param_groups] == [5e-3, 1e-2]
    assert name == "transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)"


def test_adafactor_warmup_init_turns_relative_step_on() -> None:
    optimizer, _ = build_optimizer(_groups(), "Adafactor", 1e-3, {"relative_step": False, "warmup_init": True})
    assert optimizer.defaults["relative_step"] is True
    assert optimizer.defaults["warmup_init"] is True
    assert optimizer.param_groups[0]["lr"] is None


@pytest.mark.parametrize(
    ("optimizer_type", "module", "pip_command"),
    [
        ("Prodigy", "prodigyopt", "pip install prodigyopt"),
        ("DAdaptAdam", "dadaptation", "pip install dadaptation"),
        ("DAdaptation", "dadaptation.experimental", "pip install dadaptation"),
        ("AdamWScheduleFree", "schedulefree", "pip install schedulefree"),
    ],
)
def test_missing_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, optimizer_type: str, module: str, pip_command: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes `import` fail
    with pytest.raises(UserInputError, match=pip_command) as raised:
        build_optimizer(_groups(), optimizer_type, 1.0, {})
    assert f"--optimizer_type {optimizer_type}" in str(raised.value)


class _FakeScheduleFree(torch.optim.AdamW):
    """Stands in for schedulefree.AdamWScheduleFree: an optimizer with train/eval modes."""

    def __init__(self, params, lr: float = 1e-3, warmup_steps: int = 0) -> None:
        super().__init__(params, lr=lr)
        self.mode = "eval"  # schedulefree optimizers start in eval mode
        self.warmup_steps = warmup_steps

    def train(self) -> None:
        self.mode = "train"

    def eval(self) -> None:
        self.mode = "eval"


def test_schedule_free_optimizer_is_returned_in_train_mode_and_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("schedulefree")
    fake.AdamWScheduleFree = _FakeScheduleFree
    monkeypatch.setitem(sys.modules, "schedulefree", fake)
    optimizer, name = build_optimizer(_groups(), "adamwschedulefree", 1e-3, {"warmup_steps": 10})
    assert type(optimizer) is _FakeScheduleFree and optimizer.warmup_steps == 10
    assert name.endswith("_FakeScheduleFree(warmup_steps=10)")
    assert is_schedule_free(optimizer)
    assert optimizer.mode == "train"
    with optimizer_eval_mode(optimizer):
        assert optimizer.mode == "eval"
    assert optimizer.mode == "train"


def _accelerate_wrapped(optimizer: torch.optim.Optimizer) -> AcceleratedOptimizer:
    """accelerate's wrapper around `optimizer`, without initializing accelerate's global state."""
    wrapped = AcceleratedOptimizer.__new__(AcceleratedOptimizer)
    wrapped.optimizer = optimizer
    return wrapped


def test_schedule_free_is_seen_through_accelerates_wrapper() -> None:
    plain, _ = build_optimizer(_groups(), "AdamW", 1e-3, {})
    assert not is_schedule_free(_accelerate_wrapped(plain)), "the wrapper always has train/eval"
    schedule_free = _FakeScheduleFree(_groups(), lr=1e-3)
    wrapped = _accelerate_wrapped(schedule_free)
    assert is_schedule_free(wrapped)
    set_optimizer_mode(wrapped, train=True)
    assert schedule_free.mode == "train"


def test_plain_optimizers_are_not_schedule_free_and_mode_switches_do_nothing() -> None:
    optimizer, _ = build_optimizer(_groups(), "AdamW", 1e-3, {})
    assert not is_schedule_free(optimizer)
    set_optimizer_mode(optimizer, train=False)  # must not raise: torch optimizers have no eval()
    with optimizer_eval_mode(optimizer):
        assert not hasattr(optimizer, "eval")


def test_prodigy_warns_about_low_and_several_learning_rates(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = torch.optim.SGD
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        optimizer, _ = build_optimizer(_groups(), "prodigy", 1.0, {})
    assert type(optimizer) is torch.optim.SGD
    assert "too low" in caplog.text
    assert "only the first, 0.005" in caplog.text


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(UserInputError, match="--optimizer_type 'AdamX' is not a known optimizer") as raised:
        build_optimizer(_groups(), "AdamX", 1e-3, {})
    assert "AdamW8bit" in str(raised.value) and "package.module.Class" in str(raised.value)


def test_dotted_path_that_does_not_import_is_named() -> None:
    with pytest.raises(UserInputError, match="'no_such_pkg.optim.Fast'.*module 'no_such_pkg.optim' cannot be imported"):
        build_optimizer(_groups(), "no_such_pkg.optim.Fast", 1e-3, {})
    with pytest.raises(UserInputError, match="has no class 'NotThere'"):
        build_optimizer(_groups(), "torch.optim.NotThere", 1e-3, {})


def test_unknown_optimizer_arg_names_the_flag_and_the_key() -> None:
    expected = r"--optimizer_args weight_decy=0\.1 is not an argument of torch\.optim\.adamw\.AdamW"
    with pytest.raises(UserInputError, match=expected) as raised:
        build_optimizer(_groups(), "AdamW", 1e-3, {"weight_decy": 0.1})
    assert "weight_decay" in str(raised.value), "the accepted arguments help spot the typo"
    assert isinstance(raised.value.__cause__, TypeError)


def test_bad_optimizer_arg_value_is_a_user_error() -> None:
    expected = r"refused the learning rate or --optimizer_args betas=\(2\.0, 0\.9\).*Invalid beta"
    with pytest.raises(UserInputError, match=expected):
        build_optimizer(_groups(), "AdamW", 1e-3, {"betas": (2.0, 0.9)})


def test_lr_in_optimizer_args_points_to_learning_rate() -> None:
    with pytest.raises(UserInputError, match="--optimizer_args lr=0.1: the learning rate comes from --learning_rate"):
        build_optimizer(_groups(), "AdamW", 1e-3, {"lr": 0.1})
