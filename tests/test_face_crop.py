"""`face_crop_aug_range`: sd-scripts' face-centred crops, from the file-name convention, by hand-computed
cases; then end to end: the pixels that reach the step are cut around the face, and the refusals."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_network_cat
from library.cli.train_args import parse_args
from library.data.dataset_config import load_dataset_config
from library.data.face_crop import FaceCrop, FacePosition, face_crop, face_crop_problem, face_position
from library.errors import UserInputError
from library.testing.tiny_sd import tiny_config_dir
from library.training import trainer


# --- the file-name convention -------------------------------------------------------------------

@pytest.mark.parametrize("name, position", [
    ("face_100_90_16_20.png", FacePosition(100, 90, 16, 20)),
    ("my_photo_100_90_16_20.jpg", FacePosition(100, 90, 16, 20)),  # the last four parts
    ("a_b_c.png", None),  # fewer than five parts: no face position
    ("shot_0_90_16_20.png", None),  # a face x of 0 means none (sd-scripts' `face_cx > 0`)
])
def test_the_face_position_comes_from_the_last_four_parts_of_the_name(name, position):
    assert face_position(Path(name)) == position


@pytest.mark.parametrize("name, words", [
    ("sks_teapot_on_a_table.png", "are not all whole numbers"),  # sd-scripts stops on int("teapot")
    ("face_50_50_0_0.png", "face size in the file name is 0x0"),  # sd-scripts divides by 0
])
def test_a_name_sd_scripts_would_stop_at_is_refused_with_a_sentence(name, words):
    with pytest.raises(UserInputError, match=words):
        face_position(Path(name))


# --- sd-scripts' crop_target, by hand -----------------------------------------------------------

def test_a_fixed_range_scales_the_face_to_its_share_and_centres_it():
    # Face 16 px, range 4..4, target 32: scale = 32 / (16 * 4) = 0.5 -> 64x64, face centre at (50, 50);
    # the 32-px crop would start at 50 - 16 = 34, kept inside: 64 - 32 = 32.
    crop = face_crop((128, 128), FacePosition(100, 100, 16, 16), (32, 32), (4.0, 4.0), False, random.Random(0))
    assert crop == FaceCrop((64, 64), (32, 32, 64, 64))
    # Face centre (40, 30) -> (20, 15): left 20 - 16 = 4, top 15 - 16 = -1 -> 0.
    crop = face_crop((128, 128), FacePosition(40, 30, 16, 16), (32, 32), (4.0, 4.0), False, random.Random(0))
    assert crop == FaceCrop((64, 64), (4, 0, 36, 32))


def test_scales_stay_between_covering_the_target_and_the_full_size():
    # A huge face asks for a scale below the cover scale (64/400 = 0.16): the cover scale wins.
    crop = face_crop((400, 200), FacePosition(200, 100, 300, 300), (64, 64), (1.0, 1.0), False, random.Random(0))
    assert crop.resized == (128, 64) and crop.box == (32, 0, 96, 64)
    # A tiny face asks for a scale above 1: images are never enlarged.
    crop = face_crop((100, 100), FacePosition(50, 50, 2, 2), (64, 64), (2.0, 4.0), False, random.Random(0))
    assert crop.resized == (100, 100) and crop.box == (18, 18, 82, 82)


def test_a_range_draws_the_scale_then_jitters_a_large_face_rows_first():
    # Face 80 px (> 64 // 10 and >= 40), range 1..2: scale in [64/160, 64/80] = [0.4, 0.8], then a shift
    # of -4..4 px (80 // 20) on the rows, then on the columns: sd-scripts' order of draws.
    crop = face_crop((400, 400), FacePosition(200, 200, 80, 80), (64, 64), (1.0, 2.0), False, random.Random(5))
    replay = random.Random(5)
    scale = replay.uniform(0.4, 0.8)
    dy, dx = replay.randint(-4, 4), replay.randint(-4, 4)
    side, centre = int(400 * scale + 0.5), int(200 * scale + 0.5)
    top, left = centre - 32 + dy, centre - 32 + dx
    assert crop == FaceCrop((side, side), (left, top, left + 64, top + 64))


def test_a_fixed_range_draws_nothing():
    crops = {face_crop((400, 400), FacePosition(200, 200, 80, 80), (64, 64), (2.0, 2.0), False, random.Random(s))
             for s in range(10)}
    assert len(crops) == 1, "a fixed range: no draw at all"


def test_random_crop_moves_the_crop_anywhere_inside_the_image():
    crops = [face_crop((128, 128), FacePosition(64, 64, 16, 16), (32, 32), (4.0, 4.0), True, random.Random(s))
             for s in range(40)]
    assert len({c.box for c in crops}) > 10
    assert all(c.resized == (64, 64) and 0 <= c.box[0] <= 32 and 0 <= c.box[1] <= 32 for c in crops)


def test_an_image_at_the_target_size_trains_as_it_is_and_a_smaller_one_is_refused():
    assert face_crop((32, 32), FacePosition(10, 10, 8, 8), (32, 32), (2.0, 4.0), False, random.Random(0)) is None
    assert face_crop_problem(Path("f_10_10_8_8.png"), (32, 32), (32, 32)) is None
    assert "smaller than the resolution 32x32" in face_crop_problem(Path("f_10_10_8_8.png"), (40, 24), (32, 32))
    assert face_crop_problem(Path("plain.png"), (16, 16), (32, 32)) is None, "no face position: not face-cropped"


# --- options ------------------------------------------------------------------------------------

def _data(*flags):
    return parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--train_data_dir", "d",
                       "--resolution", "32", "--cat_weight", "0", *flags]).data


def test_the_flag_reads_low_comma_high():
    assert _data("--face_crop_aug_range", "2.0,4.0").face_crop_aug_range == (2.0, 4.0)
    assert _data().face_crop_aug_range is None
    for bad in ("4.0,2.0", "2.0", "a,b", "0,1"):
        with pytest.raises(UserInputError, match="--face_crop_aug_range"):
            _data("--face_crop_aug_range", bad)


def test_the_dataset_key_is_a_subset_key_that_general_and_datasets_pass_down(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "d.toml"
    path.write_text('[general]\nface_crop_aug_range = [2.0, 4.0]\n[[datasets]]\nresolution = 32\n'
                    '[[datasets.subsets]]\nimage_dir = "img"\n[[datasets.subsets]]\nimage_dir = "img"\n'
                    'face_crop_aug_range = [3, 3]\n')
    first, second = load_dataset_config(path, _data())[0].subsets
    assert first.options.face_crop_aug_range == (2.0, 4.0) and second.options.face_crop_aug_range == (3.0, 3.0)
    path.write_text('[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "img"\n'
                    'face_crop_aug_range = "2.0,4.0"\n')
    with pytest.raises(UserInputError, match=r"face_crop_aug_range = '2.0,4.0' should be"):
        load_dataset_config(path, _data())


# --- end to end ---------------------------------------------------------------------------------

RED, FACE = (255, 0, 0), (100, 100, 16, 16)
_ENCODE = trainer.encode


@pytest.fixture(scope="module")
def model(tiny_sd_v1_files):
    return tiny_sd_v1_files.safetensors  # conftest.py: the tiny SD 1.x model (seed 0), written once per session


@pytest.fixture()
def faces(tmp_path):
    """`4_sks face/`: a 128x128 grey image with a red 16x16 face centred at (100, 100), named for it, and
    a 64x64 blue image without a face position."""
    folder = tmp_path / "train" / "4_sks face"
    folder.mkdir(parents=True)
    image = np.full((128, 128, 3), 128, dtype=np.uint8)
    x, y, w, h = FACE
    image[y - h // 2 : y + h // 2, x - w // 2 : x + w // 2] = RED
    Image.fromarray(image).save(folder / "face_{}_{}_{}_{}.png".format(*FACE))
    plain = np.zeros((64, 64, 3), dtype=np.uint8)
    plain[..., 2] = 255
    plain[..., 0] = np.random.default_rng(0).integers(0, 255, (64, 64))
    Image.fromarray(plain).save(folder / "plain.png")
    for name in ("face_{}_{}_{}_{}".format(*FACE), "plain"):
        (folder / f"{name}.txt").write_text("sks face\n", encoding="utf-8")
    return tmp_path


def _argv(model, root, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(root / "train"), "--resolution", "32", "--caption_extension", ".txt",
        "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4", "--max_train_steps", "8",
        "--seed", "3", "--cat_weight", "0", "--max_data_loader_n_workers", "0", *extra,
    ]


def _pixels_reaching_the_step(monkeypatch, argv) -> list[torch.Tensor]:
    """Every image the VAE encodes for a training step, in step order."""
    seen = []
    monkeypatch.setattr(trainer, "encode", lambda vae, pixels, *a, **k: seen.extend(pixels.clone()) or _ENCODE(vae, pixels, *a, **k))
    assert train_network_cat.main(argv) == 0
    return seen


def _is_plain(pixels: torch.Tensor) -> bool:
    return bool(pixels[2].mean() > 0.9)  # the blue image


def _centre_is_red(pixels: torch.Tensor) -> bool:
    return bool(pixels[0, 16, 16] > 0.9 and pixels[1, 16, 16] < -0.9)


def test_face_crops_reach_the_step_and_images_without_a_face_position_train_as_without(model, faces, tmp_path,
                                                                                      monkeypatch):
    cropped = _pixels_reaching_the_step(monkeypatch, _argv(model, faces, tmp_path / "a", "--face_crop_aug_range",
                                                           "2.0,4.0"))
    plain = _pixels_reaching_the_step(monkeypatch, _argv(model, faces, tmp_path / "b"))
    assert len(cropped) == len(plain) == 8
    face_steps = [p for p in cropped if not _is_plain(p)]
    assert face_steps and all(_centre_is_red(p) for p in face_steps), "the crop is centred on the face"
    assert not any(_centre_is_red(p) for p in plain if not _is_plain(p)), "without the option, the whole image"
    assert len({tuple(p.flatten().tolist()) for p in face_steps}) > 1, "a new scale at each step"
    for with_option, without in zip(cropped, plain):
        if _is_plain(with_option):
            assert torch.equal(with_option, without), "no face position: resized and cropped as without the option"
    again = _pixels_reaching_the_step(monkeypatch, _argv(model, faces, tmp_path / "c", "--face_crop_aug_range",
                                                         "2.0,4.0"))
    assert all(torch.equal(a, b) for a, b in zip(again, cropped)), "drawn from the samples' own seeded streams"


@pytest.mark.parametrize("extra, words", [
    (("--enable_bucket", "--min_bucket_reso", "32", "--bucket_reso_steps", "32"), "crops without buckets only"),
    (("--cache_latents",), "cached latents are encoded once"),
])
def test_combinations_sd_scripts_ignores_the_option_in_are_refused(model, faces, tmp_path, capsys, extra, words):
    argv = _argv(model, faces, tmp_path / "out", "--face_crop_aug_range", "2.0,4.0", *extra)
    assert train_network_cat.main(argv) == 2
    assert words in capsys.readouterr().err


def test_names_and_sizes_sd_scripts_would_stop_at_are_reported_with_the_other_problems(model, faces, tmp_path,
                                                                                      capsys):
    folder = faces / "train" / "4_sks face"
    Image.new("RGB", (40, 40)).save(folder / "sks_face_on_a_beach.png")
    Image.new("RGB", (24, 48)).save(folder / "small_5_5_4_4.png")
    assert train_network_cat.main(_argv(model, faces, tmp_path / "out", "--face_crop_aug_range", "2.0,4.0")) == 2
    err = capsys.readouterr().err
    assert "sks_face_on_a_beach.png" in err and "not all whole numbers" in err
    assert "small_5_5_4_4.png" in err and "smaller than the resolution 32x32" in err
    assert "2 problem(s)" in err


def test_sdxl_is_told_a_face_crop_as_sd_scripts_tells_it():
    from library.data.buckets import Placement
    from library.data.folder_dataset import ImageItem
    from library.data.image_loading import Augmentation
    from library.data.training_data import Sample
    from library.training.train_batch import image_geometry

    sample = Sample(0, ImageItem(Path("f_100_100_16_16.png"), "x", "", False), Placement((32, 32), (32, 32), 0.0, (128, 128)))
    geometry = image_geometry(sample, Augmentation(face_crop=FaceCrop((64, 64), (32, 32, 64, 64))))
    assert (geometry.original_size, geometry.crop_left_top, geometry.target_size) == ((32, 32), (0, 0), (32, 32))
    assert image_geometry(sample, Augmentation()).original_size == (128, 128)
