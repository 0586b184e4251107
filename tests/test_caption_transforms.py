"""--shuffle_caption, --keep_tokens and --caption_dropout_rate on the caption a sample trains on."""

from library.caption_transforms import sample_rng, transform_caption
from library.captions import trigger_free_caption

CAPTION = "sks teapot, red, on a table, studio light, close-up"


def test_keep_tokens_stay_first_and_the_rest_is_a_permutation():
    outputs = {transform_caption(CAPTION, sample_rng(0, 1, i), shuffle=True, keep_tokens=1) for i in range(20)}
    assert len(outputs) > 1
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "sks teapot" and sorted(tags[1:]) == sorted(CAPTION.split(", ")[1:])


def test_same_seed_epoch_and_position_give_the_same_caption():
    a = transform_caption(CAPTION, sample_rng(3, 2, 5), shuffle=True, dropout_rate=0.3)
    b = transform_caption(CAPTION, sample_rng(3, 2, 5), shuffle=True, dropout_rate=0.3)
    assert a == b


def test_dropout_rate_drops_whole_captions():
    outs = [transform_caption(CAPTION, sample_rng(0, 1, i), dropout_rate=0.5) for i in range(400)]
    dropped = outs.count("")
    assert 150 < dropped < 250 and all(o in ("", CAPTION) for o in outs)


def test_no_options_leave_the_caption_alone():
    assert transform_caption(CAPTION, sample_rng(0, 1, 0)) == CAPTION


def test_trigger_free_caption_is_derived_from_the_shuffled_one():
    shuffled = transform_caption(CAPTION, sample_rng(1, 1, 1), shuffle=True)
    free = trigger_free_caption(shuffled, ["sks"], "strip")
    assert "sks" not in free and sorted(free.split(", ")) == sorted(["teapot", "red", "on a table", "studio light", "close-up"])
