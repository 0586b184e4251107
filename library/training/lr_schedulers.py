"""The learning-rate schedule named by `--lr_scheduler` (or `--lr_scheduler_type`), with sd-scripts' meaning.

Names: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, adafactor,
piecewise_constant, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay (case-insensitive). They are
transformers' schedules (`transformers.optimization`), except piecewise_constant (diffusers') and
adafactor (transformers' `AdafactorSchedule`, a proxy that reports the lr Adafactor computes itself).

What each schedule gets, as sd-scripts passes it:

- `--lr_warmup_steps`: whole steps, or a ratio below 1 of the training steps (`int(ratio * steps)`);
  `--lr_decay_steps` (warmup_stable_decay) likewise. constant, adafactor, piecewise_constant and a
  `--lr_scheduler_type` class take no warmup: a non-zero warmup is an error (sd-scripts raises too,
  except for piecewise_constant, where it silently ignores it).
- cosine_with_restarts: `num_cycles` (`--lr_scheduler_num_cycles`, default 1); polynomial: `power`
  (`--lr_scheduler_power`, default 1); inverse_sqrt: `timescale` (`--lr_scheduler_timescale`);
  cosine_with_min_lr: `num_cycles / 2` and `min_lr_rate` = `--lr_scheduler_min_lr_ratio` (or `min_lr` /
  `min_lr_rate` in `--lr_scheduler_args`); warmup_stable_decay: `num_cycles / 2`,
  `min_lr_ratio` (default 0), `num_decay_steps`, and `num_stable_steps` = steps - warmup - decay.
- `--lr_scheduler_args` (already Python values) are added to the schedule function's arguments; one
  that repeats an argument a flag already sets is an error. piecewise_constant needs `step_rules`.
- `--lr_scheduler_type`: a `torch.optim.lr_scheduler` class name or a dotted class path, built as
  `cls(optimizer, **lr_scheduler_args)`; it wins over `--lr_scheduler`.
- Adafactor with `relative_step` (its default in sd-scripts) always gets the adafactor schedule, whatever
  `--lr_scheduler` says; the adafactor schedule with any other optimizer is an error.
- A schedule-free optimizer schedules its own lr: `--lr_scheduler` is ignored (with a warning) and a
  constant schedule is returned, so logging and state saving work as for any other schedule.

Step counts: the scheduler returned here must be stepped once per optimizer step, by the training
loop itself (not through `accelerator.prepare`). `num_training_steps` is the number of optimizer steps
(`--max_train_steps`); gradient accumulation is already inside that count, and the number of processes
does not enter. sd-scripts instead builds the schedule over `max_train_steps * num_processes` steps and
lets accelerate step it `num_processes` times per optimizer step (and not at all on accumulation
micro-steps); with one process the two are identical, and a warmup ratio gives the same curve with any
number of processes. They differ only for a warmup (or decay) given in whole steps on several
processes, which sd-scripts in effect divides by the number of processes; here it means optimizer steps.

Reference read for compatibility: sd-scripts `library/train_util.py` (`get_scheduler_fix`,
`add_optimizer_arguments`, `get_dummy_scheduler`) and `train_network.py` (`generate_step_logs`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import diffusers.optimization
import torch
import transformers.optimization
from torch.optim.lr_scheduler import LRScheduler

from library.errors import UserInputError
from library.training.optimizers import import_dotted_class, is_schedule_free, unwrap_optimizer

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "adafactor",
    "piecewise_constant",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
NO_WARMUP_SCHEDULERS = ("constant", "piecewise_constant")  # adafactor refuses warmup on its own path
DEFAULT_NUM_CYCLES = 1
DEFAULT_POWER = 1.0


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    num_training_steps: int,
    warmup_steps: int | float = 0,
    num_cycles: int | None = None,
    power: float | None = None,
    scheduler_args: Mapping[str, object] | None = None,
    min_lr_ratio: float | None = None,
    scheduler_type: str | None = None,
    decay_steps: int | float = 0,
    timescale: int | None = None,
    learning_rate: float | None = None,
) -> LRScheduler:
    """The lr scheduler for `optimizer`, to be stepped once per optimizer step (see the module docstring).

    `learning_rate` (--learning_rate) is used only by the adafactor schedule, as the lr it reports
    before Adafactor's first step.
    """
    args = dict(scheduler_args or {})
    _check_training_steps(num_training_steps)
    warmup = resolve_step_count(warmup_steps, num_training_steps, "--lr_warmup_steps")
    if scheduler_type:
        return _custom_scheduler(optimizer, scheduler_type, args, warmup)
    key = scheduler_key(name)
    if is_schedule_free(optimizer):
        return _schedule_free_placeholder(optimizer, key, warmup)
    if key == "adafactor" or _adafactor_computes_lr(optimizer):
        return _adafactor_schedule(optimizer, key, warmup, learning_rate)
    if key in NO_WARMUP_SCHEDULERS:
        _reject_warmup(key, warmup)
    if key == "piecewise_constant":
        return _piecewise_constant(optimizer, args)
    decay = resolve_step_count(decay_steps, num_training_steps, "--lr_decay_steps")
    flag_kwargs = _schedule_kwargs(key, num_training_steps, warmup, decay, num_cycles, power, min_lr_ratio, timescale)
    _check_min_lr_given(key, flag_kwargs, args)
    return _call_schedule(key, optimizer, flag_kwargs, args)


def scheduler_key(name: str | None) -> str:
    """The lower-cased schedule name; a sentence listing the valid names for anything else."""
    key = (name or "").strip().lower()
    if key not in SCHEDULER_NAMES:
        raise UserInputError(
            f"--lr_scheduler {name!r} is not a known schedule: use one of {', '.join(SCHEDULER_NAMES)}, "
            "or give a scheduler class with --lr_scheduler_type."
        )
    return key


def resolve_step_count(value: int | float, num_training_steps: int, flag: str) -> int:
    """Whole steps as given, or a ratio below 1 of `num_training_steps` (`int(ratio * steps)`, as sd-scripts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserInputError(
            f"{flag} {value!r} is not a step count: give whole steps (e.g. 100) or a ratio below 1 of the "
            "training steps (e.g. 0.05)."
        )
    if isinstance(value, int):
        return value
    if value < 1:
        return int(value * num_training_steps)
    if value.is_integer():
        return int(value)
    raise UserInputError(
        f"{flag} {value!r} is neither whole steps nor a ratio below 1: give e.g. {int(value)} steps or "
        f"{value / num_training_steps:.3f} of the training steps."
    )


def _reject_warmup(key: str, warmup: int) -> None:
    """constant and piecewise_constant take no warmup (sd-scripts raises for constant)."""
    if warmup > 0:
        advice = "use --lr_scheduler constant_with_warmup, or " if key == "constant" else ""
        raise UserInputError(
            f"--lr_scheduler {key} takes no warmup, but --lr_warmup_steps gives {warmup} steps: "
            f"{advice}set --lr_warmup_steps 0."
        )


def _check_training_steps(num_training_steps: int) -> None:
    """The schedules need at least one training step."""
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise UserInputError(
            f"the number of training steps is {num_training_steps!r}: set --max_train_steps (or "
            "--max_train_epochs) to at least 1."
        )


def _schedule_kwargs(
    key: str,
    num_training_steps: int,
    warmup: int,
    decay: int,
    num_cycles: int | None,
    power: float | None,
    min_lr_ratio: float | None,
    timescale: int | None,
) -> dict[str, object]:
    """The arguments sd-scripts gives each transformers schedule function (None values left out)."""
    cycles = DEFAULT_NUM_CYCLES if num_cycles is None else num_cycles
    warm = {"num_warmup_steps": warmup}
    whole = {**warm, "num_training_steps": num_training_steps}
    by_key: dict[str, dict[str, object]] = {
        "constant": {},
        "constant_with_warmup": warm,
        "inverse_sqrt": {**warm, "timescale": timescale},
        "linear": whole,
        "cosine": whole,
        "cosine_with_restarts": {**whole, "num_cycles": cycles},
        "polynomial": {**whole, "power": DEFAULT_POWER if power is None else power},
        "cosine_with_min_lr": {**whole, "num_cycles": cycles / 2, "min_lr_rate": min_lr_ratio},
        "warmup_stable_decay": {
            **warm,
            "num_stable_steps": _stable_steps(num_training_steps, warmup, decay),
            "num_decay_steps": decay,
            "num_cycles": cycles / 2,
            "min_lr_ratio": 0.0 if min_lr_ratio is None else min_lr_ratio,
        },
    }
    return {name: value for name, value in by_key[key].items() if value is not None}


def _stable_steps(num_training_steps: int, warmup: int, decay: int) -> int:
    """warmup_stable_decay's flat part: what warmup and decay leave of the training steps."""
    stable = num_training_steps - warmup - decay
    if stable < 0:
        raise UserInputError(
            f"--lr_warmup_steps ({warmup} steps) and --lr_decay_steps ({decay} steps) add up to more than the "
            f"{num_training_steps} training steps: lower one of them."
        )
    return stable


def _check_min_lr_given(key: str, flag_kwargs: Mapping[str, object], args: Mapping[str, object]) -> None:
    """cosine_with_min_lr needs a floor: transformers raises a bare ValueError without one."""
    if key != "cosine_with_min_lr":
        return
    if not ({"min_lr", "min_lr_rate"} & (set(flag_kwargs) | set(args))):
        raise UserInputError(
            "--lr_scheduler cosine_with_min_lr needs a minimum lr: set --lr_scheduler_min_lr_ratio (e.g. 0.1), "
            "or --lr_scheduler_args min_lr=<lr>."
        )


def _call_schedule(
    key: str, optimizer: torch.optim.Optimizer, flag_kwargs: dict[str, object], args: dict[str, object]
) -> LRScheduler:
    """Call transformers' schedule function with the flags' arguments plus `--lr_scheduler_args`."""
    _reject_repeated_args(key, flag_kwargs, args)
    schedule = transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION[transformers.optimization.SchedulerType(key)]
    try:
        return schedule(optimizer, **flag_kwargs, **args)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"--lr_scheduler {key} could not be built with --lr_scheduler_args {_format(args) or '(none)'}: "
            f"{error}; fix or remove the arguments."
        ) from error


