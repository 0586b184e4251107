"""`--weighted_captions`: sd-scripts' caption weight syntax, the weighted text states, CAT's trigger-free
caption of a weighted caption, and the runs on the tiny SD 1.x and SDXL models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import sdxl_train_network_cat
import train_network_cat
from library.cat.caption_weights import parse_prompt_attention
from library.cat.captions import trigger_free_caption
from library.cli.train_args import parse_args
from library.config.training_script import FLUX_SCRIPT, SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.families.clip_tokenizer import build_clip_tokenizer
from library.families.prompt_tokens import tokenize
from library.families.prompt_weights import WeightedTokens, apply_token_weights, tokenize_weighted
from library.families.sd.denoiser import SDDenoiser
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file
from library.training import trainer

BOS, EOS = 49406, 49407
DOWN = 1 / 1.1
LONG = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
# 60 tags of two tokens ("red", ","): the 41st "red" is token 81 (after <BOS>), in the second window.
REDS = ", ".join(["red"] * 60)
REDS_41ST_WEIGHTED = ", ".join(["red"] * 40 + ["(red:2)"] + ["red"] * 19)


# --- the syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, runs", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # sd-scripts' own example: weights multiply innermost first, and equal neighbours join.
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.0 * 1.3 * 1.1 * 1.1), (" ", 1.1 * 1.1 / 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 1.1 * 0.5), (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1)]),
    ("[a [b]] c", [("a ", DOWN), ("b", DOWN * DOWN), (" c", 1.0)]),
    ("(a:1.2) ) b", [("a", 1.2), (" ) b", 1.0)]),  # a bracket that closes nothing is text
    ("word:1.2) x", [("word:1.2) x", 1.0)]),
    ("(a:x)", [("a:x", 1.1)]),  # not a number: a colon in the text of a (…) group
    ("(a:-0.5) (b:+2)", [("a", -0.5), (" ", 1.0), ("b", 2.0)]),
    (r"a \\ b \[c\]", [("a \\ b [c]", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention_as_sd_scripts(text, runs):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in runs]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in runs], rel=1e-15)


def test_weights_are_the_float_products_sd_scripts_computes():
    (_, house), = [run for run in parse_prompt_attention("(((house:1.3)))") if run[0] == "house"]
    assert house == ((1.0 * 1.3) * 1.1) * 1.1 == 1.5730000000000004


def test_a_weight_that_is_not_a_number_is_a_user_error():
    with pytest.raises(UserInputError, match=r"':1\.2\.3\)' in '\(sks:1\.2\.3\) dog' is not a number"):
        parse_prompt_attention("(sks:1.2.3) dog")


# --- tokens and weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("pad, max_token_length", [("<|endoftext|>", None), ("!", None), ("<|endoftext|>", 150),
                                                    ("!", 225)])
def test_captions_without_weights_get_the_plain_ids_and_weight_one(pad, max_token_length):
    tokenizer = build_clip_tokenizer(pad_token=pad)
    captions = ["a photo of sks teapot, studio light", "", LONG]
    weighted = tokenize_weighted(tokenizer, captions, max_token_length)
    assert torch.equal(weighted.ids, tokenize(tokenizer, captions, max_token_length))
    assert weighted.weights.dtype == torch.float32 and (weighted.weights == 1).all()


def test_each_token_gets_its_run_s_weight():
    tokenizer = build_clip_tokenizer()
    weighted = tokenize_weighted(tokenizer, ["a (red:1.5) [teapot]"])
    assert torch.equal(weighted.ids, tokenize(tokenizer, ["a red teapot"]))  # a, red, teapot
    expected = torch.ones(1, 77)
    expected[0, 2], expected[0, 3] = 1.5, DOWN  # <BOS> a red teapot <EOS> ...
    assert torch.equal(weighted.weights, expected)


def test_long_captions_are_cut_and_windowed_with_their_weights():
    tokenizer = build_clip_tokenizer()
    plain = tokenize(tokenizer, [REDS], 150)
    weighted = tokenize_weighted(tokenizer, [REDS_41ST_WEIGHTED], 150)
    assert torch.equal(weighted.ids, plain)
    expected = torch.ones(1, 2, 77)
    expected[0, 1, 81 - 75] = 2.0  # token 81 is window 2's 6th (its position 0 is <BOS>)
    assert torch.equal(weighted.weights, expected)
    cut = tokenize_weighted(tokenizer, [REDS_41ST_WEIGHTED])  # 75 tokens: cut before it, closed with <EOS>
    assert torch.equal(cut.ids, tokenize(tokenizer, [REDS])) and cut.ids[0, -1] == EOS and (cut.weights == 1).all()


def test_weighted_tokens_go_where_ids_go():
    tokenizer = build_clip_tokenizer()
    a, b = tokenize_weighted(tokenizer, ["(a:2)"]), tokenize_weighted(tokenizer, ["b"])
    both = torch.cat([a, b])
    assert isinstance(both, WeightedTokens) and both.ids.shape == (2, 77) and both.weights[0, 1] == 2
    stacked = torch.stack([a, b], dim=1)
    assert stacked.ids.shape == (1, 2, 77) and torch.equal(stacked.weights[:, 1], b.weights)
    rows = list(both)
    assert len(rows) == len(both) == 2 and torch.equal(rows[1].ids, b.ids[0]) and torch.equal(both[0].weights, a.weights[0])
    with pytest.raises(TypeError):
        torch.add(a, a)


# --- the weighted text states ----------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_sd_states_are_the_plain_states_times_the_weights(clip_skip):
    sd = build_tiny_sd(seed=0)
    denoiser = SDDenoiser(sd.unet, sd.text_encoder, clip_skip)
    with torch.no_grad():
        plain = denoiser.encode(tokenize(sd.tokenizer, ["a photo of sks, red teapot"]))
        weighted = denoiser.encode(sd.tokenize(["a photo of (sks:1.3), (red:1.5) [teapot]"], weighted=True))
    factor = torch.ones(77)
    factor[4], factor[6], factor[7] = 1.3, 1.5, DOWN  # <BOS> a photo of sks , red teapot <EOS>
    assert torch.equal(weighted, plain * factor[None, :, None])
    assert not torch.equal(weighted, plain)


def test_sd_long_prompt_weights_land_on_the_joined_positions():
    sd = build_tiny_sd(seed=0)
    denoiser = SDDenoiser(sd.unet, sd.text_encoder, 2)
    with torch.no_grad():
        plain = denoiser.encode(tokenize(sd.tokenizer, [REDS], 150))
        weighted = denoiser.encode(sd.tokenize([REDS_41ST_WEIGHTED], 150, weighted=True))
    factor = torch.ones(152)
    factor[81] = 2.0  # window 2's 6th token is position 81 of the joined 152 (<BOS>, 75 + 75 tokens, <EOS>)
    assert torch.equal(weighted, plain * factor[None, :, None])


def test_sdxl_weights_both_encoders_states_not_the_pooled_embedding():
    xl = build_tiny_sdxl(seed=0)
    denoiser = xl.denoiser()
    with torch.no_grad():
        plain = denoiser.encode(xl.tokenize(["a photo of sks, red teapot"]))
        weighted = denoiser.encode(xl.tokenize(["a photo of (sks:1.3), (red:1.5) [teapot]"], weighted=True))
    factor = torch.ones(77)
    factor[4], factor[6], factor[7] = 1.3, 1.5, DOWN
    assert torch.equal(weighted.states, plain.states * factor[None, :, None])
    assert torch.equal(weighted.pooled, plain.pooled)


def test_half_states_are_weighted_in_sd_scripts_dtypes():
    states = torch.randn(2, 152, 8).half()
    window_weights = torch.ones(2, 2, 77)
    window_weights[:, 1, 5] = 1.7
    # sd-scripts writes the products of each window into the states in place (their dtype stays).
    expected = states.clone()
    for i in range(2):
        expected[:, i * 75 + 1 : i * 75 + 76] = expected[:, i * 75 + 1 : i * 75 + 76] * window_weights[:, i, 1:-1].unsqueeze(-1)
    windowed = apply_token_weights(states, window_weights)
    assert windowed.dtype == torch.float16 and torch.equal(windowed, expected)
    # Without windows it multiplies the whole states by the float32 weights: the product is float32.
    short = apply_token_weights(states[:, :77], window_weights[:, 1])
    assert short.dtype == torch.float32 and torch.equal(short, states[:, :77] * window_weights[:, 1].unsqueeze(-1))


def test_weights_of_one_change_nothing_bitwise():
    sd = build_tiny_sd(seed=0)
    denoiser = SDDenoiser(sd.unet, sd.text_encoder)
    with torch.no_grad():
        ids = sd.tokenize(["a photo of sks teapot"])
        assert isinstance(ids, torch.Tensor) and torch.equal(ids, tokenize(sd.tokenizer, ["a photo of sks teapot"]))
        assert torch.equal(denoiser.encode(sd.tokenize(["a photo of sks teapot"], weighted=True)), denoiser.encode(ids))


# --- CAT's trigger-free caption --------------------------------------------------------------------


@pytest.mark.parametrize("caption, free", [
    ("(sks:1.3) dog", "dog"),
    ("a ((sks)), dog", "a, dog"),
    ("(sks dog:1.2)", "(dog:1.2)"),
    ("(sks, dog:1.2), [red]", "(dog:1.2), [red]"),
    ("a photo of (sks:1.2), (red:1.1) teapot", "a photo of, (red:1.1) teapot"),
    ("([sks]:0.5) teapot", "teapot"),
    ("[[sks]:0.5] teapot", "[:0.5] teapot"),  # ":0.5" in [...] is text, not a weight
    (r"\(sks\) teapot", r"\(\) teapot"),  # escaped brackets are text: kept
    ("(red:1.1) teapot", "(red:1.1) teapot"),  # no trigger: unchanged
])
def test_the_trigger_leaves_weight_groups_and_the_rest_keeps_its_weights(caption, free):
    assert trigger_free_caption(caption, ["sks"], weighted=True) == free


def test_without_the_flag_brackets_are_text():
    assert trigger_free_caption("(sks:1.3) dog", ["sks"]) == "(:1.3) dog"


def test_the_trigger_free_caption_keeps_the_rest_s_token_weights():
    tokenizer = build_clip_tokenizer()
    free = trigger_free_caption("a photo of (sks:1.3), (red:1.5) [teapot]", ["sks"], weighted=True)
    weighted = tokenize_weighted(tokenizer, [free])
    assert torch.equal(weighted.ids, tokenize(tokenizer, ["a photo of, red teapot"]))
    assert weighted.weights[0, :8].tolist() == pytest.approx([1, 1, 1, 1, 1, 1.5, DOWN, 1])


def test_class_mode_puts_the_class_word_inside_the_group():
    assert trigger_free_caption("(sks:1.3) dog", ["sks"], "class", "teapot", weighted=True) == "(teapot:1.3) dog"


# --- the command line --------------------------------------------------------------------------------

BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--train_data_dir", "data", "--resolution", "64",
        "--output_dir", "out", "--cat_trigger", "sks"]


@pytest.mark.parametrize("script", [SD_SCRIPT, SDXL_SCRIPT])
def test_the_flag_reaches_the_configuration(script):
    assert parse_args([*BASE, "--weighted_captions"], script).model.weighted_captions
    assert not parse_args(BASE, script).model.weighted_captions


def test_flux_refuses_the_flag_with_a_sentence():
    with pytest.raises(UserInputError, match=r"--weighted_captions: FLUX\.1 has no weighted captions \(sd-scripts' "
                                             r"flux_train_network\.py fails on them"):
        parse_args([*BASE, "--weighted_captions"], FLUX_SCRIPT)


# --- end to end on the tiny models -------------------------------------------------------------------

TRAIN_CAPTION = "a photo of (sks, red:1.3) [teapot]"
# The same tokens as plain text, and each token's weight (<BOS> a photo of sks , red teapot <EOS>).
PLAIN_TRAIN, TRAIN_WEIGHTS = "a photo of sks, red teapot", {4: 1.3, 5: 1.3, 6: 1.3, 7: DOWN}
# y = "a photo of (red:1.3) [teapot]": the trigger and its comma leave the group (<BOS> a photo of red teapot <EOS>).
PLAIN_FREE, FREE_WEIGHTS = "a photo of red teapot", {4: 1.3, 5: DOWN}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    save_single_file(build_tiny_sd(seed=0), root / "tiny_sd.safetensors")
    save_sdxl_single_file(build_tiny_sdxl(seed=0), root / "tiny_sdxl.safetensors")
    concept = root / "data" / "1_sks teapot"
    concept.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(concept / "000.png")
    (concept / "000.txt").write_text(TRAIN_CAPTION, encoding="utf-8")
    return root


def _argv(workspace: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(workspace / model), "--train_data_dir", str(workspace / "data"),
            "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "cat",
            "--network_dim", "4", "--max_train_steps", "1", "--train_batch_size", "1", "--seed", "3",
            "--cat_trigger", "sks", "--cat_mode", "sequential", "--network_train_unet_only",
            "--max_data_loader_n_workers", "0", *extra]


def _record_text_states(monkeypatch) -> tuple[list, list]:
    """The text states of every U-Net call of the CAT steps, and the denoiser the loop used."""
    seen, denoisers = [], []
    real_step = trainer.cat_step

    class Recording:
        def __init__(self, denoiser):
            self.denoiser = denoiser

        def encode(self, input_ids):
            return self.denoiser.encode(input_ids)

        def predict(self, noisy_latents, timesteps, text_states, **conditioning):
            seen.append(text_states)
            return self.denoiser.predict(noisy_latents, timesteps, text_states, **conditioning)

    def cat_step(denoiser, *args):
        denoisers.append(denoiser)
        return real_step(Recording(denoiser), *args)

    monkeypatch.setattr(trainer, "cat_step", cat_step)
    return seen, denoisers


def _weighted(states: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    factor = torch.ones(states.shape[1])
    for position, weight in weights.items():
        factor[position] = weight
    return states * factor[None, :, None]


@pytest.mark.parametrize("extra", [("--clip_skip", "2"), ("--max_token_length", "150")])
def test_sd_trains_on_the_weighted_states_of_both_captions(workspace, tmp_path, monkeypatch, extra):
    seen, denoisers = _record_text_states(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "tiny_sd.safetensors", "--model_config", str(tiny_config_dir(False)),
                 "--weighted_captions", *extra)
    assert train_network_cat.main(argv) == 0
    denoiser, length = denoisers[0], int(extra[1]) if extra[0] == "--max_token_length" else None
    assert denoiser.clip_skip == (2 if extra[0] == "--clip_skip" else None)
    with torch.no_grad():  # the text encoder carries no adapter (--network_train_unet_only): still the base one
        plain_train = denoiser.encode(tokenize(build_clip_tokenizer(), [PLAIN_TRAIN], length))
        plain_free = denoiser.encode(tokenize(build_clip_tokenizer(), [PLAIN_FREE], length))
    # Sequential CAT: the base model's reference on y, the main term on y_T, the CAT term on y.
    reference, main, cat = seen
    assert torch.equal(main, _weighted(plain_train, TRAIN_WEIGHTS))
    assert torch.equal(reference, _weighted(plain_free, FREE_WEIGHTS)) and torch.equal(cat, reference)
    assert not torch.equal(main, plain_train)


@pytest.mark.parametrize("cache", [False, True])
def test_sdxl_trains_on_the_weighted_states_also_from_the_cache(workspace, tmp_path, monkeypatch, cache):
    seen, denoisers = _record_text_states(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "tiny_sdxl.safetensors", "--model_config", str(TINY_SDXL_CONFIG),
                 "--weighted_captions", *(("--cache_text_encoder_outputs",) if cache else ()))
    assert sdxl_train_network_cat.main(argv) == 0
    denoiser = denoisers[0].denoiser if cache else denoisers[0]
    assert type(denoisers[0]).__name__ == ("CachedTextDenoiser" if cache else "SDXLDenoiser")
    tokenizers = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")  # SDXL's two

    def plain_ids(caption: str) -> torch.Tensor:
        return torch.stack([tokenize(tokenizer, [caption]) for tokenizer in tokenizers], dim=1)

    with torch.no_grad():
        plain_train, plain_free = denoiser.encode(plain_ids(PLAIN_TRAIN)), denoiser.encode(plain_ids(PLAIN_FREE))
    reference, main, cat = seen
    assert torch.equal(main.states, _weighted(plain_train.states, TRAIN_WEIGHTS))
    assert torch.equal(main.pooled, plain_train.pooled)
    assert torch.equal(reference.states, _weighted(plain_free.states, FREE_WEIGHTS))
    assert torch.equal(cat.states, reference.states)


def test_a_caption_weight_that_is_not_a_number_is_reported_with_its_image(workspace, tmp_path, capsys):
    concept = tmp_path / "data" / "1_sks teapot"
    concept.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(concept / "bad.png")
    (concept / "bad.txt").write_text("(sks:1..3) teapot", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "tiny_sd.safetensors", "--model_config", str(tiny_config_dir(False)),
                 "--weighted_captions", "--train_data_dir", str(tmp_path / "data"))
    assert train_network_cat.main(argv) == 2
    error = capsys.readouterr().err
    assert "bad.png" in error and "':1..3)'" in error and "is not a number" in error
