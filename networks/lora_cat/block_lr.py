"""Block-wise learning rates for the SD1/SD2 U-Net LoRA, with sd-scripts' meaning.

`network_args` keys (sd-scripts `networks/lora.py`: `parse_block_lr_kwargs`, `get_block_lr_weight`,
`get_block_index`, `remove_block_dims_and_alphas`, `prepare_optimizer_params`):

- `down_lr_weight`, `up_lr_weight`: 12 comma-separated multipliers, or a preset. An empty list entry
  means 0 ("1,,1" is 1, 0, 1). A list of the wrong length is padded with 1.0 or truncated, with a warning.
  A value without a comma is a preset: `sine`, `cosine`, `linear`, `reverse_linear`, `zeros`, each with
  an optional `+offset` added to every entry ("zeros+0.5" is twelve 0.5s).
- `mid_lr_weight`: one multiplier (extra comma-separated entries are dropped with a warning).
- `block_lr_zero_threshold` (default 0): each given multiplier that is not strictly above it becomes 0,
  so by default negative multipliers become 0 too. Blocks whose key is not given stay at 1.0.

Setting any of the three turns block-wise rates on. A U-Net LoRA layer's learning rate is the U-Net lr
times its block's multiplier, and a layer whose multiplier is 0 gets no LoRA module at all: sd-scripts
sets that block's rank to 0, so the layer is absent from the saved file and from the optimizer.
The text encoder is unaffected.

Blocks are numbered as in the original LDM U-Net: 0-11 `input_blocks` (down), 12 `middle_block`,
13-24 `output_blocks` (up); the weights list is down + [mid] + up. Block 0 is `conv_in`, which never
gets a LoRA, so the first down multiplier has no effect (sd-scripts' comment says the same).

Where sd-scripts only logs an error and goes on (an unknown preset, a single number such as "0.5",
which it reads as a preset name) or crashes (a non-number entry), this module raises UserInputError.
An empty value or "none" counts as not given.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

from .errors import UserInputError

logger = logging.getLogger(__name__)

NUM_BLOCKS = 12  # down (and up) blocks of SD1/SD2's LDM U-Net
MID_BLOCK_INDEX = NUM_BLOCKS
FIRST_UP_INDEX = NUM_BLOCKS + 1
NUM_TOTAL_BLOCKS = 2 * NUM_BLOCKS + 1
SLOTS_PER_LEVEL = 3  # LDM blocks per resolution level: two (down) or three (up) layers, plus a resampler slot
SD_LEVELS = 4
SD_LAYERS_PER_LEVEL = {"down": 2, "up": 3}
PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
UNSET_VALUES = ("", "none")
UNET_PREFIX = "lora_unet_"

_BLOCK_RE = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_FORMS = (
    f"give {NUM_BLOCKS} comma-separated numbers (e.g. 1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5) or a preset: "
    f"{', '.join(PRESETS)}, optionally with +offset (e.g. cosine+0.5)"
)


class _Position(NamedTuple):
    """Where a diffusers U-Net layer sits: `down_blocks_<level>_<kind>_<number>_...`."""

    side: str
    level: int
    kind: str
    number: int


def _position(lora_name: str) -> _Position | None:
    match = _BLOCK_RE.search(lora_name)
    if match is None:
        return None
    side, level, kind, number = match.groups()
    return _Position(side, int(level), kind, int(number))


def unet_block_index(lora_name: str) -> int | None:
    """The LDM block (0-24) of a U-Net LoRA name, computed from the name alone as sd-scripts does.

    `down_blocks_i_{resnets,attentions}_j` -> 1 + 3i + j; `down_blocks_i_downsamplers_0` -> 3i + 3;
    `up_blocks_i_{resnets,attentions}_j` -> 13 + 3i + j; `up_blocks_i_upsamplers_0` -> 13 + 3i + 2
    (the same block as the level's third layer); any `mid_block_` layer -> 12. So
    `lora_unet_down_blocks_1_attentions_0_...` is 4, `lora_unet_up_blocks_2_resnets_1_conv1` is 20.

    None for text-encoder names and for U-Net names outside the three block groups (`conv_in`,
    `time_embedding`, ...): sd-scripts returns -1 there, but no SD1/SD2 LoRA target lies outside them.

    For a smaller test U-Net the index is the block the same position would have in SD's layout:
    with 2 levels of 1 layer, down uses 1 (layer), 3 (downsampler), 4, and up 13, 14, 15 (upsampler
    shares 15 with layer 2), 16, 17; the unused numbers simply have no layers.
    """
    if not lora_name.startswith(UNET_PREFIX):
        return None
    position = _position(lora_name)
    if position is None:
        return MID_BLOCK_INDEX if "mid_block_" in lora_name else None
    is_resampler = position.kind in ("upsamplers", "downsamplers")
    slot = SLOTS_PER_LEVEL * position.level + (SLOTS_PER_LEVEL - 1 if is_resampler else position.number)
    return 1 + slot if position.side == "down" else FIRST_UP_INDEX + slot


def fits_sd_layout(lora_name: str) -> bool:
    """False for a layer SD1/SD2 has no block for (a 5th level, a 3rd down layer, a 4th up layer).

    Such layers would share a block number with another layer, or fall past block 24.
    """
    position = _position(lora_name)
    if position is None:
        return True
    is_resampler = position.kind in ("upsamplers", "downsamplers")
    return position.level < SD_LEVELS and (is_resampler or position.number < SD_LAYERS_PER_LEVEL[position.side])


def preset_curve(name: str, num_blocks: int = NUM_BLOCKS) -> list[float]:
    """A preset's multipliers, shallow block first, with sd-scripts' formulas (x = i / (n - 1)).

    sine: sin(pi x / 2), 0 -> 1; cosine: the sine curve reversed, 1 -> 0; linear: x, 0 -> 1;
    reverse_linear: 1 -> 0; zeros: all 0. Unknown names raise ValueError.
    """
    if num_blocks < 2:
        raise ValueError(f"presets need at least 2 blocks, got num_blocks={num_blocks}")
    positions = [i / (num_blocks - 1) for i in range(num_blocks)]
    sine = [math.sin(math.pi * x / 2) for x in positions]
    curves = {
        "sine": sine,
        "cosine": sine[::-1],
        "linear": positions,
        "reverse_linear": positions[::-1],
        "zeros": [0.0] * num_blocks,
    }
    if name not in curves:
        raise ValueError(f"unknown preset {name!r}")
    return curves[name]


def _unset(value: object) -> bool:
    return value is None or str(value).strip().lower() in UNSET_VALUES


def _number(text: str, *, key: str, value: object, expected: str) -> float:
    """One entry of a list: empty means 0, as in sd-scripts; anything else must be a finite number."""
    if not text.strip():
        return 0.0
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserInputError(f"network_args {key}={value!r}: {text.strip()!r} is not a number; {expected}.")
    return number


def _parse_preset(text: str, *, key: str, num_blocks: int) -> list[float]:
    name, plus, offset_text = text.partition("+")
    name = name.strip()
    if name not in PRESETS:
        raise UserInputError(
            f"network_args {key}={text!r}: {name!r} is not a preset, and a value without commas is read "
            f"as a preset name; {_FORMS}."
        )
    if plus and not offset_text.strip():
        raise UserInputError(f"network_args {key}={text!r}: expected a number after '+'; {_FORMS}.")
    offset = _number(offset_text, key=key, value=text, expected=_FORMS) if plus else 0.0
    return [weight + offset for weight in preset_curve(name, num_blocks)]


def _fit_length(weights: list[float], *, key: str, num_blocks: int) -> list[float]:
    """Pad with 1.0 or truncate to `num_blocks`, warning as sd-scripts does."""
    if len(weights) > num_blocks:
        logger.warning("network_args %s has %d entries; entries after the %d-th are ignored.",
                       key, len(weights), num_blocks)
        return weights[:num_blocks]
    if len(weights) < num_blocks:
        logger.warning("network_args %s has %d entries; the missing ones up to %d are set to 1.0.",
                       key, len(weights), num_blocks)
        return weights + [1.0] * (num_blocks - len(weights))
    return weights


def parse_block_weights(value: str | None, *, key: str, num_blocks: int = NUM_BLOCKS) -> list[float] | None:
    """`down_lr_weight` / `up_lr_weight` as `num_blocks` multipliers; None when unset ("" or "none").

    See the module docstring for the forms; the zero threshold is applied later (`BlockLrWeights`).
    """
    if _unset(value):
        return None
    text = str(value).strip()
    if "," not in text:
        return _parse_preset(text, key=key, num_blocks=num_blocks)
    weights = [_number(entry, key=key, value=value, expected=_FORMS) for entry in text.split(",")]
    return _fit_length(weights, key=key, num_blocks=num_blocks)


def parse_mid_weight(value: str | None, *, key: str) -> float | None:
    """`mid_lr_weight` as one multiplier; None when unset. Only the first comma-separated entry counts."""
    if _unset(value):
        return None
    entries = str(value).split(",")
    expected = f"give one number, e.g. {key}=0.5"
    weights = [_number(entry, key=key, value=value, expected=expected) for entry in entries]
    if len(weights) > 1:
        logger.warning("network_args %s has %d entries; only the first is used.", key, len(weights))
    return weights[0]


def parse_zero_threshold(value: str | None, *, key: str = "block_lr_zero_threshold") -> float:
    """`block_lr_zero_threshold` as a number; 0.0 when unset."""
    if _unset(value):
        return 0.0
    return _number(str(value), key=key, value=value, expected=f"give a number, e.g. {key}=0.1")


@dataclass(frozen=True)
class BlockLrWeights:
    """Parsed block-wise lr multipliers: 12 down, 1 mid, 12 up (None = not given) and the zero threshold."""

    down: tuple[float, ...] | None = None
    mid: float | None = None
    up: tuple[float, ...] | None = None
    zero_threshold: float = 0.0

    def __post_init__(self) -> None:
        for name, weights in (("down", self.down), ("up", self.up)):
            if weights is not None and len(weights) != NUM_BLOCKS:
                raise ValueError(f"BlockLrWeights.{name} needs {NUM_BLOCKS} entries, got {len(weights)}")

    @classmethod
    def from_network_args(cls, network_args: Mapping[str, object]) -> BlockLrWeights | None:
        """Read the four keys from `create_network`'s kwargs; None when none of the three weights is set.

        As in sd-scripts, `block_lr_zero_threshold` alone does not turn block-wise rates on.
        """
        down = parse_block_weights(network_args.get("down_lr_weight"), key="down_lr_weight")
        mid = parse_mid_weight(network_args.get("mid_lr_weight"), key="mid_lr_weight")
        up = parse_block_weights(network_args.get("up_lr_weight"), key="up_lr_weight")
        threshold = parse_zero_threshold(network_args.get("block_lr_zero_threshold"))
        if down is None and mid is None and up is None:
            return None
        return cls(
            down=None if down is None else tuple(down),
            mid=mid,
            up=None if up is None else tuple(up),
            zero_threshold=threshold,
        )

    def _thresholded(self, weight: float) -> float:
        return weight if weight > self.zero_threshold else 0.0

    def block_weights(self) -> tuple[float, ...]:
        """The 25 multipliers, down + [mid] + up, after the threshold; unset groups are all 1.0."""
        groups = (
            [1.0] * NUM_BLOCKS if self.down is None else [self._thresholded(w) for w in self.down],
            [1.0] if self.mid is None else [self._thresholded(self.mid)],
            [1.0] * NUM_BLOCKS if self.up is None else [self._thresholded(w) for w in self.up],
        )
        return tuple(groups[0] + groups[1] + groups[2])

    def weight_for(self, lora_name: str) -> float:
        """The lr multiplier of one LoRA layer: its block's weight; 1.0 for text-encoder and non-block names.

        0.0 means the layer gets no LoRA module (see `is_zero`). Raises UserInputError for a U-Net
        layer that has no block in SD1/SD2's layout (see `fits_sd_layout`).
        """
        index = unet_block_index(lora_name)
        if index is None:
            return 1.0
        if not fits_sd_layout(lora_name):
            raise UserInputError(
                f"network_args down/mid/up_lr_weight: the U-Net layer {lora_name!r} has no block in SD1/SD2's "
                "layout (at most 4 levels, 2 down and 3 up layers per level), so its block-wise lr is undefined; "
                "remove down_lr_weight, mid_lr_weight and up_lr_weight for this model."
            )
        return self.block_weights()[index]

    def is_zero(self, lora_name: str) -> bool:
        """True when sd-scripts would create no LoRA module for this layer: its block's multiplier is 0."""
        return self.weight_for(lora_name) == 0.0

    def block_index(self, lora_name: str) -> int | None:
        """`unet_block_index(lora_name)`: the block a layer's lr is grouped under (None: not a U-Net block)."""
        return unet_block_index(lora_name)
