"""Sample prompts are encoded as sd-scripts' sample images encode them: on SD 1.x/2.x its long prompt
weighting pipeline (weights, mean kept, up to 3 whole windows, <EOS> padding), on SDXL as weighted
captions, on FLUX.1 as text; a weight that is not a number stops the run when the prompt file is read."""

import logging

import pytest
import torch

from library.config.training_script import FLUX_SCRIPT, SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.families.clip_tokenizer import build_clip_tokenizer
from library.families.sd.sample_prompts import sample_prompt_states
from library.sampling.sample_prompts import load_sample_prompts
from library.testing.tiny_sd import build_tiny_sd
from library.testing.tiny_sdxl import build_tiny_sdxl

SD1 = build_clip_tokenizer()
SD2 = build_clip_tokenizer(pad_token="!")
BOS, EOS = SD1.bos_token_id, SD1.eos_token_id
WORD = SD1("word", verbose=False).input_ids[1]  # one token


def _ids_as_states(ids: torch.Tensor) -> torch.Tensor:
    """An "encoder" whose states are the ids themselves: shows which ids each window holds."""
    return ids[..., None].double()


def _layout(tokenizer, *prompts: str) -> list[list[list[int]]]:
    states = sample_prompt_states(tokenizer, _ids_as_states, list(prompts), torch.device("cpu"))
    return [s.reshape(-1, 77).long().tolist() for s in states]


def test_windows_follow_the_longer_prompt_and_keep_their_own_bos_and_eos():
    (prompt,), (negative,) = _layout(SD1, "word " * 10, "")
    assert prompt == [BOS] + [WORD] * 10 + [EOS] * 66 and negative == [BOS] + [EOS] * 76
    prompt, negative = _layout(SD1, "word " * 100, "")
    assert prompt == [[BOS] + [WORD] * 75 + [EOS], [BOS] + [WORD] * 25 + [EOS] * 51]
    assert negative == [[BOS] + [EOS] * 76] * 2, "padded to the prompt's two windows, with <EOS>"


def test_sd2_windows_are_closed_as_the_pipeline_closes_them():
    # "!" is SD 2.x's pad token, and also a word: a window starting with it after <BOS> gets <EOS> there.
    bang = SD2("!", verbose=False).input_ids[1]
    assert bang == SD2.pad_token_id
    cut, _ = _layout(SD2, "word " * 80, "")
    assert cut == [[BOS] + [WORD] * 75 + [EOS], [BOS] + [WORD] * 5 + [EOS] * 71], "a cut window closes with <EOS>"
    prompt, _ = _layout(SD2, "word " * 75 + "! " + "word " * 10, "")
    assert prompt[0] == [BOS] + [WORD] * 75 + [bang], "a pad id at the cut is left, as the pipeline leaves it"
    assert prompt[1] == [BOS, EOS] + [WORD] * 10 + [EOS] * 65, "and at a window's start it becomes <EOS>"
    (short,), _ = _layout(SD2, "! word", "")
    assert short == [BOS, bang, WORD] + [EOS] * 74, "one window is encoded as it is"


def test_prompts_past_225_tokens_are_cut_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="library.families.sd.sample_prompts"):
        prompt, _ = _layout(SD1, "word " * 300, "")
    assert prompt == [[BOS] + [WORD] * 75 + [EOS]] * 3
    assert "300 tokens" in caplog.text


@pytest.fixture(scope="module")
def tiny_sd():
    return build_tiny_sd(seed=0)


def test_weights_scale_their_tokens_then_the_mean_is_restored(tiny_sd):
    with torch.no_grad():
        plain = tiny_sd.prompt_kwargs("sks teapot", "")["prompt_embeds"]
        weighted = tiny_sd.prompt_kwargs("(sks:1.5) teapot", "", weighted=True)["prompt_embeds"]
    expected = plain.clone()
    expected[:, 1] *= 1.5  # <BOS> sks teapot <EOS>...: sks is one token
    expected *= plain.mean() / expected.mean()
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_unweighted_short_prompts_encode_exactly_as_training(tiny_sd):
    with torch.no_grad():
        training = tiny_sd.prompt_kwargs("a photo of sks teapot", "blurry")
        sampling = tiny_sd.prompt_kwargs("a photo of sks teapot", "blurry", weighted=True)
    assert all(torch.equal(training[key], sampling[key]) for key in training)


def test_long_sample_prompts_take_windows_whatever_max_token_length_is(tiny_sd):
    with torch.no_grad():
        embeds = tiny_sd.prompt_kwargs("word " * 100, "blurry", max_token_length=None, weighted=True)
        first_window = tiny_sd.text_encoder(torch.tensor([[BOS] + [WORD] * 75 + [EOS]])).last_hidden_state
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(embeds["prompt_embeds"][:, :77], first_window)


def test_sdxl_samples_weigh_tokens_as_weighted_captions_do():
    models = build_tiny_sdxl(seed=0)
    with torch.no_grad():
        plain = models.prompt_kwargs("sks teapot", "")
        weighted = models.prompt_kwargs("(sks:1.5) teapot", "", weighted=True)
    expected = plain["prompt_embeds"].clone()
    expected[:, 1] *= 1.5  # no rescaling; both encoders' states are weighted
    torch.testing.assert_close(weighted["prompt_embeds"], expected, rtol=0, atol=0)
    assert torch.equal(weighted["pooled_prompt_embeds"], plain["pooled_prompt_embeds"]), "the pooled one is not"


@pytest.mark.parametrize("script", [SD_SCRIPT, SDXL_SCRIPT])
def test_a_sample_weight_that_is_not_a_number_names_its_line(tmp_path, script):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of sks teapot\n(sks:1.2.3) teapot --n (blurry:0.5)\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"prompts.txt line 2: the weight ':1.2.3\)' in '\(sks:1.2.3\) teapot'"):
        load_sample_prompts(path, script.sample_defaults)
    path.write_text("a teapot --n (blurry:1..5)\n", encoding="utf-8")  # the negative prompt too
    with pytest.raises(UserInputError, match=r"line 1: the weight ':1..5\)' in '\(blurry:1..5\)'"):
        load_sample_prompts(path, script.sample_defaults)


def test_flux_reads_sample_prompts_as_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("(sks:1.2.3) teapot\n", encoding="utf-8")
    (prompt,) = load_sample_prompts(path, FLUX_SCRIPT.sample_defaults)
    assert prompt.prompt == "(sks:1.2.3) teapot"
