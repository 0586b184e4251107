"""`bench/cat_tradeoff.py`: its table and plot on the tiny model, the held-out check, the flag guard."""

import math

import pytest
from PIL import Image

from bench import cat_tradeoff


def test_bench_rows_and_plot(tmp_path, capsys):
    plot = tmp_path / "tradeoff.png"
    rows = cat_tradeoff.main(["--alphas", "1", "4", "--steps", "16", "--cat_prompts_row", "--budget_row",
                              "--plot", str(plot), "--work_dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    names = [row.name for row in rows]
    assert names[:4] == ["plain LoRA", "CAT 1", "CAT 4", "CAT 1 + prompts"] and names[4].startswith("budget ")
    for row in rows:
        assert row.name in printed
        numbers = (row.alpha, row.held_out, row.trigger_free, row.trigger, row.loss_drop, row.cat_term)
        assert all(math.isfinite(n) for n in numbers), row
    plain, strongest = rows[0], rows[2]
    assert plain.trigger > 0 and plain.loss_drop > 0, "plain LoRA learned"
    assert plain.cat_term == 0 and strongest.cat_term > 0
    # CAT's point: at alpha 4 the held-out prompts (never trained on) move several times less than with plain LoRA.
    assert strongest.held_out * 3 < plain.held_out
    assert strongest.trigger_free * 3 < plain.trigger_free
    # The budget run is given the alpha-1 run's final CAT term; its alpha moved away from the start value 1.
    assert rows[4].name == f"budget {rows[1].cat_term:.3g}" and rows[4].alpha != 1.0
    with Image.open(plot) as image:
        assert image.size == (960, 660)
        assert len(set(image.getdata())) > 10, "points and text were drawn"


def test_held_out_prompts_share_no_word_with_training():
    cat_tradeoff.check_held_out(cat_tradeoff.HELD_OUT_PROMPTS, ["a photo of sks teapot", *cat_tradeoff.CAT_PROMPTS])
    with pytest.raises(ValueError, match=r"'a city at night' shares \['a'\]"):
        cat_tradeoff.check_held_out(["a city at night"], ["sks teapot on a table"])


def test_a_flag_the_trainer_lacks_is_reported_not_raised():
    assert "--cat_no_such_flag" in cat_tradeoff.rejected(["--cat_no_such_flag", "1"])


def test_nice_ticks_cover_the_range():
    assert cat_tradeoff.nice_ticks(0.0, 0.33) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert cat_tradeoff.nice_ticks(0.0, 0.047) == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
