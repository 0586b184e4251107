"""The caption a sample trains on, after sd-scripts' `--shuffle_caption`, `--keep_tokens` and
`--caption_dropout_rate`. CAT's trigger-free caption is derived afterwards, from this caption.

Randomness comes from a stream seeded by (seed, epoch, position in the epoch), so a resumed run
draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import random


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The random stream of one sample in one epoch."""
    return random.Random(f"{seed}/{epoch}/{position}")


def transform_caption(
    caption: str, rng: random.Random, *, shuffle: bool = False, keep_tokens: int = 0,
    dropout_rate: float = 0.0, separator: str = ",",
) -> str:
    """Drop the whole caption with probability `dropout_rate` (-> ""), else shuffle its tags after the
    first `keep_tokens` ones (sd-scripts splits on the separator and rejoins with "<sep> ")."""
    if dropout_rate and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    sep = separator.strip() or ","
    tags = [tag.strip() for tag in caption.split(sep)]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return f"{sep} ".join(tag for tag in fixed + rest if tag)
