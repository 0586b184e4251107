"""How `evaluate_kps.py` encodes each adapter's prompts: clip skip and token length, as the LoRA was trained.

A LoRA trained with `--clip_skip 2` learned under the states of the text encoder's penultimate layer;
sampled under the last layer's, it is scored under a conditioning it never saw. The trainer and
sd-scripts write both settings into the file (`ss_clip_skip`, `ss_max_token_length`; "None" for the
default), so the choice, setting by setting, is:

- a LoRA row: the flag (`--clip_skip`, `--max_token_length`) if given, else the file's metadata,
  else (the value "None" or no such key) the default: the last layer, one 75-token window;
- the base model's row, which has no file: the flag if given, else the first LoRA's value, so that
  it is scored as that LoRA is. LoRAs that disagree get a warning: the base row then compares with
  the first only;
- a setting the model family does not use (SDXL is conditioned on fixed layers: no clip skip) is
  None in every row, whatever the flag or the metadata say, so it neither names nor splits the cache.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from library.errors import UserInputError

logger = logging.getLogger(__name__)

TOKEN_LENGTHS = (75, 150, 225)  # one CLIP window, or sd-scripts' long prompts of 2 or 3 windows
METADATA_KEYS = {"clip_skip": "ss_clip_skip", "max_token_length": "ss_max_token_length"}


@dataclass(frozen=True)
class Conditioning:
    """What decides a prompt's embeddings besides its text (so it is part of an image's cache key)."""

    clip_skip: int | None = 1  # 1: the last layer; n: the n-th from the end, final norm applied; None: not used
    max_token_length: int = 75  # 75: one window; 150 or 225: sd-scripts' long prompts


DEFAULT = Conditioning()


@dataclass(frozen=True)
class ChosenConditioning:
    """An adapter's conditioning, with where each value came from (for results.json)."""

    conditioning: Conditioning
    origin: Mapping[str, str]  # setting -> "--clip_skip", "ss_clip_skip", "default", "as <first LoRA>" or "not used ..."

    def as_json(self) -> dict:
        return {**asdict(self.conditioning), "from": dict(self.origin)}


def choose_conditionings(
    flags: Mapping[str, int | None], loras: Sequence[tuple[Path, Mapping[str, str]]],
    unused: Mapping[str, str] | None = None,
) -> tuple[ChosenConditioning, list[ChosenConditioning]]:
    """(the base row's, each LoRA's) conditioning; `flags` by setting name (None: not given), `loras` the
    (file, metadata) of each LoRA in row order; a row is named by its file's stem. `unused`: the settings the
    model family does not use, each with the reason results.json gives (e.g. "not used by SDXL")."""
    unused = unused or {}
    chosen = [_lora_conditioning(flags, path, metadata, unused) for path, metadata in loras]
    values: dict[str, int | None] = {}
    origin: dict[str, str] = {}
    for setting in METADATA_KEYS:
        if setting in unused:
            values[setting], origin[setting] = None, unused[setting]
        elif flags.get(setting) is not None:
            values[setting], origin[setting] = flags[setting], f"--{setting}"
        elif chosen:
            values[setting], origin[setting] = getattr(chosen[0].conditioning, setting), f"as {loras[0][0].stem}"
            _warn_if_they_disagree(setting, [path.stem for path, _ in loras], chosen)
        else:
            values[setting], origin[setting] = getattr(DEFAULT, setting), "default"
    return ChosenConditioning(Conditioning(**values), origin), chosen


def _lora_conditioning(
    flags: Mapping[str, int | None], path: Path, metadata: Mapping[str, str], unused: Mapping[str, str]
) -> ChosenConditioning:
    values: dict[str, int | None] = {}
    origin: dict[str, str] = {}
    for setting, key in METADATA_KEYS.items():
        if setting in unused:  # its metadata is not read: a value there cannot matter, nor stop the run
            values[setting], origin[setting] = None, unused[setting]
            continue
        if flags.get(setting) is not None:
            values[setting], origin[setting] = flags[setting], f"--{setting}"
            continue
        trained = metadata_value(metadata, setting, path)
        if trained is None:
            values[setting], origin[setting] = getattr(DEFAULT, setting), "default"
        else:
            values[setting], origin[setting] = trained, key
    return ChosenConditioning(Conditioning(**values), origin)


def metadata_value(metadata: Mapping[str, str], setting: str, source: Path) -> int | None:
    """The value of `setting` a LoRA file's metadata records; None when it says "None" or has no such key."""
    key = METADATA_KEYS[setting]
    text = metadata.get(key)
    if text is None or text.strip() in ("", "None"):
        return None
    number = int(text) if text.strip().isdigit() else None
    if setting == "clip_skip" and number is not None and number >= 1:
        return number
    if setting == "max_token_length" and number in TOKEN_LENGTHS:
        return number
    allowed = "1 or more" if setting == "clip_skip" else ", ".join(map(str, TOKEN_LENGTHS))
    raise UserInputError(
        f"The LoRA file {source} has {key}={text!r} in its metadata, which is not a {setting} ({allowed}, or "
        f"None); pass --{setting} with the value it was trained with."
    )


def _warn_if_they_disagree(setting: str, names: Sequence[str], chosen: Sequence[ChosenConditioning]) -> None:
    values = [getattr(c.conditioning, setting) for c in chosen]
    if len(set(values)) > 1:
        each = ", ".join(f"{name} {value}" for name, value in zip(names, values))
        logger.warning(
            "The LoRAs were trained with different %s (%s); each is scored with its own, the base model with %s's "
            "(%s), so the base row compares with that LoRA only. Pass --%s to score them all with one.",
            setting, each, names[0], values[0], setting,
        )
