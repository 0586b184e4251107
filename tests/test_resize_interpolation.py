"""`resize_interpolation`: sd-scripts' names, each kernel on hand-computed cases, sd-scripts' default, the
latent cache keyed by it; end to end, the pixels that reach the step follow the option."""

import numpy as np
import pytest
import torch
from PIL import Image

import train_network_cat
from library.cli.train_args import parse_args
from library.data.buckets import Placement
from library.data.dataset_config import load_dataset_config
from library.data.latents import Distribution, key_for, read_npz, write_npz
from library.data.resampling import RESIZE_INTERPOLATIONS, default_interpolation, resize_image
from library.errors import UserInputError
from library.testing.tiny_sd import tiny_config_dir
from library.training import trainer
from networks.lora_cat.file_format import read_lora_file

ROW = np.array([[0, 100, 200, 255]] * 2, dtype=np.uint8)


def _resized(pixels: np.ndarray, size, name):
    return np.asarray(resize_image(Image.fromarray(pixels), size, name))


def test_unset_is_sd_scripts_default_area_when_shrinking_else_lanczos():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    for size, name in (((20, 14), "area"), ((53, 37), "area"), ((80, 56), "lanczos"), ((60, 30), "lanczos")):
        assert default_interpolation(image.size, size) == name
        assert np.array_equal(np.asarray(resize_image(image, size)), np.asarray(resize_image(image, size, name)))
    assert np.array_equal(np.asarray(resize_image(image, (80, 56))), np.asarray(image.resize((80, 56), Image.Resampling.LANCZOS)))
    assert np.array_equal(np.asarray(resize_image(image, image.size)), np.asarray(image))  # area at the same size


def test_bilinear_samples_pixel_centres_without_antialiasing():
    # 4 -> 2: output pixel centres fall at source 0.5 and 2.5: (0 + 100) / 2 and (200 + 255) / 2 (rounded half
    # to even). PIL's antialiased bilinear would average wider: it is not what sd-scripts' OpenCV does.
    assert _resized(ROW, (2, 2), "bilinear").tolist() == [[50, 228], [50, 228]]
    assert np.array_equal(_resized(ROW, (2, 2), "linear"), _resized(ROW, (2, 2), "bilinear"))
    assert _resized(ROW, (2, 2), "bilinear").tolist() != np.asarray(Image.fromarray(ROW).resize((2, 2), Image.Resampling.BILINEAR)).tolist()


def test_area_averages_by_covered_area_both_ways():
    assert _resized(ROW, (2, 1), "area").tolist() == [[50, 228]]  # 2:1, whole pixels
    # 4 -> 3: each output covers 4/3 source pixels: (0 + 100/3) * 3/4, (100 + 200) * 2/3 * 3/4, (200/3 + 255) * 3/4.
    assert _resized(ROW, (3, 1), "area").tolist() == [[25, 150, 241]]
    # 2 -> 3 (enlarging): the middle output straddles both sources half and half (OpenCV's INTER_AREA zoom).
    assert _resized(np.array([[0, 100]], dtype=np.uint8), (3, 1), "area").tolist() == [[0, 50, 100]]


def test_nearest_picks_source_pixels_and_cubic_is_bicubic():
    image = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    nearest = _resized(image, (17, 13), "nearest")
    assert set(map(tuple, nearest.reshape(-1, 3))) <= set(map(tuple, image.reshape(-1, 3)))
    assert np.array_equal(_resized(image, (17, 13), "cubic"), _resized(image, (17, 13), "bicubic"))
    assert not np.array_equal(_resized(image, (17, 13), "bicubic"), _resized(image, (17, 13), "bilinear"))


@pytest.mark.parametrize("name", RESIZE_INTERPOLATIONS)
def test_every_name_resizes_rgb_and_one_channel_images(name):
    image = np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    assert _resized(image, (24, 18), name).shape == (18, 24, 3)
    assert _resized(image[..., 0], (24, 18), name).shape == (18, 24)


def _data(*flags):
    return parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--train_data_dir", "d",
                       "--resolution", "32", "--cat_weight", "0", *flags]).data


def test_the_flag_takes_sd_scripts_choices():
    assert _data("--resize_interpolation", "area").resize_interpolation == "area"
    assert _data().resize_interpolation is None
    with pytest.raises(UserInputError, match="--resize_interpolation: invalid choice: 'box'"):
        _data("--resize_interpolation", "box")  # sd-scripts' flag has no "box" either (its dataset key has)


