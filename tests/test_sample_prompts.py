"""The --sample_prompts file (.txt, .toml, .json), --preservation_prompts, and the sample schedule and names."""

import json

import pytest
from PIL import Image

from library.sampling import samplers
from library.errors import UserInputError
from library.sampling.drift_probe import read_preservation_prompts
from library.sampling.sample_images import default_seed, due_after_step, due_at_epoch_end, sample_file_name, side_by_side
from library.sampling.sample_prompts import SAMPLERS, SamplePrompt, load_sample_prompts, parse_prompt_line
from library.config.train_config import SampleArgs


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_options_comments_and_defaults(tmp_path):
    path = write(tmp_path, "p.txt", "# my prompts\n\na photo of sks dog --n lowres, blurry --w 640 --h 500 --d 42 "
                                     "--s 20 --l 6.5 --ss euler_a\n  a dog on the beach  \n")
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(index=0, prompt="a photo of sks dog", negative_prompt="lowres, blurry", width=640,
                                 height=496, steps=20, scale=6.5, seed=42, sampler="euler_a", source=f"{path} line 3")
    # sd-scripts' defaults: 512 x 512, 30 steps, scale 7.5, no seed, the --sample_sampler.
    assert (second.index, second.prompt, second.width, second.height, second.steps, second.scale, second.seed,
            second.sampler, second.negative_prompt) == (1, "a dog on the beach", 512, 512, 30, 7.5, None, None, None)


def test_options_are_case_insensitive_and_sizes_rounded_like_sd_scripts(tmp_path):
    entry = parse_prompt_line("a cat --W 100 --SS DPM++ 2M", "x line 1")
    assert entry == {"prompt": "a cat", "width": "100", "sample_sampler": "DPM++ 2M"}
    (prompt,) = load_sample_prompts(write(tmp_path, "p.txt", "a cat --w 30 --h 77 --ss DPM++ 2M\n"))
    assert (prompt.width, prompt.height, prompt.sampler) == (64, 72, "dpmsolver++")


@pytest.mark.parametrize(
    "line, message",
    [
        ("a dog --x 5", "unknown option --x"),
        ("a dog --w wide", "width 'wide' is not a whole number"),
        ("a dog --d -3", "seed '-3' is not a whole number >= 0"),
        ("a dog --s 0", "0 sampling steps; give 1 to 1000"),
        ("a dog --l much", "scale 'much' is not a number"),
        ("a dog --ss warp", "unknown sampler 'warp'"),
        ("a dog --n", "--n has no value"),
    ],
)
def test_txt_problems_name_file_line_and_fix(tmp_path, line, message):
    path = write(tmp_path, "p.txt", f"a fine prompt\n{line}\n")
    with pytest.raises(UserInputError) as err:
        load_sample_prompts(path)
    assert message in str(err.value) and f"{path} line 2" in str(err.value)


def test_missing_empty_and_unknown_kind_of_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_sample_prompts(tmp_path / "nope.txt")
    with pytest.raises(UserInputError, match="holds no prompt"):
        load_sample_prompts(write(tmp_path, "p.txt", "# only a comment\n\n"))
    with pytest.raises(UserInputError, match=r"\.txt, \.toml and \.json"):
        load_sample_prompts(write(tmp_path, "p.yaml", "a dog\n"))


