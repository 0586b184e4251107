"""sd-scripts' caption options on the caption a sample trains on."""

from library.data.caption_transforms import CaptionOptions, sample_rng, transform_caption
from library.cat.captions import trigger_free_caption

CAPTION = "sks teapot, red, on a table, studio light, close-up"


def test_keep_tokens_stay_first_and_the_rest_is_a_permutation():
    outputs = {transform_caption(CAPTION, sample_rng(0, 1, i), CaptionOptions(shuffle=True, keep_tokens=1)) for i in range(20)}
    assert len(outputs) > 1
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "sks teapot" and sorted(tags[1:]) == sorted(CAPTION.split(", ")[1:])


def test_same_seed_epoch_and_position_give_the_same_caption():
    a = transform_caption(CAPTION, sample_rng(3, 2, 5), CaptionOptions(shuffle=True, dropout_rate=0.3))
    b = transform_caption(CAPTION, sample_rng(3, 2, 5), CaptionOptions(shuffle=True, dropout_rate=0.3))
    assert a == b


def test_dropout_rate_drops_whole_captions():
    outs = [transform_caption(CAPTION, sample_rng(0, 1, i), CaptionOptions(dropout_rate=0.5)) for i in range(400)]
    dropped = outs.count("")
    assert 150 < dropped < 250 and all(o in ("", CAPTION) for o in outs)


def test_no_options_leave_the_caption_alone():
    assert transform_caption(CAPTION, sample_rng(0, 1, 0), CaptionOptions()) == CAPTION


def test_trigger_free_caption_is_derived_from_the_shuffled_one():
    shuffled = transform_caption(CAPTION, sample_rng(1, 1, 1), CaptionOptions(shuffle=True))
    free = trigger_free_caption(shuffled, ["sks"], "strip")
    assert "sks" not in free and sorted(free.split(", ")) == sorted(["teapot", "red", "on a table", "studio light", "close-up"])


def test_prefix_and_suffix_join_with_a_space():
    options = CaptionOptions(prefix="masterpiece,", suffix=", best")
    assert transform_caption("sks teapot", sample_rng(0, 1, 0), options) == "masterpiece, sks teapot , best"


def test_dropout_every_n_epochs_empties_those_epochs_only():
    options = CaptionOptions(dropout_every_n_epochs=3)
    assert [transform_caption(CAPTION, sample_rng(0, e, 0), options, epoch=e) for e in (1, 2, 3, 6)] == [
        CAPTION, CAPTION, "", ""]


def test_tag_dropout_thins_the_flexible_tags_only():
    options = CaptionOptions(keep_tokens=1, tag_dropout_rate=0.5)
    outs = [transform_caption(CAPTION, sample_rng(0, 1, i), options).split(", ") for i in range(200)]
    assert all(out[0] == "sks teapot" for out in outs)
    kept = sum(len(out) - 1 for out in outs) / (200 * 4)
    assert 0.4 < kept < 0.6
    assert all(out[1:] == [t for t in CAPTION.split(", ")[1:] if t in out[1:]] for out in outs), "order kept unshuffled"


def test_keep_tokens_separator_fixes_head_and_tail():
    caption = "sks teapot, photo ||| red, blue, green ||| high quality"
    options = CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    outs = {transform_caption(caption, sample_rng(0, 1, i), options) for i in range(30)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks teapot", "photo"] and tags[-1] == "high quality"
        assert sorted(tags[2:5]) == ["blue", "green", "red"]


def test_separator_without_shuffle_is_removed_not_trained_on():
    options = CaptionOptions(keep_tokens_separator="|||")
    assert transform_caption("sks teapot ||| red", sample_rng(0, 1, 0), options) == "sks teapot, red"


def test_other_caption_separator_is_split_on_and_joined_with_comma():
    options = CaptionOptions(shuffle=True, separator=";", keep_tokens=1)
    out = transform_caption("sks teapot; red; blue", sample_rng(0, 1, 0), options)
    assert out.startswith("sks teapot, ") and sorted(out.split(", ")[1:]) == ["blue", "red"]


def test_wildcards_choose_one_choice_per_draw_and_keep_escaped_braces():
    options = CaptionOptions(wildcard=True)
    caption = "a {photo|painting} of sks teapot, {{literal}}"
    outs = {transform_caption(caption, sample_rng(0, 1, i), options) for i in range(40)}
    assert outs == {"a photo of sks teapot, {literal}", "a painting of sks teapot, {literal}"}
    assert transform_caption(caption, sample_rng(0, 1, 3), options) == transform_caption(caption, sample_rng(0, 1, 3), options)
    assert transform_caption(caption, sample_rng(0, 1, 3), CaptionOptions()) == caption, "without the option, text as is"


def test_a_multi_line_caption_trains_on_one_line_a_draw_with_wildcards_else_its_first():
    caption = "sks teapot on a table\nsks teapot, studio light\na red sks teapot"
    outs = {transform_caption(caption, sample_rng(0, 1, i), CaptionOptions(wildcard=True)) for i in range(40)}
    assert outs == set(caption.split("\n"))
    assert transform_caption(caption, sample_rng(0, 1, 0), CaptionOptions()) == "sks teapot on a table"


def test_the_secondary_separator_keeps_tags_together_then_becomes_the_separator():
    caption = "sks teapot, red;;;glossy, on a table, studio light"
    options = CaptionOptions(shuffle=True, keep_tokens=1, secondary_separator=";;;")
    outs = {transform_caption(caption, sample_rng(0, 1, i), options) for i in range(30)}
    assert len(outs) > 1
    for out in outs:
        assert "red,glossy" in out and ";;;" not in out, "shuffled as one tag, then joined by caption_separator"
    assert transform_caption(caption, sample_rng(0, 1, 0), CaptionOptions(secondary_separator=";;;")) == \
        "sks teapot, red,glossy, on a table, studio light"


def test_the_trigger_free_caption_follows_the_wildcard_s_choice():
    options = CaptionOptions(wildcard=True)
    for i in range(20):
        trained = transform_caption("{sks teapot|sks kettle} on a table", sample_rng(0, 1, i), options)
        free = trigger_free_caption(trained, ("sks",), "strip")
        assert "sks" not in free and free in ("teapot on a table", "kettle on a table")
