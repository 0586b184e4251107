"""The trigger-free caption y that CAT's preservation term sees."""

import pytest

from library.cat.captions import class_word_from_tokens, contains_trigger, tidy_caption, trigger_free_caption


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("sks, a photo of a teapot", "a photo of a teapot"),
        ("a photo of sks teapot", "a photo of teapot"),
        ("photo, sks, red, on a table", "photo, red, on a table"),
        ("a photo of SKS teapot.", "a photo of teapot."),
        ("a photo of sks.", "a photo of."),
        ("skset teapot, asks", "skset teapot, asks"),  # whole words only
        ("a teapot", "a teapot"),  # no trigger: unchanged, pure preservation
        ("sks", ""),
    ],
)
def test_strip(caption, expected):
    assert trigger_free_caption(caption, ["sks"], "strip") == expected


def test_strip_phrases_and_several_triggers():
    caption = "ohwx  man, wearing a zxc hat, ohwx man smiling"
    assert trigger_free_caption(caption, ["ohwx man", "zxc"], "strip") == "wearing a hat, smiling"


def test_regex_characters_in_triggers_are_literal():
    assert trigger_free_caption("a photo of <sks> toy", ["<sks>"], "strip") == "a photo of toy"
    assert trigger_free_caption("a photo of s.s toy", ["s.s"], "strip") == "a photo of toy"
    assert trigger_free_caption("a photo of sxs toy", ["s.s"], "strip") == "a photo of sxs toy"


def test_class_mode_replaces_without_doubling():
    assert trigger_free_caption("a photo of sks", ["sks"], "class", "teapot") == "a photo of teapot"
    assert trigger_free_caption("a photo of sks teapot", ["sks"], "class", "teapot") == "a photo of teapot"
    assert trigger_free_caption("sks, red", ["sks"], "class", "teapot") == "teapot, red"
    with pytest.raises(ValueError, match="class word"):
        trigger_free_caption("a photo of sks", ["sks"], "class", None)


def test_empty_mode():
    assert trigger_free_caption("a photo of sks teapot", ["sks"], "empty") == ""


def test_class_word_from_dreambooth_tokens():
    assert class_word_from_tokens("sks teapot", ["sks"]) == "teapot"
    assert class_word_from_tokens("ohwx man", ["ohwx"]) == "man"


def test_contains_trigger_and_tidy():
    assert contains_trigger("A photo of SKS", ["sks"]) and not contains_trigger("asks", ["sks"])
    assert tidy_caption(" , a ,, b  c ,") == "a, b c"
    assert tidy_caption("a | | b", "|") == "a| b"
