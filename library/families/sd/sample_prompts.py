"""A sample prompt encoded as sd-scripts' sample images encode it on SD 1.x/2.x: its long prompt
weighting pipeline (library/lpw_stable_diffusion.py, `get_weighted_text_embeddings`, as
`train_util.sample_images` calls it: up to 3 windows, no `no_boseos_middle`). Where it differs from
training's encoding (library.families.prompt_tokens, prompt_weights), each difference is sd-scripts':

- `(word:1.2)` weights always apply (AUTOMATIC1111's syntax, library.cat.caption_weights), after clip
  skip; then each prompt's states are rescaled so that their mean over positions and channels is
  the unweighted one (the pipeline's rule, and AUTOMATIC1111's; training's weighted captions skip it);
- as many 75-token windows as the longer of prompt and negative prompt needs, at most 3 (225
  tokens), whatever `--max_token_length` is; every window keeps its own <BOS> and <EOS> states, so
  the U-Net sees 77 n positions (training joins windows to 75 n + 2);
- the ids are padded with <EOS>, also on SD 2.x (whose tokenizer pads with "!" in training).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from library.families.prompt_tokens import WINDOW
from library.families.prompt_weights import weighted_tokens

logger = logging.getLogger(__name__)

MAX_WINDOWS = 3  # the pipeline's `max_embeddings_multiples` default, which sd-scripts' sampling keeps


def sample_prompt_states(tokenizer, encode: Callable[[Tensor], Tensor], prompts: list[str],
                         device: torch.device) -> list[Tensor]:
    """The (1, 77 n, d) text states of each of `prompts` (all with the same n), weighted and rescaled.
    `encode` takes (k, 77) ids to their (k, 77, d) states, clip skip included."""
    parsed = [_cut(weighted_tokens(tokenizer, prompt), prompt) for prompt in prompts]
    longest = max(len(tokens) for tokens, _ in parsed)
    count = max(1, min(MAX_WINDOWS, (longest - 1) // WINDOW + 1))
    return [_states(tokenizer, encode, tokens, weights, count, device) for tokens, weights in parsed]


def _cut(tokens_and_weights: tuple[list[int], list[float]], prompt: str) -> tuple[list[int], list[float]]:
    tokens, weights = tokens_and_weights
    limit = MAX_WINDOWS * WINDOW
    if len(tokens) > limit:
        logger.warning("sample prompt %r has %d tokens; sampling reads the first %d, as sd-scripts does",
                       prompt, len(tokens), limit)
    return tokens[:limit], weights[:limit]


def _states(tokenizer, encode: Callable[[Tensor], Tensor], tokens: list[int], weights: list[float], count: int,
            device: torch.device) -> Tensor:
    length = WINDOW * count + 2
    ids = torch.tensor([tokenizer.bos_token_id, *tokens] + [tokenizer.eos_token_id] * (length - 1 - len(tokens)))
    windows = ids[None] if count == 1 else torch.stack([_window(ids, i, tokenizer) for i in range(count)])
    states = encode(windows.to(device)).reshape(1, count * (WINDOW + 2), -1)
    per_position = torch.ones(count, WINDOW + 2, dtype=torch.float64)  # cast once, as the pipeline casts its list
    for i in range(count):
        part = weights[i * WINDOW : (i + 1) * WINDOW]
        per_position[i, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.float64)
    return _weighted_keeping_mean(states, per_position.reshape(1, -1).to(device, states.dtype))


def _window(ids: Tensor, index: int, tokenizer) -> Tensor:
    """The pipeline's window `index`: its 77 ids, opened by <BOS> and closed by <EOS> (SD 2.x: closed
    only where a token would be cut, and a window of padding alone starts with <EOS>)."""
    window = ids[index * WINDOW : index * WINDOW + WINDOW + 2].clone()
    window[0] = ids[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad == eos:
        window[-1] = ids[-1]
    else:
        if window[-1] not in (eos, pad):
            window[-1] = eos
        if window[1] == pad:
            window[1] = eos
    return window


def _weighted_keeping_mean(states: Tensor, weights: Tensor) -> Tensor:
    """`states` (1, L, d) times each position's weight, rescaled to the unweighted mean, in the
    pipeline's order and dtypes (means taken in float32, then cast back)."""
    previous = states.float().mean(dim=(-2, -1)).to(states.dtype)
    weighted = states * weights.unsqueeze(-1)
    current = weighted.float().mean(dim=(-2, -1)).to(states.dtype)
    return weighted * (previous / current)[:, None, None]
