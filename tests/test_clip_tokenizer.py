"""The offline CLIP tokenizer gives Stable Diffusion's exact token ids."""

import copy
import pickle

import pytest
from transformers import CLIPTokenizer

from library.families.clip_tokenizer import (
    SD2_PAD_TOKEN,
    VOCAB_SIZE,
    build_clip_tokenizer,
    bytes_to_unicode,
    clean_clip_text,
    clip_vocab_and_merges,
    with_clip_text_cleaning,
)
from library.errors import UserInputError


def test_known_sd_ids():
    tokenizer = build_clip_tokenizer()
    assert tokenizer("sks").input_ids == [49406, 48136, 49407]
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_layout_is_clips():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert len(merges) == 49408 - 2 * 256 - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[bytes_to_unicode()[ord(" ")]] == 220  # the space byte, remapped to a printable symbol
    assert vocab["".join(merges[0])] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_byte_table_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert not any(symbol.isspace() for symbol in table.values())


@pytest.mark.parametrize(
    "text",
    [
        "a photo of sks dog, masterpiece, (best quality:1.2)",
        "Hello, World!  It's 2024 -- don't   panic",
        "café naïve über 東京 🙂",
        "<lora:style:0.8> score_9, 1girl",
        # What CLIP's ftfy cleaning changes, and what LLM captioners and scraped captions hold:
        "fish &amp; chips, Tom &amp;amp; Jerry, &lt;3",
        "The dog’s toy, “quoted”, ‘single’",
        "a ﬁsh and a ﬂower",
        "Ｈｅｌｌｏ ｗｏｒｌｄ １２３",
        "mojibake: cafÃ© and naÃ¯ve",
        "tabs\tand\nnew lines \u00a0 and  runs   of spaces ",
    ],
)
def test_agrees_with_open_clip_reference_tokenizer(text):
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    reference = open_clip_tokenizer.SimpleTokenizer()
    assert build_clip_tokenizer()(text).input_ids == [49406, *reference.encode(text), 49407]


def test_every_encoding_path_cleans_the_text():
    tokenizer = build_clip_tokenizer()
    clean = tokenizer("the dog's toy").input_ids
    assert tokenizer("the dog’s toy").input_ids == clean
    assert tokenizer.encode("the dog’s toy") == clean
    assert tokenizer(["the dog’s toy", "ﬁsh"]).input_ids == [clean, tokenizer("fish").input_ids]
    assert tokenizer.tokenize("the dog’s toy") == ["the</w>", "dog</w>", "'s</w>", "toy</w>"]
    padded = tokenizer("the dog’s toy", padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert padded[0, : len(clean)].tolist() == clean


def test_entities_next_to_a_less_than_sign_are_kept_as_transformers_4_with_ftfy_keeps_them():
    # open_clip (and OpenAI's CLIP) unescape twice more after ftfy and would give "&" here; sd-scripts'
    # tokenizer (transformers 4's CLIPTokenizer with ftfy) keeps "&amp;", and so do we.
    assert clean_clip_text("<lora:x:1> fish &amp; chips") == "<lora:x:1> fish &amp; chips"
    assert clean_clip_text("fish &amp; chips") == "fish & chips"


def test_the_cleaning_tokenizer_is_a_plain_clip_tokenizer_that_copies_and_pickles(tmp_path):
    tokenizer = build_clip_tokenizer()
    assert type(tokenizer) is CLIPTokenizer  # what diffusers writes into model_index.json on save
    expected = tokenizer("dog's").input_ids
    assert copy.deepcopy(tokenizer)("dog’s").input_ids == expected
    assert pickle.loads(pickle.dumps(tokenizer))("dog’s").input_ids == expected
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("dog’s").input_ids != expected  # transformers 5 alone does not clean
    assert with_clip_text_cleaning(reloaded)("dog’s").input_ids == expected


def test_sd1_pads_with_end_of_text_and_sd2_with_exclamation_mark():
    sd1 = build_clip_tokenizer()
    sd2 = build_clip_tokenizer(pad_token=SD2_PAD_TOKEN)
    assert sd1("a cat", padding="max_length").input_ids == [49406, 320, 2368] + [49407] * 74
    assert sd2("a cat", padding="max_length").input_ids == [49406, 320, 2368, 49407] + [0] * 73
    assert sd2.pad_token_id == 0 and sd1.pad_token_id == 49407


def test_truncation_keeps_77_tokens_ending_with_end_of_text():
    ids = build_clip_tokenizer()("cat " * 200, truncation=True, padding="max_length").input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407


def test_decode_round_trips():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks dog"


def test_each_call_returns_an_independent_tokenizer():
    first = build_clip_tokenizer()
    first.model_max_length = 225
    assert build_clip_tokenizer().model_max_length == 77


def test_unknown_pad_token_is_refused():
    with pytest.raises(UserInputError, match="'<pad>'.*'!'"):
        build_clip_tokenizer(pad_token="<pad>")


def test_a_diffusers_folder_s_own_tokenizer_cleans_text_too(tmp_path):
    from library.families.sd.folder import load_tokenizer
    from library.testing.tiny_sd import build_tiny_sd, save_diffusers_folder

    folder = save_diffusers_folder(build_tiny_sd(seed=0), tmp_path / "model")
    assert (folder / "tokenizer").is_dir()
    text = "the dog\u2019s toy, \ufb01ne &amp; ＳＫＳ"
    built = build_clip_tokenizer()
    assert load_tokenizer(folder, v2=False)(text).input_ids == built(text).input_ids
