"""Datasets placed in buckets, and the batches of an epoch: one bucket per batch, repeats, regularisation."""

from collections import Counter

import pytest
from PIL import Image

from library.data.buckets import BucketSettings
from library.errors import UserInputError
from library.data.folder_dataset import scan_folders
from library.data.training_data import DatasetSpec, place_datasets

SIZES = {"wide": (128, 64), "tall": (64, 128), "square": (96, 96), "wide2": (120, 60)}


@pytest.fixture()
def mixed(tmp_path):
    """3_sks (four images of mixed shapes) and a regularisation folder of two squares."""
    train = tmp_path / "train" / "3_sks teapot"
    reg = tmp_path / "reg" / "1_teapot"
    for folder in (train, reg):
        folder.mkdir(parents=True)
    for name, size in SIZES.items():
        Image.new("RGB", size, (200, 0, 0)).save(train / f"{name}.png")
    for index in range(2):
        Image.new("RGB", (64, 64)).save(reg / f"r{index}.png")
    return tmp_path


def _data(root, batch_size=2, **bucket_options):
    subsets = scan_folders(root / "train", ".txt", is_reg=False) + scan_folders(root / "reg", ".txt", is_reg=True)
    settings = BucketSettings((64, 64), **{"min_reso": 32, "max_reso": 128, "reso_steps": 16, **bucket_options})
    return place_datasets([DatasetSpec(tuple(subsets), batch_size, settings)])


def test_images_go_to_the_bucket_of_their_shape(mixed):
    data = _data(mixed, enable=True)
    buckets = {path.stem: p.bucket for path, p in data.datasets[0].placements.items()}
    assert buckets["wide"] == buckets["wide2"] and buckets["wide"][0] > buckets["wide"][1]
    assert buckets["tall"][0] < buckets["tall"][1] and buckets["square"] == (64, 64) == buckets["r0"]


def test_every_batch_comes_from_one_bucket_and_the_epoch_has_every_image(mixed):
    data = _data(mixed, enable=True)
    batches = data.epoch_batches(1, seed=5)
    assert all(len({s.placement.bucket for s in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    names = Counter(s.item.path.stem for batch in batches for s in batch)
    # 4 training images x 3 repeats = 12; the 2 regularisation images repeated up to 12.
    assert sum(n for k, n in names.items() if not k.startswith("r")) == 12 and names["r0"] + names["r1"] == 12
    assert [s.position for batch in batches for s in batch] == list(range(24))
    assert len(batches) == data.batches_per_epoch()


def test_epochs_are_reproducible_and_differ(mixed):
    data = _data(mixed, enable=True)
    assert data.epoch_batches(2, 5) == data.epoch_batches(2, 5)
    assert data.epoch_batches(2, 5) != data.epoch_batches(3, 5)


def test_without_buckets_all_images_share_the_resolution(mixed):
    data = _data(mixed)
    assert {p.bucket for p in data.datasets[0].placements.values()} == {(64, 64)}
    info = data.datasets[0].bucket_info()
    assert info["buckets"] == {0: {"resolution": [64, 64], "count": 24}}


def test_bucket_info_counts_with_repeats_and_the_table_is_printable(mixed):
    data = _data(mixed, enable=True)
    info = data.datasets[0].bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 24
    assert info["mean_img_ar_error"] >= 0
    table = data.bucket_table()
    assert "dataset 0: batch size 2" in table and "64x64" in table


def test_every_bad_image_is_reported_together(mixed):
    folder = mixed / "train" / "3_sks teapot"
    (folder / "junk.png").write_bytes(b"nope")
    (folder / "cut.jpg").write_bytes((folder / "wide.png").read_bytes()[:40])
    with pytest.raises(UserInputError) as error:
        _data(mixed)
    assert "2 problem(s)" in str(error.value) and "junk.png" in str(error.value) and "cut.jpg" in str(error.value)


def test_two_datasets_keep_their_own_resolution_and_batch_size(mixed):
    train = scan_folders(mixed / "train", ".txt", is_reg=False)
    data = place_datasets([
        DatasetSpec(tuple(train), 4, BucketSettings((64, 64))),
        DatasetSpec(tuple(train), 1, BucketSettings((32, 32))),
    ])
    batches = data.epoch_batches(1, 0)
    sizes = Counter((batch[0].placement.bucket, len(batch)) for batch in batches)
    assert sizes == {((64, 64), 4): 3, ((32, 32), 1): 12}


def test_no_upscale_image_smaller_than_a_step_is_named(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (100, 30)).save(folder / "thin.png")
    subsets = scan_folders(tmp_path / "train", ".txt", is_reg=False)
    settings = BucketSettings((512, 512), enable=True, no_upscale=True)
    with pytest.raises(UserInputError, match="thin.png: with bucket_no_upscale its bucket would be 64x0"):
        place_datasets([DatasetSpec(tuple(subsets), 1, settings)])


def test_regularisation_images_are_counted_with_repeats(mixed):
    reg = mixed / "reg" / "1_teapot"
    reg.rename(mixed / "reg" / "3_teapot")
    assert _data(mixed).num_reg_images == 6


def test_colour_augmentation_touches_a_third_of_the_samples_as_sd_scripts(mixed):
    from dataclasses import replace

    from library.data.folder_dataset import SubsetOptions
    from library.data.run_data import augmentation

    data = _data(mixed)
    options = SubsetOptions(color_aug=True)
    samples = [replace(s, item=replace(s.item, options=options)) for e in range(1, 40) for b in data.epoch_batches(e, 0)
               for s in b]
    augs = [augmentation(0, s, 1 + i // 24) for i, s in enumerate(samples)]
    hue = sum(a.hue_shift != 0 for a in augs) / len(augs)
    gamma = sum(a.gamma != 1.0 for a in augs) / len(augs)
    assert 0.12 < hue < 0.21 and 0.12 < gamma < 0.21 and not any(a.hue_shift and a.gamma != 1.0 for a in augs)
    assert all(abs(a.hue_shift) <= 8 / 180 and 0.95 <= a.gamma <= 1.05 for a in augs)
