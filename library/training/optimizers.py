"""The optimizer named by `--optimizer_type`, built with sd-scripts' names, defaults and special cases.

Names are case-insensitive; an empty name means AdamW, or AdamW8bit with `--use_8bit_adam`.

- AdamW: `torch.optim.AdamW`.
- AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion8bit, PagedLion8bit: the bitsandbytes
  class of that name. All run on CPU with bitsandbytes 0.50 (the paged ones fall back to unpaged
  memory, with a warning); tensors under 4096 elements keep 32-bit state unless `min_8bit_size` is lowered.
- SGDNesterov / SGDNesterov8bit: `torch.optim.SGD` / `bitsandbytes.optim.SGD8bit` with nesterov=True and
  momentum 0.9 unless given. (bitsandbytes' SGD8bit accepts `nesterov` but does not use it, in sd-scripts too.)
- Lion: `lion_pytorch.Lion` as in sd-scripts when that package is installed, else bitsandbytes' 32-bit
  `Lion` (same update rule; the display name then says `bitsandbytes.optim.lion.Lion`).
- Adafactor: `transformers.optimization.Adafactor`, with sd-scripts' rules (`_adafactor_settings`).
- Prodigy (`prodigyopt`), DAdaptation = DAdaptAdamPreprint, DAdaptAdaGrad, DAdaptAdam, DAdaptAdan,
  DAdaptAdanIP, DAdaptLion, DAdaptSGD (`dadaptation`), RAdamScheduleFree, AdamWScheduleFree,
  SGDScheduleFree (`schedulefree`): optional packages; a missing one is named with its pip command.
- Any other name: a `torch.optim` class ("RAdam"), else a `bitsandbytes.optim` one ("AdEMAMix8bit").
- A dotted path `package.module.Class` ("torch.optim.RAdam"), imported as given.

`--optimizer_args` arrive as Python values (the command-line layer parses `betas=0.9,0.999`) and go to
the class as keyword arguments. The display name is what sd-scripts writes into `ss_optimizer`:
`<module>.<Class>(k=v,k=v)`, e.g. `torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))`,
listing the user's arguments plus the defaults sd-scripts inserts (momentum, relative_step).

Schedule-free optimizers keep two sets of weights and must be told which one the model should hold:
`set_optimizer_mode(optimizer, train=False)` (or `optimizer_eval_mode`) before sampling or saving,
train mode again afterwards; for every other optimizer these are no-ops.

Reference read for compatibility: sd-scripts `library/train_util.py` (`get_optimizer`,
`get_optimizer_train_eval_fn`, `is_schedulefree_optimizer`) and `train_network.py` (`ss_optimizer`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from accelerate.optimizer import AcceleratedOptimizer

from library.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "AdamW"
EIGHT_BIT_ADAM = "AdamW8bit"
NESTEROV_DEFAULT_MOMENTUM = 0.9
ADAPTIVE_LR_MINIMUM = 0.1  # sd-scripts warns below this: D-Adaptation and Prodigy want lr around 1.0
_FALLBACK_MODULES = ("torch.optim", "bitsandbytes.optim")


@dataclass(frozen=True)
class _Source:
    """Where an optimizer class lives, and the pip package that provides it."""

    module: str
    attribute: str
    pip_package: str


def _bnb(attribute: str) -> tuple[_Source, ...]:
    """A class of `bitsandbytes.optim`."""
    return (_Source("bitsandbytes.optim", attribute, "bitsandbytes"),)


def _dadapt(attribute: str, experimental: bool = False) -> tuple[_Source, ...]:
    """A D-Adaptation class (the preprint Adam and AdanIP live in `dadaptation.experimental`)."""
    module = "dadaptation.experimental" if experimental else "dadaptation"
    return (_Source(module, attribute, "dadaptation"),)


def _schedulefree(attribute: str) -> tuple[_Source, ...]:
    """A class of the `schedulefree` package."""
    return (_Source("schedulefree", attribute, "schedulefree"),)


# Lower-cased --optimizer_type -> the places to look, in order (the first importable one wins).
KNOWN_OPTIMIZERS: dict[str, tuple[_Source, ...]] = {
    "adamw": (_Source("torch.optim", "AdamW", "torch"),),
    "adamw8bit": _bnb("AdamW8bit"),
    "pagedadamw": _bnb("PagedAdamW"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit"),
    "pagedadamw32bit": _bnb("PagedAdamW32bit"),
    "lion8bit": _bnb("Lion8bit"),
    "pagedlion8bit": _bnb("PagedLion8bit"),
    "sgdnesterov8bit": _bnb("SGD8bit"),
    "sgdnesterov": (_Source("torch.optim", "SGD", "torch"),),
    "lion": (_Source("lion_pytorch", "Lion", "lion-pytorch"),) + _bnb("Lion"),
    "adafactor": (_Source("transformers.optimization", "Adafactor", "transformers"),),
    "prodigy": (_Source("prodigyopt", "Prodigy", "prodigyopt"),),
    "dadaptation": _dadapt("DAdaptAdamPreprint", experimental=True),
    "dadaptadampreprint": _dadapt("DAdaptAdamPreprint", experimental=True),
    "dadaptadagrad": _dadapt("DAdaptAdaGrad"),
    "dadaptadam": _dadapt("DAdaptAdam"),
    "dadaptadan": _dadapt("DAdaptAdan"),
    "dadaptadanip": _dadapt("DAdaptAdanIP", experimental=True),
    "dadaptlion": _dadapt("DAdaptLion"),
    "dadaptsgd": _dadapt("DAdaptSGD"),
    "radamschedulefree": _schedulefree("RAdamScheduleFree"),
    "adamwschedulefree": _schedulefree("AdamWScheduleFree"),
    "sgdschedulefree": _schedulefree("SGDScheduleFree"),
}
_KNOWN_NAMES = (
    "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, "
    "SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, DAdaptation, DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, "
    "DAdaptAdanIP, DAdaptLion, DAdaptSGD, RAdamScheduleFree, AdamWScheduleFree, SGDScheduleFree"
)


def build_optimizer(
    param_groups: list[dict],
    optimizer_type: str | None,
    learning_rate: float,
    optimizer_args: Mapping[str, object] | None,
    use_8bit_adam: bool = False,
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for `param_groups` and its display name (the `ss_optimizer` metadata value).

    Groups keep their own "lr"; `learning_rate` is the default for groups without one. The caller's
    group dicts are not modified. A schedule-free optimizer is returned in train mode, as sd-scripts does.
    """
    name = _resolve_type_name(optimizer_type, use_8bit_adam)
    type_key = name.lower()
    kwargs = dict(optimizer_args or {})
    _reject_lr_in_args(kwargs)
    optimizer_class = resolve_optimizer_class(name)
    groups = [dict(group) for group in param_groups]
    lr: float | None = learning_rate
    fixed: dict[str, object] = {}

    if type_key in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs, fixed = _nesterov_settings(kwargs)
    elif type_key == "adafactor":
        kwargs, lr, groups = _adafactor_settings(kwargs, learning_rate, groups)
    elif type_key == "prodigy" or type_key.startswith("dadapt"):
        _warn_adaptive_lr(groups, learning_rate)

    optimizer = _construct(optimizer_class, groups, lr, kwargs, fixed, name)
    set_optimizer_mode(optimizer, train=True)
    return optimizer, optimizer_display_name(optimizer_class, kwargs)


