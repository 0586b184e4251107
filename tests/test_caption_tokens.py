"""The per-run caption token cache gives exactly the tokenizer's ids; the one-sync finiteness check."""

import pytest
import torch

from library.families.clip_tokenizer import build_clip_tokenizer
from library.families.prompt_tokens import tokenize
from library.training.caption_tokens import CaptionTokens
from library.training.trainer import _all_finite


def test_cached_ids_equal_the_tokenizer_and_each_caption_is_tokenized_once():
    tokenizer = build_clip_tokenizer()
    seen: list[list[str]] = []

    def counting(texts):
        seen.append(list(texts))
        return tokenize(tokenizer, texts)

    tokens = CaptionTokens(counting)
    batches = [["a photo of sks teapot", "sks teapot"], ["sks teapot", "sks teapot"], ["a teapot", "a photo of sks teapot"]]
    for batch in batches:
        assert torch.equal(tokens(batch), tokenize(tokenizer, batch))
    assert seen == [["a photo of sks teapot", "sks teapot"], ["a teapot"]]


def test_long_prompt_windows_and_the_entry_limit():
    tokenizer = build_clip_tokenizer()
    tokens = CaptionTokens(lambda texts: tokenize(tokenizer, texts, 150), max_entries=1)
    batch = ["word " * 100, "short caption"]
    assert torch.equal(tokens(batch), tokenize(tokenizer, batch, 150))
    assert torch.equal(tokens(batch[::-1]), tokenize(tokenizer, batch[::-1], 150))  # the one not kept: tokenized again


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_nan_and_inf(bad, dtype):
    good = [torch.ones(3, dtype=dtype), torch.full((2, 2), 6e4, dtype=dtype), torch.zeros(0, dtype=dtype)]
    assert _all_finite(good) and _all_finite([])
    assert not _all_finite(good + [torch.tensor([1.0, bad]).to(dtype)])
