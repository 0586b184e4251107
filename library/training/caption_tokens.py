"""Token ids of training captions, each distinct caption tokenized once per run.

A dataset's captions come back every epoch (and, with CAT, as the same trigger-free caption), and
tokenizing is a pure function of the text, so the ids are kept after the first time. Captions that
change every epoch (`--shuffle_caption`, `--caption_dropout_rate`, wildcards) stop being kept once
`max_entries` distinct ones are held; those are tokenized each time, as before.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MAX_ENTRIES = 16384  # about 10 MB of (77,) int64 rows for SD; SDXL's (2, 77) rows twice that


class CaptionTokens:
    """`tokenize(captions)` (batch first, one row per caption), with each row kept per caption text."""

    def __init__(self, tokenize: Callable[[list[str]], Tensor], max_entries: int = MAX_ENTRIES):
        self._tokenize = tokenize
        self._rows: dict[str, Tensor] = {}
        self._max_entries = max_entries

    def __call__(self, captions: list[str]) -> Tensor:
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self._rows]
        if not missing:
            return torch.stack([self._rows[caption] for caption in captions])
        # Rows are independent of each other (every caption padded to the same length), so
        # tokenizing the missing ones alone gives the same ids as tokenizing the whole batch.
        fresh = dict(zip(missing, self._tokenize(missing)))
        rows = torch.stack([self._rows[caption] if caption in self._rows else fresh[caption] for caption in captions])
        for caption, row in fresh.items():
            if len(self._rows) < self._max_entries:
                self._rows[caption] = row
        return rows