def _resolve_type_name(optimizer_type: str | None, use_8bit_adam: bool) -> str:
    """The optimizer name as the user spelled it, with sd-scripts' defaults for an empty name and `--use_8bit_adam`."""
    name = (optimizer_type or "").strip()
    if use_8bit_adam:
        if name and name.lower() != EIGHT_BIT_ADAM.lower():
            raise UserInputError(
                f"--use_8bit_adam and --optimizer_type {name!r} were both given: --use_8bit_adam means "
                f"--optimizer_type {EIGHT_BIT_ADAM}; keep only one of the two flags."
            )
        return name or EIGHT_BIT_ADAM
    return name or DEFAULT_OPTIMIZER


def _reject_lr_in_args(kwargs: Mapping[str, object]) -> None:
    """`lr` is set by the learning-rate flags; sd-scripts crashes with a TypeError when it is also in the args."""
    if "lr" in kwargs:
        raise UserInputError(
            f"--optimizer_args lr={kwargs['lr']!r}: the learning rate comes from --learning_rate "
            "(and --unet_lr / --text_encoder_lr); remove lr from --optimizer_args."
        )


def resolve_optimizer_class(optimizer_type: str) -> type:
    """The class for a known name, a `torch.optim` / `bitsandbytes.optim` class name, or a dotted path."""
    key = optimizer_type.strip().lower()
    if key in KNOWN_OPTIMIZERS:
        return _import_first(optimizer_type, KNOWN_OPTIMIZERS[key])
    if "." in optimizer_type:
        return import_dotted_class(optimizer_type.strip(), "--optimizer_type")
    for module_name in _FALLBACK_MODULES:
        found = _class_in_module(module_name, optimizer_type.strip())
        if found is not None:
            return found
    raise UserInputError(
        f"--optimizer_type {optimizer_type!r} is not a known optimizer: use one of {_KNOWN_NAMES}, "
        "a torch.optim class name (e.g. RAdam), or a dotted class path (package.module.Class)."
    )


