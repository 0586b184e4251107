"""The caption a sample trains on, after sd-scripts' caption options, in sd-scripts' order:

1. `caption_prefix` / `caption_suffix` joined with a space;
2. the whole caption dropped (-> "") with probability `caption_dropout_rate`, and in every epoch
   that `caption_dropout_every_n_epochs` divides;
3. `enable_wildcard`: one line of a multi-line caption, then each `{a|b|c}` replaced by one of its
   choices (`{{` and `}}` are literal braces); without it, the first line;
4. when shuffling or tag dropout is asked for, the tags (split on `caption_separator`)
   are split into fixed ones (the first `keep_tokens`, or those before `keep_tokens_separator`
   and after its second occurrence) and the rest, which is shuffled (`shuffle_caption`) and
   thinned (`caption_tag_dropout_rate`); the tags are joined back with ", ";
5. `secondary_separator` (e.g. ";;;", which keeps "red;;;dress" one tag through 4) becomes
   `caption_separator`.

CAT's trigger-free caption is derived afterwards, from this caption. Randomness comes from a stream
seeded by (seed, epoch, position in the epoch), so a resumed run draws exactly what the
uninterrupted one drew.
"""

from __future__ import annotations

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


def sample_rng(seed: int, epoch: int, position: int, stream: str = "caption") -> random.Random:
    """The random stream of one sample in one epoch; `stream` separates captions from image augmentations."""
    suffix = "" if stream == "caption" else f"/{stream}"
    return random.Random(f"{seed}/{epoch}/{position}{suffix}")


def transform_caption(caption: str, rng: random.Random, options: CaptionOptions, epoch: int = 1) -> str:
    """The caption after the options, drawing from `rng` in a fixed order (dropout, shuffle, tag dropout)."""
    if options.prefix:
        caption = f"{options.prefix} {caption}"
    if options.suffix:
        caption = f"{caption} {options.suffix}"
    dropped = bool(options.dropout_rate) and rng.random() < options.dropout_rate
    if dropped or (options.dropout_every_n_epochs > 0 and epoch % options.dropout_every_n_epochs == 0):
        return ""
    caption = choose_wildcards(caption, rng) if options.wildcard else caption.split("\n")[0]
    uses_tags = options.shuffle or options.tag_dropout_rate > 0
    has_separator = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if uses_tags or has_separator:
        head, middle, tail = split_tags(caption, options)
        if options.shuffle:
            rng.shuffle(middle)
        if options.tag_dropout_rate > 0:
            middle = [tag for tag in middle if rng.random() >= options.tag_dropout_rate]
        caption = ", ".join(head + middle + tail)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.separator)
    return caption


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
