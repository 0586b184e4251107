"""Weighted captions (`--weighted_captions`): token ids with a weight per token, and the weighting of
the text states, as sd-scripts does both for SD 1.x/2.x and SDXL (library/strategy_base.py
`_get_weighted_input_ids` / `_get_input_ids`, library/strategy_sd.py and strategy_sdxl.py
`encode_tokens_with_weights`).

- Tokenizing: the caption is cut into runs of equal weight (library.cat.caption_weights), each run
  tokenized on its own and its tokens given its weight; the tokens are cut to the length
  (75, or `--max_token_length`), wrapped as <BOS> tokens <EOS> and padded, <BOS>, <EOS> and padding
  weighing 1; long prompts are cut into the same 75-token windows as unweighted ones.
- Encoding: the text encoders run on the ids exactly as without weights (clip skip included), then
  every token's hidden state is multiplied by its weight. No rescaling to the unweighted mean
  (sd-scripts' older `get_weighted_text_embeddings` did that; its training scripts no longer call it),
  and SDXL's pooled embedding is not weighted.

`WeightedTokens` carries ids and weights together wherever a batch of ids goes, so the caption
cache, the text-encoder cache and the CAT step need not know about weights; a family's `Denoiser.encode`
takes either form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from library.cat.caption_weights import parse_prompt_attention
from library.families.prompt_tokens import WINDOW, windows


@dataclass(frozen=True)
class WeightedTokens:
    """Token ids, batch first, as a family's `tokenize` makes them, and a float32 weight per id (same shape).

    It goes where a batch of ids goes: `.to(device)`, `len`, a row by index or iteration, and
    `torch.cat` / `torch.stack` of several (through PyTorch's `__torch_function__` protocol for
    tensor-like types; no other torch function takes it).
    """

    ids: Tensor
    weights: Tensor

    def to(self, device: torch.device | str) -> WeightedTokens:
        return WeightedTokens(self.ids.to(device), self.weights.to(device))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> WeightedTokens:
        return WeightedTokens(self.ids[index], self.weights[index])

    def __iter__(self) -> Iterator[WeightedTokens]:
        return (self[row] for row in range(len(self)))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in (torch.cat, torch.stack):
            return NotImplemented
        parts, *rest = args
        kwargs = kwargs or {}
        return cls(func([part.ids for part in parts], *rest, **kwargs),
                   func([part.weights for part in parts], *rest, **kwargs))


def split_weights(input_ids: Tensor | WeightedTokens) -> tuple[Tensor, Tensor | None]:
    """(ids, weights) of what a `Denoiser.encode` was given; weights None for plain ids."""
    if isinstance(input_ids, WeightedTokens):
        return input_ids.ids, input_ids.weights
    return input_ids, None


def tokenize_weighted(tokenizer, captions: list[str], max_token_length: int | None = None) -> WeightedTokens:
    """(B, 77) ids and weights, or (B, n, 77) windows of both for `max_token_length` = 75 * n."""
    long = bool(max_token_length) and max_token_length > WINDOW
    length = max_token_length + 2 if long else tokenizer.model_max_length
    rows = [_weighted_row(tokenizer, caption, length) for caption in captions]
    if not long:
        return WeightedTokens(torch.stack([ids for ids, _ in rows]), torch.stack([weights for _, weights in rows]))
    ids = torch.stack([windows(row, tokenizer, max_token_length) for row, _ in rows])
    return WeightedTokens(ids, torch.stack([_window_weights(weights, ids.shape[1]) for _, weights in rows]))


def weighted_tokens(tokenizer, caption: str) -> tuple[list[int], list[float]]:
    """The ids of `caption`'s tokens, without <BOS>/<EOS> and uncut, and a weight for each: every run of
    equal weight tokenized on its own."""
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(caption):
        run = tokenizer(text, verbose=False).input_ids[1:-1]  # without its own <BOS>, <EOS>
        tokens += run
        weights += [weight] * len(run)
    return tokens, weights


def _weighted_row(tokenizer, caption: str, length: int) -> tuple[Tensor, Tensor]:
    """<BOS> tokens <EOS> <PAD>... (`length` ids) and their weights, the tokens cut to `length` - 2."""
    tokens, weights = weighted_tokens(tokenizer, caption)
    tokens, weights = tokens[: length - 2], weights[: length - 2]
    padding = length - 2 - len(tokens)
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return torch.tensor(ids), torch.tensor([1.0, *weights] + [1.0] * (padding + 1))


def _window_weights(weights: Tensor, count: int) -> Tensor:
    """(count, 77) weights of the windows of one long row: its 75 tokens each, 1 at the window's ends."""
    windowed = torch.ones(count, WINDOW + 2)
    windowed[:, 1:-1] = weights[1 : 1 + count * WINDOW].reshape(count, WINDOW)
    return windowed


def apply_token_weights(states: Tensor, weights: Tensor) -> Tensor:
    """The text states (B, L, d) of one encoder with each token's state multiplied by its weight.

    `weights` (B, 77) match the states position by position; the product is in the promoted dtype
    (float32 for half-precision states), as sd-scripts multiplies. (B, n, 77) window weights: window i's
    75 tokens are positions 1 + 75i ... of the joined states (`merge_windows`), whose first <BOS> and last
    <EOS> weigh 1; the states keep their dtype, as sd-scripts writes these products into them.
    """
    weights = weights.to(states.device)
    if weights.dim() == 2:
        return states * weights.unsqueeze(-1)
    per_position = torch.ones(states.shape[:2], dtype=weights.dtype, device=states.device)
    per_position[:, 1:-1] = weights[:, :, 1:-1].flatten(1)
    return (states * per_position.unsqueeze(-1)).to(states.dtype)