def test_the_dataset_key_is_set_per_dataset_or_subset(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "d.toml"
    path.write_text('[[datasets]]\nresolution = 32\nresize_interpolation = "bicubic"\n[[datasets.subsets]]\n'
                    'image_dir = "img"\n[[datasets.subsets]]\nimage_dir = "img"\nresize_interpolation = "box"\n')
    first, second = load_dataset_config(path, _data("--resize_interpolation", "area"))[0].subsets
    assert (first.options.resize_interpolation, second.options.resize_interpolation) == ("bicubic", "box")
    path.write_text('[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "img"\n')
    assert load_dataset_config(path, _data("--resize_interpolation", "area"))[0].subsets[0].options.resize_interpolation == "area"
    path.write_text('[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "img"\nresize_interpolation = "cubik"\n')
    with pytest.raises(UserInputError, match="resize_interpolation = 'cubik' should be one of lanczos, nearest"):
        load_dataset_config(path, _data())


def test_a_disk_cache_file_is_valid_for_its_interpolation_only(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    placement = Placement((32, 32), (32, 32), 0.0, (64, 64))
    dist = Distribution(torch.zeros(4, 4, 4), torch.ones(4, 4, 4))
    write_npz(tmp_path / "a.npz", key_for(image, placement, interpolation="area"), dist, None)
    assert read_npz(tmp_path / "a.npz", key_for(image, placement, interpolation="area")) is not None
    assert read_npz(tmp_path / "a.npz", key_for(image, placement)) is None
    assert read_npz(tmp_path / "a.npz", key_for(image, placement, interpolation="nearest")) is None
    write_npz(tmp_path / "a.npz", key_for(image, placement), dist, None)
    assert read_npz(tmp_path / "a.npz", key_for(image, placement)) is not None
    assert read_npz(tmp_path / "a.npz", key_for(image, placement, interpolation="area")) is None


# --- end to end ---------------------------------------------------------------------------------

_ENCODE = trainer.encode


@pytest.fixture(scope="module")
def model(tiny_sd_v1_files):
    return tiny_sd_v1_files.safetensors  # conftest.py: the tiny SD 1.x model (seed 0), written once per session


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "train" / "2_sks teapot"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return tmp_path


def _argv(model, root, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(root / "train"), "--resolution", "32", "--output_dir", str(out),
        "--output_name", "lora", "--network_dim", "4", "--max_train_steps", "4", "--seed", "3", "--cat_weight", "0",
        "--max_data_loader_n_workers", "0", *extra,
    ]


def _pixels(monkeypatch, argv) -> list[torch.Tensor]:
    seen = []
    monkeypatch.setattr(trainer, "encode", lambda vae, pixels, *a, **k: seen.extend(pixels.clone()) or _ENCODE(vae, pixels, *a, **k))
    assert train_network_cat.main(argv) == 0
    return seen


def test_the_interpolation_reaches_the_step(model, images, tmp_path, monkeypatch):
    default = _pixels(monkeypatch, _argv(model, images, tmp_path / "a"))
    nearest = _pixels(monkeypatch, _argv(model, images, tmp_path / "b", "--resize_interpolation", "nearest"))
    assert len(default) == len(nearest) == 4
    sources = set()
    for path in sorted((images / "train" / "2_sks teapot").glob("*.png")):
        sources |= set(map(tuple, np.asarray(Image.open(path)).reshape(-1, 3)))

    def colours(pixels):
        return set(map(tuple, ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3).tolist()))

    assert all(colours(p) <= sources for p in nearest), "nearest neighbour: only the images' own pixels"
    assert not all(colours(p) <= sources for p in default), "the default (area, shrinking) blends pixels"


def test_the_disk_cache_is_rewritten_for_another_interpolation(model, images, tmp_path):
    cache = images / "train" / "2_sks teapot" / "0.npz"
    assert train_network_cat.main(_argv(model, images, tmp_path / "a", "--cache_latents_to_disk")) == 0
    first = np.load(cache)["latents"]
    assert train_network_cat.main(_argv(model, images, tmp_path / "b", "--cache_latents_to_disk",
                                        "--resize_interpolation", "bilinear")) == 0
    with np.load(cache) as npz:
        assert str(npz["resize_interpolation"]) == "bilinear" and not np.array_equal(npz["latents"], first)
    a, b = (read_lora_file(tmp_path / out / "lora.safetensors")[0] for out in ("a", "b"))
    assert any(not torch.equal(a[name], b[name]) for name in a), "other latents, another LoRA"