def test_toml_prompt_table_with_subsets(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
width = 640
sample_steps = 12
negative_prompt = "lowres"

  [[prompt.subset]]
  prompt = "a photo of sks dog"
  seed = 1

  [[prompt.subset]]
  prompt = "a dog"
  width = 256
  sample_sampler = "k_euler"
""")
    first, second = load_sample_prompts(path)
    assert (first.prompt, first.width, first.steps, first.seed, first.negative_prompt) == ("a photo of sks dog", 640, 12, 1, "lowres")
    assert (second.index, second.width, second.sampler) == (1, 256, "k_euler")


def test_toml_problems(tmp_path):
    with pytest.raises(UserInputError, match=r"\[\[prompt.subset\]\] number 1: unknown key widht"):
        load_sample_prompts(write(tmp_path, "a.toml", '[prompt]\n[[prompt.subset]]\nprompt = "x"\nwidht = 5\n'))
    with pytest.raises(UserInputError, match=r"\[prompt\] table of defaults"):
        load_sample_prompts(write(tmp_path, "b.toml", 'prompt = "a dog"\n'))
    with pytest.raises(UserInputError, match="no prompt text"):
        load_sample_prompts(write(tmp_path, "c.toml", "[prompt]\n[[prompt.subset]]\nseed = 3\n"))
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_sample_prompts(write(tmp_path, "d.toml", "[prompt\n"))


def test_json_lines_and_objects(tmp_path):
    path = write(tmp_path, "p.json", json.dumps(["a dog --d 5", {"prompt": "a cat", "scale": 4, "height": 320}]))
    first, second = load_sample_prompts(path)
    assert (first.prompt, first.seed) == ("a dog", 5)
    assert (second.prompt, second.scale, second.height, second.index) == ("a cat", 4.0, 320, 1)
    with pytest.raises(UserInputError, match="item 2: width True"):
        load_sample_prompts(write(tmp_path, "q.json", json.dumps(["a", {"prompt": "b", "width": True}])))
    with pytest.raises(UserInputError, match="is a list"):
        load_sample_prompts(write(tmp_path, "r.json", json.dumps({"prompt": "a"})))


def test_sampler_names_match_the_schedulers():
    assert set(SAMPLERS) == set(samplers.SAMPLERS)


def test_preservation_prompt_file(tmp_path):
    assert read_preservation_prompts(write(tmp_path, "p.txt", "# c\na dog\n\n a cat \n")) == ("a dog", "a cat")
    with pytest.raises(UserInputError, match="--preservation_prompts: .*holds no prompt"):
        read_preservation_prompts(write(tmp_path, "e.txt", "# nothing\n"))
    with pytest.raises(UserInputError, match="does not exist"):
        read_preservation_prompts(tmp_path / "missing.txt")


def _sample_args(steps=None, epochs=None):
    return SampleArgs(prompts="p.txt", every_n_steps=steps, every_n_epochs=epochs, at_first=False, sampler="ddim",
                      cat_compare=False)


def test_schedule_follows_sd_scripts():
    assert [s for s in range(1, 7) if due_after_step(_sample_args(steps=2), s)] == [2, 4, 6]
    # Epoch sampling set: step sampling is ignored, as in sd-scripts.
    assert not any(due_after_step(_sample_args(steps=2, epochs=1), s) for s in range(1, 7))
    assert [e for e in range(1, 7) if due_at_epoch_end(_sample_args(steps=2, epochs=3), e)] == [3, 6]
    assert not any(due_at_epoch_end(_sample_args(steps=2), e) for e in range(1, 7))


def test_file_names_are_sd_scripts():
    assert sample_file_name("cat", None, 100, 3, None, "20250101120000") == "cat_000100_03_20250101120000.png"
    assert sample_file_name("cat", 2, 100, 0, 42, "20250101120000") == "cat_e000002_00_20250101120000_42.png"
    assert sample_file_name(None, 0, 0, 1, None, "20250101120000") == "e000000_01_20250101120000.png"


def test_default_seed_is_fixed_per_prompt():
    assert default_seed(3, 0) == default_seed(3, 0) != default_seed(3, 1)
    assert 0 <= default_seed(2**32 - 1, 5) < 2**32


def test_side_by_side():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    strip = side_by_side([Image.new("RGB", (8, 6), c) for c in colours])
    assert strip.size == (24, 6)
    assert [strip.getpixel((x, 3)) for x in (0, 8, 16)] == colours


def test_flux_prompts_take_guidance_and_the_flux_script_s_defaults(tmp_path):
    from library.config.training_script import FLUX_SCRIPT

    path = tmp_path / "prompts.txt"
    path.write_text("a photo of sks teapot --g 2.5 --w 100 --h 72\na red teapot\n", encoding="utf-8")
    told, untold = load_sample_prompts(path, FLUX_SCRIPT.sample_defaults)
    assert told.guidance == 2.5 and (told.width, told.height) == (96, 64), "FLUX sizes are multiples of 16"
    assert (untold.guidance, untold.steps, untold.scale) == (3.5, 20, 1.0), "sd-scripts' FLUX sampling defaults"
    sd_told, _ = load_sample_prompts(path)
    assert (sd_told.width, sd_told.height, sd_told.steps, sd_told.scale) == (96, 72, 30, 7.5)
