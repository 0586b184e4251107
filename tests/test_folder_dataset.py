"""Images and folders as sd-scripts users have them."""

import numpy as np
import pytest
from PIL import Image

from library.errors import UserInputError
from library.data.buckets import BucketSettings
from library.data.folder_dataset import scan_folders
from library.data.image_loading import load_image
from library.data.training_data import DatasetSpec, place_datasets


def test_alpha_is_flattened_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = load_image(tmp_path / "a.png", (8, 8))
    assert pixels.shape == (3, 8, 8) and pixels.min().item() == pytest.approx(1.0)


def test_exif_orientation_is_honoured(tmp_path):
    image = np.zeros((16, 32, 3), dtype=np.uint8)  # stored landscape, left half red
    image[:, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    pixels = load_image(tmp_path / "r.jpg", (16, 32))  # displayed portrait: 16 wide, 32 high
    assert pixels.shape == (3, 32, 16)
    top, bottom = pixels[0, :8].mean().item(), pixels[0, -8:].mean().item()
    assert top > 0.5 > bottom, "after rotating, the red half is on top"


def test_folders_repeats_captions_and_problems(tmp_path):
    good = tmp_path / "train" / "3_sks dog"
    good.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(good / "a.png")
    Image.new("RGB", (8, 8)).save(good / "b.png")
    (good / "a.txt").write_text("a photo of sks dog\nsecond line ignored\n")
    (subset,) = scan_folders(tmp_path / "train", ".txt", is_reg=False)
    assert subset.repeats == 3 and [i.caption for i in subset.items] == ["a photo of sks dog", "sks dog"]
    data = place_datasets([DatasetSpec((subset,), 1, BucketSettings((8, 8)))])
    order = [[s.item.path.name for s in batch] for batch in data.epoch_batches(1, 0)]
    assert len(order) == 6 and sorted(order) == [["a.png"]] * 3 + [["b.png"]] * 3
    assert data.epoch_batches(1, 0) == data.epoch_batches(1, 0)
    assert [data.epoch_batches(e, 0) for e in range(1, 6)] != [data.epoch_batches(1, 0)] * 5, "epochs reshuffle"
    (tmp_path / "train" / "no_repeats").mkdir()
    (tmp_path / "train" / "2_empty").mkdir()
    with pytest.raises(UserInputError) as error:
        scan_folders(tmp_path / "train", ".txt", is_reg=False)
    assert "no_repeats" in str(error.value) and "2_empty" in str(error.value)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="broken.png"):
        load_image(tmp_path / "broken.png", (8, 8))


def test_hidden_files_and_folders_are_not_data(tmp_path):
    good = tmp_path / "train" / "2_sks dog"
    good.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(good / "a.png")
    (good / "._a.png").write_bytes(b"AppleDouble metadata, not an image")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (subset,) = scan_folders(tmp_path / "train", ".txt", is_reg=False)
    assert [i.path.name for i in subset.items] == ["a.png"]


@pytest.mark.parametrize("is_reg, flag, example", [(False, "--train_data_dir", "10_sks dog"),
                                                   (True, "--reg_data_dir", "1_dog")])
def test_flat_image_folder_says_how_to_name_the_subfolder(tmp_path, is_reg, flag, example):
    flat = tmp_path / "my images"
    flat.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (8, 8)).save(flat / name)
    (flat / "a.txt").write_text("a photo of sks dog")
    with pytest.raises(UserInputError) as error:
        scan_folders(flat, ".txt", is_reg=is_reg)
    message = str(error.value)
    assert message.startswith(f"{flag}: {flat} holds 2 image(s) directly")
    assert f"move the images (and their caption files) into a subfolder named like '{flat / example}/'" in message
