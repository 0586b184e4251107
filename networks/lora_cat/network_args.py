"""Parse `create_network`'s arguments into one typed, validated `LoRANetworkConfig`.

`--network_args k=v` pairs reach `create_network(**kwargs)` as strings ("4", "0.1", "true");
`network_dim`, `network_alpha` and `dropout` may arrive as numbers or None. Every value is
checked here once, with errors that name the key, the value and the expected form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .block_lr import BlockLrWeights
from .errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_DIM = 4
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0

# Keys that belong to other network modules or that this module does not implement: refusing
# them beats training something other than what the user asked for.
UNSUPPORTED_KEYS = {
    "block_dims": "per-block ranks are not implemented in networks.lora_cat yet; remove block_dims",
    "block_alphas": "per-block alphas are not implemented in networks.lora_cat yet; remove block_alphas",
    "conv_block_dims": "per-block conv ranks are not implemented in networks.lora_cat yet; remove conv_block_dims",
    "conv_block_alphas": "per-block conv alphas are not implemented in networks.lora_cat yet; remove conv_block_alphas",
    "algo": "is a LyCORIS option; use --network_module lycoris.kohya for LyCORIS, or remove it",
    "dora_wd": "DoRA is not supported: its weight at multiplier 0 is not the base weight, which breaks CAT's reference",
}
BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
FLOAT_KEYS = ("rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
              "loraplus_text_encoder_lr_ratio", "conv_alpha", "dropout")
BOOL_KEYS = ("train_t5xxl",)
KNOWN_KEYS = {"conv_dim", "conv_lora_dim", *FLOAT_KEYS, *BLOCK_LR_KEYS, *BOOL_KEYS}


@dataclass(frozen=True)
class LoRANetworkConfig:
    """Everything that shapes the LoRA network, validated."""

    rank: int = DEFAULT_NETWORK_DIM
    alpha: float = DEFAULT_NETWORK_ALPHA
    conv_rank: int | None = None
    conv_alpha: float = DEFAULT_CONV_ALPHA
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    block_lr: BlockLrWeights | None = None
    train_t5xxl: bool = False  # FLUX.1: adapt T5-XXL too (sd-scripts' network_args train_t5xxl=True)

    def loraplus_ratio(self, text_encoder: bool) -> float | None:
        """The LoRA+ ratio for `lora_up` weights: the specific one, else the general one."""
        specific = self.loraplus_text_encoder_lr_ratio if text_encoder else self.loraplus_unet_lr_ratio
        return specific if specific is not None else self.loraplus_lr_ratio


def parse_network_config(
    network_dim: Any, network_alpha: Any, neuron_dropout: Any, kwargs: Mapping[str, Any]
) -> LoRANetworkConfig:
    """Build the config from `create_network`'s arguments (`kwargs` = the `network_args`)."""
    _check_keys(kwargs)
    rank = _positive_int("network_dim", network_dim, DEFAULT_NETWORK_DIM, "--network_dim")
    conv_rank = _conv_rank(kwargs)
    dropout_value = kwargs.get("dropout") if _is_set(kwargs.get("dropout")) else neuron_dropout
    return LoRANetworkConfig(
        rank=rank,
        alpha=_float("network_alpha", network_alpha, DEFAULT_NETWORK_ALPHA, "--network_alpha", minimum=0.0),
        conv_rank=conv_rank,
        conv_alpha=_float("conv_alpha", kwargs.get("conv_alpha"), DEFAULT_CONV_ALPHA, "network_args", minimum=0.0),
        dropout=_probability("dropout", dropout_value),
        rank_dropout=_probability("rank_dropout", kwargs.get("rank_dropout")),
        module_dropout=_probability("module_dropout", kwargs.get("module_dropout")),
        loraplus_lr_ratio=_ratio("loraplus_lr_ratio", kwargs.get("loraplus_lr_ratio")),
        loraplus_unet_lr_ratio=_ratio("loraplus_unet_lr_ratio", kwargs.get("loraplus_unet_lr_ratio")),
        loraplus_text_encoder_lr_ratio=_ratio(
            "loraplus_text_encoder_lr_ratio", kwargs.get("loraplus_text_encoder_lr_ratio")
        ),
        block_lr=BlockLrWeights.from_network_args(kwargs),
        train_t5xxl=_bool("train_t5xxl", kwargs.get("train_t5xxl")),
    )


def _check_keys(kwargs: Mapping[str, Any]) -> None:
    for key, value in kwargs.items():
        if key in UNSUPPORTED_KEYS:
            raise UserInputError(f"network_args {key}={value!r}: {UNSUPPORTED_KEYS[key]}.")
    unknown = sorted(k for k in kwargs if k not in KNOWN_KEYS)
    if unknown:
        logger.warning(
            "networks.lora_cat ignores these network_args, which it does not know: %s. Known: %s.",
            ", ".join(unknown), ", ".join(sorted(KNOWN_KEYS)),
        )


def _conv_rank(kwargs: Mapping[str, Any]) -> int | None:
    key = "conv_dim" if "conv_dim" in kwargs else "conv_lora_dim"
    value = kwargs.get(key)
    if not _is_set(value) or str(value).strip() == "0":
        return None  # GUIs write conv_dim=0 for "no conv LoRA"
    return _positive_int(key, value, None, "network_args")


def _is_set(value: Any) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "none")


def _positive_int(key: str, value: Any, default: int | None, where: str) -> int | None:
    """`value` as a positive int; `where` is the flag ("--network_dim") or "network_args" it came from."""
    if not _is_set(value):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number <= 0:
        raise UserInputError(
            f"{_given(key, value, where)}: expected a positive integer, e.g. {_example(key, 4, where)}."
        )
    return int(number)


def _float(key: str, value: Any, default: float | None, where: str, minimum: float | None = None) -> float | None:
    if not _is_set(value):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(
            f"{_given(key, value, where)}: expected a number, e.g. {_example(key, 1.0, where)}."
        ) from None
    if number != number or (minimum is not None and number < minimum):
        raise UserInputError(f"{_given(key, value, where)}: expected a number >= {minimum}.")
    return number


def _given(key: str, value: Any, where: str) -> str:
    """A value as the user wrote it: "--network_dim 0" for a flag, "network_args conv_dim='x'" for a pair."""
    return f"{where} {value}" if where.startswith("--") else f"{where} {key}={value!r}"


def _example(key: str, value: Any, where: str) -> str:
    """A correct value written the way the user writes that option: "--network_dim 4", "conv_dim=4"."""
    return f"{where} {value}" if where.startswith("--") else f"{key}={value}"


def _bool(key: str, value: Any) -> bool:
    """A yes/no pair as GUIs write it (True/False, true/false, 1/0); unset is False."""
    if not _is_set(value) or isinstance(value, bool):
        return bool(value) if isinstance(value, bool) else False
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserInputError(f"network_args {key}={value!r}: expected True or False, e.g. {key}=True.")


def _probability(key: str, value: Any) -> float | None:
    p = _float(key, value, None, "network_args")
    if p is not None and not 0.0 <= p < 1.0:
        raise UserInputError(f"network_args {key}={value!r}: expected a probability in [0, 1), e.g. {key}=0.1.")
    return p or None  # 0 means off


def _ratio(key: str, value: Any) -> float | None:
    ratio = _float(key, value, None, "network_args")
    if ratio is not None and ratio <= 0:
        raise UserInputError(f"network_args {key}={value!r}: expected a positive number, e.g. {key}=16.")
    return ratio
