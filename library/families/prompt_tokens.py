"""Token ids for captions, including sd-scripts' long prompts (`--max_token_length 150|225`).

CLIP sees 77 positions (<BOS>, 75 tokens, <EOS>). A long prompt is tokenized to
`max_token_length + 2` ids and cut into windows of 75 tokens, each re-wrapped as
<BOS> window <last id>; the text encoder encodes each window and `merge_windows` joins the hidden
states back into one sequence of `max_token_length + 2` positions (first <BOS>, the windows
without their own <BOS>/<EOS>, last <EOS>), as sd-scripts does.
"""

from __future__ import annotations

import torch
from torch import Tensor

WINDOW = 75  # tokens between <BOS> and <EOS>


def tokenize(tokenizer, captions: list[str], max_token_length: int | None = None) -> Tensor:
    """(B, 77) ids, or (B, n, 77) windows for `max_token_length` = 75 * n (n = 2 or 3)."""
    if not max_token_length or max_token_length <= WINDOW:
        return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids
    return torch.stack([windows(row, tokenizer, max_token_length) for row in ids])


def windows(ids: Tensor, tokenizer, max_token_length: int) -> Tensor:
    """(n, 77) windows of one row of `max_token_length + 2` ids."""
    windows = []
    for start in range(1, max_token_length - WINDOW + 2, WINDOW):
        window = torch.cat([ids[:1], ids[start : start + WINDOW], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # SD2 pads with "!": keep each window closed
            if window[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                window[-1] = tokenizer.eos_token_id
            if window[1] == tokenizer.pad_token_id:
                window[1] = tokenizer.eos_token_id
        windows.append(window)
    return torch.stack(windows)


def merge_windows(states: Tensor, batch: int) -> Tensor:
    """(B*n, 77, d) hidden states of the windows -> (B, 75n + 2, d) for the U-Net."""
    per_sample = states.reshape(batch, -1, states.shape[-1])
    length = states.shape[1]
    parts = [per_sample[:, :1]]
    parts += [per_sample[:, start : start + WINDOW] for start in range(1, per_sample.shape[1], length)]
    parts.append(per_sample[:, -1:])
    return torch.cat(parts, dim=1)