def _import_first(optimizer_type: str, sources: tuple[_Source, ...]) -> type:
    """The class from the first source whose module imports; a pip hint naming the first one otherwise."""
    for source in sources:
        try:
            module = importlib.import_module(source.module)
        except ImportError:
            continue
        return getattr(module, source.attribute)
    missing = sources[0]
    raise UserInputError(
        f"--optimizer_type {optimizer_type} needs the package {missing.pip_package!r}, which is not installed: "
        f"run `pip install {missing.pip_package}`, or choose another --optimizer_type."
    )


def import_dotted_class(path: str, flag: str) -> Any:
    """Import `package.module.Class`; a sentence naming the flag and the path when either part is missing."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(
            f"{flag} {path!r}: module {module_name!r} cannot be imported ({error}); "
            "install the package that provides it, or fix the dotted path (package.module.Class)."
        ) from error
    found = getattr(module, class_name, None)
    if not callable(found):
        raise UserInputError(
            f"{flag} {path!r}: module {module_name!r} has no class {class_name!r}; "
            "check the spelling (the class part is case-sensitive)."
        )
    return found


def _class_in_module(module_name: str, class_name: str) -> type | None:
    """An optimizer class of `module_name` whose name matches `class_name`, exactly or ignoring case."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    exact = getattr(module, class_name, None)
    if inspect.isclass(exact) and issubclass(exact, torch.optim.Optimizer):
        return exact
    for name, value in vars(module).items():
        if name.lower() == class_name.lower() and inspect.isclass(value) and issubclass(value, torch.optim.Optimizer):
            return value
    return None