def _reject_repeated_args(key: str, flag_kwargs: Mapping[str, object], args: Mapping[str, object]) -> None:
    """An argument set by a flag may not be given again in `--lr_scheduler_args`."""
    repeated = sorted(set(flag_kwargs) & set(args))
    if repeated:
        raise UserInputError(
            f"--lr_scheduler_args {repeated[0]}={args[repeated[0]]!r} repeats an argument that --lr_scheduler {key} "
            f"already gets from the command line ({repeated[0]}={flag_kwargs[repeated[0]]!r}): set it with its flag "
            "and remove it from --lr_scheduler_args."
        )


def _custom_scheduler(
    optimizer: torch.optim.Optimizer, scheduler_type: str, args: dict[str, object], warmup: int
) -> LRScheduler:
    """`--lr_scheduler_type`: a torch.optim.lr_scheduler class or a dotted path, given `--lr_scheduler_args` only."""
    if warmup > 0:
        raise UserInputError(
            f"--lr_scheduler_type {scheduler_type} gets only --lr_scheduler_args, not --lr_warmup_steps "
            f"({warmup} steps): set --lr_warmup_steps 0, and give the class's own warmup argument (if it has one) "
            "in --lr_scheduler_args."
        )
    scheduler_class = _scheduler_class(scheduler_type.strip())
    try:
        return scheduler_class(optimizer, **args)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"--lr_scheduler_type {scheduler_type} could not be built with --lr_scheduler_args "
            f"{_format(args) or '(none)'}: {error}; fix the arguments."
        ) from error


