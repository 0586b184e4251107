"""The caption a sample trains on, after sd-scripts' caption options, in sd-scripts' order:

1. `caption_prefix` / `caption_suffix` joined with a space;
2. the whole caption dropped (-> "") with probability `caption_dropout_rate`, and in every epoch
   that `caption_dropout_every_n_epochs` divides;
3. otherwise, when shuffling or tag dropout is asked for, the tags (split on `caption_separator`)
   are split into fixed ones (the first `keep_tokens`, or those before `keep_tokens_separator`
   and after its second occurrence) and the rest, which is shuffled (`shuffle_caption`) and
   thinned (`caption_tag_dropout_rate`); the tags are joined back with ", ".

CAT's trigger-free caption is derived afterwards, from this caption. Randomness comes from a stream
seeded by (seed, epoch, position in the epoch), so a resumed run draws exactly what the
uninterrupted one drew.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


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
    uses_tags = options.shuffle or options.tag_dropout_rate > 0
    has_separator = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if not uses_tags and not has_separator:
        return caption
    head, middle, tail = split_tags(caption, options)
    if options.shuffle:
        rng.shuffle(middle)
    if options.tag_dropout_rate > 0:
        middle = [tag for tag in middle if rng.random() >= options.tag_dropout_rate]
    return ", ".join(head + middle + tail)


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
