"""Prompts and training images for evaluate_kps.py: folders, dataset configs, prompt files, bad input."""

import pytest
from PIL import Image

from library.errors import UserInputError
from library.evaluation.kps_data import read_prompt_file, training_images


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_dreambooth_folders_captions_and_class_token_fallback(tmp_path):
    first = _image(tmp_path / "10_sks teapot" / "a.png")
    (tmp_path / "10_sks teapot" / "a.txt").write_text("a photo of sks teapot\nsecond line ignored\n")
    second = _image(tmp_path / "10_sks teapot" / "b.JPG")
    (tmp_path / "10_sks teapot" / "notes.md").write_text("not an image")
    assert training_images(tmp_path) == [(first, "a photo of sks teapot"), (second, "sks teapot")]


def test_dataset_config_subsets_and_caption_extension(tmp_path):
    concept = _image(tmp_path / "teapot" / "a.png")
    (concept.parent / "a.caption").write_text("sks teapot on a table")
    other = _image(tmp_path / "mug" / "b.webp")
    _image(tmp_path / "reg" / "r.png")
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[general]\ncaption_extension = '.caption'\n"
        "[[datasets]]\nresolution = 64\n"
        f"  [[datasets.subsets]]\n  image_dir = '{concept.parent}'\n"
        f"  [[datasets.subsets]]\n  image_dir = '{other.parent}'\n  class_tokens = 'zxc mug'\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'reg'}'\n  is_reg = true\n  class_tokens = 'teapot'\n"
    )
    assert training_images(dataset_config=config) == [(concept, "sks teapot on a table"), (other, "zxc mug")]


def test_an_image_without_any_caption_is_named(tmp_path):
    _image(tmp_path / "teapot" / "lonely.png")
    config = tmp_path / "dataset.toml"
    config.write_text("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'teapot'\n")  # relative to the file
    with pytest.raises(UserInputError, match="lonely.png has no caption"):
        training_images(dataset_config=config)


def test_folders_that_sd_scripts_would_not_read_are_an_error(tmp_path):
    _image(tmp_path / "teapot" / "a.png")
    with pytest.raises(UserInputError, match="teapot: the name does not start with '<repeats>_'"):
        training_images(tmp_path)
    with pytest.raises(UserInputError, match="is not a folder"):
        training_images(tmp_path / "missing")


def test_prompt_file_skips_comments_and_sample_options(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# sample prompts\n\na photo of sks teapot --n blurry --w 512\nsks teapot in the snow\n")
    assert read_prompt_file(path) == [(3, "a photo of sks teapot"), (4, "sks teapot in the snow")]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UserInputError, match="holds no prompt"):
        read_prompt_file(empty)