def _scheduler_class(scheduler_type: str) -> Any:
    """A dotted class path, or a class of `torch.optim.lr_scheduler` (sd-scripts' default module)."""
    if "." in scheduler_type:
        return import_dotted_class(scheduler_type, "--lr_scheduler_type")
    found = getattr(torch.optim.lr_scheduler, scheduler_type, None)
    if not isinstance(found, type):
        raise UserInputError(
            f"--lr_scheduler_type {scheduler_type!r} is not a class of torch.optim.lr_scheduler: check the spelling "
            "(e.g. CosineAnnealingLR) or give a dotted class path (package.module.Class)."
        )
    return found


def _schedule_free_placeholder(optimizer: torch.optim.Optimizer, key: str, warmup: int) -> LRScheduler:
    """A constant schedule for a schedule-free optimizer, which schedules its own lr (sd-scripts' dummy scheduler)."""
    if key != "constant" or warmup > 0:
        logger.warning(
            "schedule-free optimizers schedule their own learning rate: --lr_scheduler %s and --lr_warmup_steps %s "
            "are ignored (give the optimizer's warmup with --optimizer_args warmup_steps=N)",
            key,
            warmup,
        )
    return transformers.optimization.get_constant_schedule(optimizer)


def _adafactor_computes_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer is transformers' Adafactor with relative_step (it then ignores any lr)."""
    inner = unwrap_optimizer(optimizer)
    return isinstance(inner, transformers.optimization.Adafactor) and bool(inner.defaults.get("relative_step"))


