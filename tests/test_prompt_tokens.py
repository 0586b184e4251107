"""Long prompts (`--max_token_length 150|225`) cut into 77-position windows and joined back."""

import torch

from library.families.clip_tokenizer import build_clip_tokenizer
from library.families.prompt_tokens import merge_windows, tokenize
from library.families.sd.denoiser import SDDenoiser
from library.testing.tiny_sd import build_tiny_sd

BOS, EOS = 49406, 49407
LONG = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens


def test_windows_shape_and_framing_sd1():
    tokenizer = build_clip_tokenizer()
    ids = tokenize(tokenizer, [LONG, "a photo of sks"], 225)
    assert ids.shape == (2, 3, 77)
    assert (ids[:, :, 0] == BOS).all() and (ids[:, :, -1] == EOS).all()
    flat = tokenizer([LONG], padding="max_length", truncation=True, max_length=227, return_tensors="pt").input_ids[0]
    assert torch.equal(ids[0, 1, 1:76], flat[76:151]), "window 2 holds tokens 76-150"


def test_sd2_windows_are_closed_with_eos():
    tokenizer = build_clip_tokenizer(pad_token="!")
    ids = tokenize(tokenizer, [LONG, "short"], 150)
    assert ids.shape == (2, 2, 77)
    assert ids[0, 0, -1] == EOS, "a window cut mid-caption still ends with <EOS>"
    assert ids[1, 1, 1] == EOS, "an empty window starts <BOS> <EOS>"
    assert ids[1, 1, 2] == 0, "and is padded with '!'"


def test_merged_states_keep_the_first_window_and_length():
    sd = build_tiny_sd(seed=0)
    denoiser = SDDenoiser(sd.unet, sd.text_encoder)
    with torch.no_grad():
        plain = denoiser.encode(tokenize(sd.tokenizer, ["a photo of sks teapot"]))
        long = denoiser.encode(tokenize(sd.tokenizer, ["a photo of sks teapot"], 150))
        both = denoiser.encode(tokenize(sd.tokenizer, [LONG, "x"], 225))
    assert long.shape == (1, 152, plain.shape[-1]) and both.shape == (2, 227, plain.shape[-1])
    assert torch.equal(long[:, :76], plain[:, :76])
    out = sd.unet(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), both).sample
    assert out.shape == (2, 4, 8, 8)


def test_merge_windows_picks_positions():
    states = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(6, 77, 1)  # B=2, n=3
    merged = merge_windows(states, 2)
    assert merged.shape == (2, 227, 1)
    first = merged[0, :, 0].tolist()
    assert first[0] == 0 and first[1:76] == list(range(1, 76)) and first[76:151] == list(range(78, 153))
    assert first[-1] == 230
