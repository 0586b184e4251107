"""The per-run caption token cache gives exactly the tokenizer's ids; the gradients' largest value for the divergence check."""

import pytest
import torch

from library.families.clip_tokenizer import build_clip_tokenizer
from library.families.prompt_tokens import tokenize
from library.training.caption_tokens import CaptionTokens
from library.training.trainer import _largest_gradient


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
def test_the_largest_gradient_finds_nan_and_inf(bad, dtype):
    def params(*grads):
        made = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads]
        for param, grad in zip(made, grads):
            param.grad = grad
        return made + [torch.nn.Parameter(torch.zeros(2))]  # one without a gradient

    good = params(torch.ones(3, dtype=dtype), torch.full((2, 2), 6e4, dtype=dtype), torch.zeros(0, dtype=dtype))
    assert torch.isfinite(_largest_gradient(good)) and torch.isfinite(_largest_gradient([]))
    assert _largest_gradient(good) == 6e4 or dtype == torch.bfloat16  # 6e4 rounds in bfloat16
    assert not torch.isfinite(_largest_gradient(good + params(torch.tensor([1.0, bad]).to(dtype))))