def _adafactor_schedule(
    optimizer: torch.optim.Optimizer, key: str, warmup: int, learning_rate: float | None
) -> LRScheduler:
    """transformers' AdafactorSchedule: only for Adafactor with relative_step, without warmup."""
    if not _adafactor_computes_lr(optimizer):
        raise UserInputError(
            f"--lr_scheduler adafactor only works with --optimizer_type Adafactor and relative_step=True "
            f"(its default), not with {type(unwrap_optimizer(optimizer)).__name__}: choose another --lr_scheduler "
            "(constant_with_warmup suits Adafactor with relative_step=False)."
        )
    if warmup > 0:
        raise UserInputError(
            f"Adafactor with relative_step computes its own lr and takes no warmup, but --lr_warmup_steps gives "
            f"{warmup} steps: set --lr_warmup_steps 0, or use --optimizer_args relative_step=False with a "
            "warmup schedule."
        )
    if key != "adafactor":
        logger.info("Adafactor with relative_step: --lr_scheduler %s is replaced by the adafactor schedule", key)
    return transformers.optimization.AdafactorSchedule(unwrap_optimizer(optimizer), learning_rate or 0.0)


def _piecewise_constant(optimizer: torch.optim.Optimizer, args: dict[str, object]) -> LRScheduler:
    """diffusers' piecewise constant schedule: `step_rules` such as "1:10,0.1:20,0.01" from `--lr_scheduler_args`."""
    if "step_rules" not in args:
        raise UserInputError(
            "--lr_scheduler piecewise_constant needs its rules: add --lr_scheduler_args "
            "step_rules=\"1:10,0.1:20,0.01\" (multiplier:until_step, ..., final multiplier)."
        )
    try:
        return diffusers.optimization.get_piecewise_constant_schedule(optimizer, **args)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"--lr_scheduler piecewise_constant could not use --lr_scheduler_args {_format(args)}: {error}; "
            "write step_rules as \"1:10,0.1:20,0.01\"."
        ) from error


def _format(args: Mapping[str, object]) -> str:
    """`k=v k=v`, the way the arguments were written on the command line."""
    return " ".join(f"{key}={value!r}" for key, value in args.items())


def current_learning_rates(scheduler: Any, descriptions: Sequence[str] | None) -> dict[str, float]:
    """Per-group learning rates to log, keyed as sd-scripts logs them.

    `lr/<description>` for each group (the network's descriptions, e.g. "textencoder", "unet",
    "unet plus"; `group<i>` when the network gives none), and for optimizers that adapt the step size
    (D-Adaptation, Prodigy: their groups carry "d") also `lr/d*lr/<description>` = d * lr.
    """
    groups = unwrap_optimizer(scheduler.optimizer).param_groups
    logs: dict[str, float] = {}
    for index, lr in enumerate(scheduler.get_last_lr()):
        label = descriptions[index] if descriptions is not None and index < len(descriptions) else f"group{index}"
        logs[f"lr/{label}"] = float(lr)
        group = groups[index] if index < len(groups) else {}
        if group.get("d") is not None:
            logs[f"lr/d*lr/{label}"] = float(group["d"]) * float(group["lr"])
    return logs
