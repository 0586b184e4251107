"""Images as users see them, and the augmentations: flips, crops, hue shifts, checks before training."""

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserInputError
from library.data.image_loading import Augmentation, image_size, inspect_image, load_image


def _halves(path, size=(32, 16)):
    """Left half red, right half blue."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2] = (255, 0, 0)
    array[:, size[0] // 2 :] = (0, 0, 255)
    Image.fromarray(array).save(path)
    return path


def test_alpha_is_flattened_on_white(tmp_path):
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    pixels = load_image(tmp_path / "a.png", (8, 8))
    assert pixels.shape == (3, 8, 8) and pixels.min().item() == pytest.approx(1.0)


def test_exif_orientation_gives_the_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 16)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert image_size(tmp_path / "r.jpg") == (16, 32) == inspect_image(tmp_path / "r.jpg")[0]
    assert load_image(tmp_path / "r.jpg", (16, 32)).shape == (3, 32, 16)


def test_flip_mirrors_the_image(tmp_path):
    path = _halves(tmp_path / "h.png")
    plain = load_image(path, (32, 16))
    flipped = load_image(path, (32, 16), augmentation=Augmentation(flip=True))
    assert plain[0, :, 0].mean() > 0.9 and flipped[0, :, 0].mean() < -0.9
    assert torch.equal(flipped, plain.flip(-1))


def test_random_crop_offsets_pick_different_windows(tmp_path):
    path = _halves(tmp_path / "h.png")
    left = load_image(path, (16, 16), (32, 16), Augmentation(crop_offset=(0.0, 0.0)))
    right = load_image(path, (16, 16), (32, 16), Augmentation(crop_offset=(0.99, 0.0)))
    centre = load_image(path, (16, 16), (32, 16))
    assert left[0].mean() > 0.9 and right[2].mean() > 0.9
    assert centre[0, :, :8].mean() > 0.9 and centre[2, :, 8:].mean() > 0.9


def test_hue_shift_changes_colours_but_not_greys(tmp_path):
    array = np.zeros((8, 16, 3), dtype=np.uint8)
    array[:, :8] = (200, 40, 40)
    array[:, 8:] = (128, 128, 128)
    Image.fromarray(array).save(tmp_path / "c.png")
    plain = load_image(tmp_path / "c.png", (16, 8))
    shifted = load_image(tmp_path / "c.png", (16, 8), augmentation=Augmentation(hue_shift=0.04))
    assert (shifted[:, :, :8] - plain[:, :, :8]).abs().max() > 0.05
    assert (shifted[:, :, 8:] - plain[:, :, 8:]).abs().max() < 0.02


def test_problems_are_found_without_training(tmp_path):
    _halves(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    assert inspect_image(tmp_path / "ok.png") == ((32, 16), None)
    for name, words in (("junk.png", "cannot be read"), ("cut.png", "cannot be read"), ("tiny.png", "too small")):
        size, problem = inspect_image(tmp_path / name)
        assert size is None and problem and name in problem and words in problem


def test_unreadable_image_at_load_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="broken.png"):
        load_image(tmp_path / "broken.png", (8, 8))
