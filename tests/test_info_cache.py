"""`--cache_info` / `cache_info`: sd-scripts' metadata_cache.json of image sizes and captions, read by
both trainers, used only while each image is unchanged; captions always come from their files."""

import json
import logging
import shutil

import pytest
import torch
from PIL import Image

import library.data.training_data as training_data
import train_network_cat
from library.data.dataset_config import cli_subset_values, subset_options
from library.data.folder_dataset import scan_folders
from library.data.info_cache import CACHE_FILE
from library.data.buckets import BucketSettings
from library.data.training_data import DatasetSpec, place_datasets
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from networks.lora_cat.file_format import read_lora_file
from test_dataset_config import cli_data

OPTIONS = subset_options({**cli_subset_values(cli_data()), "cache_info": True})


@pytest.fixture
def folder(tmp_path):
    """The demo dataset's concept folder (4 images of 64x64 with captions), copied afresh for each test."""
    write_demo_dataset(tmp_path / "data", with_reg=False)
    (concept,) = (tmp_path / "data" / "train").iterdir()
    return concept


def _place(folder, inspected):
    """Place the folder's images (recording which ones are decoded); the data and each image's size."""
    subsets = scan_folders(folder.parent, ".txt", False, OPTIONS)
    spec = DatasetSpec(tuple(subsets), 2, BucketSettings((64, 64), True, 32, 128, 32, False))
    real = training_data.inspect_image

    def recording(path):
        inspected.append(path.name)
        return real(path)

    training_data.inspect_image = recording
    try:
        data = place_datasets([spec])
    finally:
        training_data.inspect_image = real
    return data, {path.name: placement.original for path, placement in data.datasets[0].placements.items()}


def test_the_cache_is_sd_scripts_file_and_spares_decoding_the_images(folder):
    first, second = [], []
    _, sizes = _place(folder, first)
    entries = json.loads((folder / CACHE_FILE).read_text(encoding="utf-8"))
    images = sorted(path.name for path in folder.glob("*.png"))
    assert sorted(first) == images and sorted(name.rsplit("/", 1)[-1] for name in entries) == images
    for key, entry in entries.items():  # sd-scripts' keys and fields, plus our stamp
        name = key.rsplit("/", 1)[-1]
        assert entry["resolution"] == list(sizes[name]) and len(entry["file_stamp"]) == 2
        assert entry["caption"] == (folder / name).with_suffix(".txt").read_text(encoding="utf-8").strip()
    before = (folder / CACHE_FILE).stat().st_mtime_ns
    _, again = _place(folder, second)
    assert second == [] and again == sizes, "every size from the cache, no image decoded"
    assert (folder / CACHE_FILE).stat().st_mtime_ns == before, "an up-to-date cache is not rewritten"


def test_a_changed_image_is_read_again_and_its_entry_replaced(folder):
    _place(folder, [])
    changed = sorted(folder.glob("*.png"))[0]
    Image.new("RGB", (96, 64), (10, 20, 30)).save(changed)
    inspected = []
    _, sizes = _place(folder, inspected)
    assert inspected == [changed.name] and sizes[changed.name] == (96, 64)
    entries = json.loads((folder / CACHE_FILE).read_text(encoding="utf-8"))
    assert [e["resolution"] for k, e in entries.items() if k.endswith(changed.name)] == [[96, 64]]


def test_an_sd_scripts_cache_is_stamped_once_and_matched_by_file_name(folder):
    # sd-scripts writes the image path as its run saw it (here relative to another working folder) and no stamp.
    written = {f"elsewhere/{path.name}": {"caption": "old caption", "resolution": [64, 64]}
               for path in sorted(folder.glob("*.png"))}
    (folder / CACHE_FILE).write_text(json.dumps(written), encoding="utf-8")
    first, second = [], []
    data, _ = _place(folder, first)
    assert len(first) == len(written), "entries without a stamp are checked once"
    _place(folder, second)
    assert second == []
    captions = {item.caption for subset in data.datasets[0].subsets for item in subset.items}
    assert "old caption" not in captions, "captions come from their files, not from the cache"


def test_a_broken_or_unwritable_cache_only_costs_the_speed(folder, monkeypatch, caplog):
    (folder / CACHE_FILE).write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="library.data.info_cache"):
        inspected = []
        _place(folder, inspected)
    assert len(inspected) == 4 and "cannot be read" in caplog.text
    assert json.loads((folder / CACHE_FILE).read_text(encoding="utf-8")), "rewritten"
    (folder / CACHE_FILE).unlink()

    def refuse(*args):
        raise PermissionError("read-only folder")

    monkeypatch.setattr("library.data.info_cache.os.replace", refuse)
    with caplog.at_level(logging.WARNING, logger="library.data.info_cache"):
        _place(folder, [])
    assert "cannot be written" in caplog.text and not list(folder.glob(f"*{CACHE_FILE}*"))


def test_cache_info_trains_the_same_lora(tmp_path):
    (tmp_path / "workspace").mkdir()
    workspace = write_tiny_sd_workspace(tmp_path / "workspace")
    assert train_network_cat.main(tiny_sd_argv(workspace, tmp_path / "plain")) == 0
    for run in ("first", "cached"):
        assert train_network_cat.main(tiny_sd_argv(workspace, tmp_path / run, "--cache_info")) == 0
    caches = sorted(path.parent.name for path in (workspace / "data").rglob(CACHE_FILE))
    assert caches == ["1_teapot", "2_sks teapot"], "one per folder, training and regularisation"
    plain, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    for run in ("first", "cached"):
        lora, _ = read_lora_file(tmp_path / run / "cat.safetensors")
        assert all(torch.equal(plain[k], lora[k]) for k in plain), run


def test_the_dataset_config_key(tmp_path, folder):
    shutil.rmtree(folder.parent.parent / "reg", ignore_errors=True)
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{folder.as_posix()}"\n'
                      'cache_info = true\n', encoding="utf-8")
    from library.data.dataset_config import load_dataset_config

    (spec,) = load_dataset_config(config, cli_data())
    assert spec.subsets[0].options.cache_info
    place_datasets([spec])
    assert (folder / CACHE_FILE).is_file()