def _nesterov_settings(kwargs: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """SGD with Nesterov momentum needs momentum > 0: sd-scripts sets 0.9 when it is not given.

    The momentum goes into the displayed arguments; `nesterov=True` is implied by the name and is not shown.
    """
    if "momentum" not in kwargs:
        logger.info("SGD with Nesterov needs momentum; using momentum=%s", NESTEROV_DEFAULT_MOMENTUM)
        kwargs = {**kwargs, "momentum": NESTEROV_DEFAULT_MOMENTUM}
    return kwargs, {"nesterov": True}


def _adafactor_settings(
    kwargs: dict[str, object], learning_rate: float, groups: list[dict]
) -> tuple[dict[str, object], float | None, list[dict]]:
    """sd-scripts' Adafactor rules: the kwargs, the lr to pass and the groups.

    - `relative_step` defaults to True (shown in the display name); `warmup_init=True` turns it on.
    - With `relative_step`, Adafactor computes its own step size: the optimizer gets lr=None, the
      groups lose their "lr" (so --unet_lr / --text_encoder_lr are ignored, with a warning), and the
      lr scheduler becomes `adafactor` (see `library.training.lr_schedulers`), which reports that step size.
    - `scale_parameter` and the other arguments keep transformers' defaults (scale_parameter=True,
      warmup_init=False).
    """
    kwargs = {**kwargs}
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return kwargs, learning_rate, groups
    if any(group.get("lr") is not None for group in groups):
        logger.warning("Adafactor with relative_step computes its own lr: the per-group learning rates are ignored")
    logger.info("Adafactor with relative_step: --learning_rate %s is only reported before the first step",
                learning_rate)
    return kwargs, None, [{k: v for k, v in group.items() if k != "lr"} for group in groups]


def _warn_adaptive_lr(groups: list[dict], learning_rate: float) -> None:
    """D-Adaptation and Prodigy scale the lr themselves: sd-scripts warns about low or multiple lrs."""
    lrs = [group.get("lr", learning_rate) for group in groups] or [learning_rate]
    if lrs[0] is not None and lrs[0] <= ADAPTIVE_LR_MINIMUM:
        logger.warning("learning rate %s is too low for D-Adaptation or Prodigy: set it around 1.0", lrs[0])
    if len(set(lrs)) > 1:
        logger.warning(
            "D-Adaptation/Prodigy with several learning rates (e.g. U-Net and text encoder): only the first, %s, "
            "takes effect",
            lrs[0],
        )


def _construct(
    optimizer_class: type,
    groups: list[dict],
    lr: float | None,
    kwargs: dict[str, object],
    fixed: dict[str, object],
    shown_type: str,
) -> torch.optim.Optimizer:
    """Instantiate the class; a rejected argument becomes a sentence naming `--optimizer_args` and the key."""
    clashing = sorted(set(kwargs) & set(fixed))
    if clashing:
        raise UserInputError(
            f"--optimizer_args {clashing[0]}={kwargs[clashing[0]]!r}: --optimizer_type {shown_type} already sets "
            f"{clashing[0]}={fixed[clashing[0]]!r}; remove it from --optimizer_args."
        )
    try:
        return optimizer_class(groups, lr=lr, **fixed, **kwargs)
    except (TypeError, ValueError) as error:
        raise _argument_error(error, optimizer_class, kwargs, shown_type) from error


def _argument_error(
    error: Exception, optimizer_class: type, kwargs: Mapping[str, object], shown_type: str
) -> UserInputError:
    """The sentence for an optimizer that refused its arguments: the unknown key when there is one."""
    where = f"{_class_path(optimizer_class)} (--optimizer_type {shown_type})"
    key = _rejected_key(error, kwargs) if isinstance(error, TypeError) else None
    if key is not None:
        return UserInputError(
            f"--optimizer_args {key}={kwargs[key]!r} is not an argument of {where}: remove it or fix its "
            f"spelling; accepted: {_accepted_arguments(optimizer_class)}."
        )
    return UserInputError(
        f"{where} refused the learning rate or --optimizer_args {_format_args(kwargs) or '(none)'}: {error}; "
        "check the values."
    )


def _rejected_key(error: TypeError, kwargs: Mapping[str, object]) -> str | None:
    """The user key a TypeError complains about ("unexpected keyword argument 'x'"), if any."""
    match = re.search(r"keyword argument '(\w+)'", str(error))
    if match and match.group(1) in kwargs:
        return match.group(1)
    return None


def _accepted_arguments(optimizer_class: type) -> str:
    """The keyword arguments the class's constructor names, for the error message."""
    try:
        parameters = inspect.signature(optimizer_class).parameters
    except (TypeError, ValueError):
        return "see the optimizer's documentation"
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [name for name, p in parameters.items() if p.kind in keyword_kinds and name not in ("params", "lr")]
    return ", ".join(names) or "none besides lr"


def _class_path(optimizer_class: type) -> str:
    """`module.Class`, as sd-scripts names the optimizer in logs and metadata."""
    return f"{optimizer_class.__module__}.{optimizer_class.__name__}"


def _format_args(kwargs: Mapping[str, object]) -> str:
    """`k=v,k=v` with `str()` values, as sd-scripts writes them."""
    return ",".join(f"{key}={value}" for key, value in kwargs.items())


def optimizer_display_name(optimizer_class: type, kwargs: Mapping[str, object]) -> str:
    """The `ss_optimizer` value: `module.Class` plus `(k=v,...)` when there are arguments."""
    arguments = _format_args(kwargs)
    return _class_path(optimizer_class) + (f"({arguments})" if arguments else "")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer itself, out of accelerate's `AcceleratedOptimizer` wrapper(s)."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """Whether the optimizer has train/eval modes (schedulefree, ProdigyPlusScheduleFree, ...).

    Plain `torch.optim` optimizers have neither method; accelerate's wrapper always has both, so
    the wrapped optimizer is the one looked at.
    """
    inner = unwrap_optimizer(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def set_optimizer_mode(optimizer: Any, train: bool) -> None:
    """Train mode for optimizing, eval mode for sampling and saving; a no-op unless schedule-free."""
    if not is_schedule_free(optimizer):
        return
    if train:
        optimizer.train()
    else:
        optimizer.eval()


@contextlib.contextmanager
def optimizer_eval_mode(optimizer: Any) -> Iterator[None]:
    """Inside the block the model holds the weights to sample or save with; train mode again afterwards."""
    set_optimizer_mode(optimizer, train=False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, train=True)
