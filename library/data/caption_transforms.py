"""The caption a sample trains on, after sd-scripts' caption options, in sd-scripts' order:

1. `caption_prefix` / `caption_suffix` joined with a space;
2. the whole caption dropped (-> "") with probability `caption_dropout_rate`, and in every epoch
   that `caption_dropout_every_n_epochs` divides;
3. `enable_wildcard`: one line of a multi-line caption, then each `{a|b|c}` replaced by one of its
   choices (`{{` and `}}` are literal braces); without it, the first line;
4. when shuffling, tag dropout or token warmup is asked for, the tags (split on `caption_separator`)
   are split into fixed ones (the first `keep_tokens`, or those before `keep_tokens_separator`
   and after its second occurrence) and the rest, which is cut to its first tags until
   `token_warmup_step` (`token_warmup_min` at step 0, growing linearly), shuffled
   (`shuffle_caption`) and thinned (`caption_tag_dropout_rate`); the tags are joined back with ", ";
5. `secondary_separator` (e.g. ";;;", which keeps "red;;;dress" one tag through 4) becomes
   `caption_separator`.

CAT's trigger-free caption is derived afterwards, from this caption. Randomness comes from a stream
seeded by (seed, epoch, position in the epoch), so a resumed run draws exactly what the
uninterrupted one drew.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """One subset's caption options (sd-scripts' names without the `caption_` prefix where it has one)."""

    shuffle: bool = False
    separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    prefix: str = ""
    suffix: str = ""
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0
    tag_dropout_rate: float = 0.0
    wildcard: bool = False  # enable_wildcard
    secondary_separator: str = ""
    token_warmup_min: int = 1  # flexible tags kept at step 0
    token_warmup_step: float = 0.0  # all tags from this step on (below 1: this share of the run); 0: no warmup


def sample_rng(seed: int, epoch: int, position: int, stream: str = "caption") -> random.Random:
    """The random stream of one sample in one epoch; `stream` separates captions from image augmentations."""
    suffix = "" if stream == "caption" else f"/{stream}"
    return random.Random(f"{seed}/{epoch}/{position}{suffix}")


def transform_caption(caption: str, rng: random.Random, options: CaptionOptions, epoch: int = 1, step: int = 0,
                      max_train_steps: int = 0) -> str:
    """The caption after the options, drawing from `rng` in a fixed order (dropout, shuffle, tag dropout);
    `step` (optimizer steps done) and `max_train_steps` place it in the token warmup."""
    if options.prefix:
        caption = f"{options.prefix} {caption}"
    if options.suffix:
        caption = f"{caption} {options.suffix}"
    dropped = bool(options.dropout_rate) and rng.random() < options.dropout_rate
    if dropped or (options.dropout_every_n_epochs > 0 and epoch % options.dropout_every_n_epochs == 0):
        return ""
    caption = choose_wildcards(caption, rng) if options.wildcard else caption.split("\n")[0]
    warmup = warmup_steps(options.token_warmup_step, max_train_steps)
    uses_tags = options.shuffle or options.tag_dropout_rate > 0 or warmup > 0
    has_separator = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if uses_tags or has_separator:
        head, middle, tail = split_tags(caption, options)
        middle = middle[: warmed_up_tags(len(middle), step, options.token_warmup_min, warmup)]
        if options.shuffle:
            rng.shuffle(middle)
        if options.tag_dropout_rate > 0:
            middle = [tag for tag in middle if rng.random() >= options.tag_dropout_rate]
        caption = ", ".join(head + middle + tail)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.separator)
    return caption


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """sd-scripts' `token_warmup_step`: a value below 1 is that share of the run, rounded down to whole
    steps (0.25 of 1000 steps: 250); 1 or more is a step count as given. 0: no warmup."""
    return math.floor(token_warmup_step * max_train_steps) if token_warmup_step < 1 else token_warmup_step


def warmed_up_tags(tags: int, step: int, minimum: int, warmup: float) -> int:
    """How many of a caption's `tags` flexible tags are kept at `step` (sd-scripts' rule): `minimum` at
    step 0, growing linearly (rounded down) to all of them at step `warmup`."""
    if not warmup or step >= warmup:
        return tags
    return math.floor(step * ((tags - minimum) / warmup)) + minimum


def choose_wildcards(caption: str, rng: random.Random) -> str:
    """One line of a multi-line caption, with each `{a|b}` replaced by one of its choices; `{{`/`}}`
    stay literal braces (sd-scripts' wildcard rule)."""
    lines = caption.split("\n")
    if len(lines) > 1:
        caption = rng.choice(lines)
    open_mark, close_mark = "\x00", "\x01"  # characters no caption holds, for the escaped braces
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail) tags of a caption. With `keep_tokens_separator`
    ("a, b ||| c, d ||| e"), the head is before it and the tail after its second occurrence;
    otherwise the head is the first `keep_tokens` tags."""
    sep = options.separator or ","

    def tags(text: str) -> list[str]:
        return [tag.strip() for tag in text.split(sep) if tag.strip()]

    marker = options.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        middle, tail = rest.split(marker, 1) if marker in rest else (rest, "")
        return tags(head), tags(middle), tags(tail)
    all_tags = tags(caption)
    keep = max(options.keep_tokens, 0)
    return all_tags[:keep], all_tags[keep:], []
