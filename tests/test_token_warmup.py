"""`--token_warmup_min` / `--token_warmup_step`: sd-scripts' count of caption tags kept at a step, by
hand-computed cases; end to end, the captions (and CAT's trigger-free captions) that reach each step."""

import pytest
from PIL import Image

import train_network_cat
from library.cli.train_args import parse_args
from library.data.caption_transforms import CaptionOptions, sample_rng, transform_caption, warmed_up_tags, warmup_steps
from library.data.dataset_config import load_dataset_config
from library.data.folder_dataset import Subset, SubsetOptions
from library.data.run_data import varying_caption_options
from library.errors import UserInputError
from library.testing.tiny_sd import tiny_config_dir
from library.training.caption_tokens import CaptionTokens

CAPTION = "sks teapot, red, on a table, studio light"


def test_a_warmup_step_below_one_is_that_share_of_the_run_rounded_down():
    assert warmup_steps(0.5, 100) == 50
    assert warmup_steps(0.25, 10) == 2  # floor(2.5)
    assert warmup_steps(4, 100) == 4 and warmup_steps(2.5, 100) == 2.5
    assert warmup_steps(0, 100) == 0


def test_the_tag_count_grows_linearly_from_the_minimum():
    # floor(step * (tags - min) / warmup) + min, all tags from the warmup step on.
    assert [warmed_up_tags(5, step, 1, 4) for step in range(7)] == [1, 2, 3, 4, 5, 5, 5]
    assert [warmed_up_tags(3, step, 1, 4) for step in range(5)] == [1, 1, 2, 2, 3]
    assert [warmed_up_tags(4, step, 0, 3) for step in range(4)] == [0, 1, 2, 4]
    assert warmed_up_tags(2, 0, 5, 4) >= 2, "a minimum above the tag count keeps them all"
    assert warmed_up_tags(3, 0, 1, 0) == 3, "no warmup"


def test_warmup_cuts_the_flexible_tags_before_shuffling_and_keeps_the_fixed_ones():
    options = CaptionOptions(keep_tokens=1, token_warmup_min=1, token_warmup_step=4)
    captions = [transform_caption(CAPTION, sample_rng(0, 1, 0), options, step=step) for step in range(6)]
    assert captions == ["sks teapot, red", "sks teapot, red", "sks teapot, red, on a table",
                        "sks teapot, red, on a table", CAPTION, CAPTION]
    shuffled = CaptionOptions(keep_tokens=1, shuffle=True, token_warmup_min=2, token_warmup_step=10)
    for seed in range(10):
        tags = transform_caption(CAPTION, sample_rng(seed, 1, 0), shuffled, step=0).split(", ")
        assert tags[0] == "sks teapot" and sorted(tags[1:]) == ["on a table", "red"], "the first two, shuffled"


def test_a_fractional_warmup_step_follows_max_train_steps():
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5)
    # floor(0.5 * 8) = 4 warmup steps; at step 3, floor(3 * (4 - 1) / 4) + 1 = 3 of the 4 tags.
    assert transform_caption(CAPTION, sample_rng(0, 1, 0), options, step=3, max_train_steps=8) == \
        "sks teapot, red, on a table"
    assert transform_caption(CAPTION, sample_rng(0, 1, 0), options, step=4, max_train_steps=8) == CAPTION


def _data(*flags):
    return parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--train_data_dir", "d",
                       "--resolution", "32", "--cat_weight", "0", *flags]).data


def test_flags_and_dataset_keys(tmp_path):
    data = _data("--token_warmup_min", "2", "--token_warmup_step", "0.3")
    assert (data.token_warmup_min, data.token_warmup_step) == (2, 0.3)
    with pytest.raises(UserInputError, match="--token_warmup_step"):
        _data("--token_warmup_step", "-1")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "d.toml"
    path.write_text('[general]\ntoken_warmup_step = 10\n[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                    'image_dir = "img"\ntoken_warmup_min = 3\n')
    captions = load_dataset_config(path, _data())[0].subsets[0].options.captions
    assert (captions.token_warmup_min, captions.token_warmup_step) == (3, 10.0)
    path.write_text('[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "img"\ntoken_warmup_min = -1\n')
    with pytest.raises(UserInputError, match="token_warmup_min = -1 should be at least 0"):
        load_dataset_config(path, _data())


def test_text_encoder_output_caching_refuses_a_warming_up_subset(tmp_path):
    options = SubsetOptions(CaptionOptions(token_warmup_step=100))
    assert varying_caption_options(Subset(tmp_path, 1, "", False, (), options=options)) == ["token_warmup_step"]
    assert varying_caption_options(Subset(tmp_path, 1, "", False, ())) == []


# --- end to end ---------------------------------------------------------------------------------

_TOKENS_CALL = CaptionTokens.__call__


@pytest.fixture(scope="module")
def model(tiny_sd_v1_files):
    return tiny_sd_v1_files.safetensors  # conftest.py: the tiny SD 1.x model (seed 0), written once per session


@pytest.fixture()
def dataset(tmp_path):
    folder = tmp_path / "train" / "6_sks teapot"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "0.png")
    (folder / "0.txt").write_text(CAPTION + "\n", encoding="utf-8")
    return tmp_path


def _captions(monkeypatch, model, root, out, *extra) -> list[list[str]]:
    seen = []
    monkeypatch.setattr(CaptionTokens, "__call__", lambda tokens, captions: seen.append(list(captions)) or
                        _TOKENS_CALL(tokens, captions))
    argv = ["--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
            "--train_data_dir", str(root / "train"), "--resolution", "32", "--caption_extension", ".txt",
            "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--max_train_steps", "6",
            "--seed", "1", "--keep_tokens", "1", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", *extra]
    assert train_network_cat.main(argv) == 0
    return seen


def test_warmed_up_captions_reach_the_step_and_cat_strips_them(model, dataset, tmp_path, monkeypatch):
    seen = _captions(monkeypatch, model, dataset, tmp_path / "a", "--token_warmup_min", "1", "--token_warmup_step", "4")
    trained, free = [c for b in seen[0::2] for c in b], [c for b in seen[1::2] for c in b]
    short, middle = "sks teapot, red", "sks teapot, red, on a table"
    assert trained == [short, short, middle, middle, CAPTION, CAPTION]
    assert free == [caption.replace("sks ", "", 1) for caption in trained], "the trigger-free caption of each"
    # 0.5 of 6 steps: 3 warmup steps, floor(step * 2 / 3) + 1 of the 3 flexible tags, all from step 3 on.
    seen = _captions(monkeypatch, model, dataset, tmp_path / "b", "--token_warmup_min", "1", "--token_warmup_step", "0.5")
    assert [c for b in seen[0::2] for c in b] == [short, short, middle, CAPTION, CAPTION, CAPTION]
    seen = _captions(monkeypatch, model, dataset, tmp_path / "c")
    assert [c for b in seen[0::2] for c in b] == [CAPTION] * 6, "without the option, every tag from the start"
