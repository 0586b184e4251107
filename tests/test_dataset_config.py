"""--dataset_config: sd-scripts' three levels, strict checking, and per-subset CAT triggers."""

import json
import shutil

import pytest
from PIL import Image

import train_network_cat
from library.data.dataset_config import load_dataset_config
from library.testing.demo_data import write_demo_dataset
from library.errors import UserInputError
from networks.lora_cat.file_format import read_lora_file
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.data.run_data import free_caption
from library.cli.train_args import parse_args


def cli_data(*flags: str):
    """The command line's dataset values (the fallbacks of every level of the file)."""
    return parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "out", "--dataset_config", "d.toml",
                       *flags]).data


@pytest.fixture()
def two_concepts(tmp_path):
    write_demo_dataset(tmp_path / "a", with_reg=True)
    teapot = tmp_path / "a" / "train" / "2_sks teapot"
    mug = tmp_path / "mug"
    shutil.copytree(teapot, mug)
    for caption in mug.glob("*.txt"):
        caption.write_text(caption.read_text().replace("sks teapot", "zxc mug"))
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{teapot}"
  num_repeats = 2
  class_tokens = "sks teapot"
  cat_trigger = "sks"

  [[datasets.subsets]]
  image_dir = "{mug}"
  cat_trigger = ["zxc"]
  cat_class_word = "mug"

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'a' / 'reg' / '1_teapot'}"
  is_reg = true
""", encoding="utf-8")
    return config


def test_levels_and_subset_triggers(two_concepts):
    (spec,) = load_dataset_config(two_concepts, cli_data())
    assert spec.buckets.resolution == (64, 64) and spec.batch_size == 2
    teapot, mug, reg = spec.subsets
    assert (teapot.repeats, teapot.cat_triggers, mug.repeats, mug.cat_triggers) == (2, ("sks",), 1, ("zxc",))
    assert mug.cat_class_word == "mug" and reg.is_reg
    assert teapot.items[0].caption.startswith("a photo of sks"), "caption_extension from [general]"
    # network_multiplier at its default changes nothing, so a GUI that writes it out is not refused.
    two_concepts.write_text(two_concepts.read_text().replace("batch_size = 2", "batch_size = 2\nnetwork_multiplier = 1.0"))
    assert load_dataset_config(two_concepts, cli_data())[0].batch_size == 2


def test_each_sample_strips_its_own_trigger(two_concepts, tmp_path):
    config = parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path),
                         "--dataset_config", str(two_concepts), "--cat_caption", "class"])
    teapot, mug, _ = load_dataset_config(two_concepts, cli_data())[0].subsets
    assert free_caption(config, teapot.items[0], teapot.items[0].caption) == "a photo of teapot"
    assert free_caption(config, mug.items[0], mug.items[0].caption) == "a photo of mug"


def test_multi_concept_run_end_to_end(two_concepts, tmp_path):
    model = tmp_path / "tiny.safetensors"
    save_single_file(build_tiny_sd(seed=0), model)
    argv = ["--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
            "--dataset_config", str(two_concepts), "--output_dir", str(tmp_path / "out"), "--output_name", "multi",
            "--max_train_steps", "3", "--seed", "1", "--max_data_loader_n_workers", "0"]
    assert train_network_cat.main(argv) == 0
    _, metadata = read_lora_file(tmp_path / "out" / "multi.safetensors")
    (dataset,) = json.loads(metadata["ss_datasets"])
    assert dataset["resolution"] == [64, 64] and metadata["ss_num_reg_images"] == "2"
    assert [s["num_repeats"] for s in dataset["subsets"]] == [2, 1, 1] and dataset["subsets"][2]["is_reg"]


@pytest.mark.parametrize("text, message", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dri = "x"\n', "unknown key 'image_dri'; did you mean image_dir"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncache_info = 1\n', "cache_info = 1 should be true or false"),
    ('[[datasets]]\nnetwork_multiplier = -1.0\n[[datasets.subsets]]\nimage_dir = "x"\n',
     "network_multiplier = -1.0: a dataset's own network multiplier"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = 0\n', "num_repeats = 0 should be at least 1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\ncaption_dropout_rate = 1.5\n', "between 0 and 1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nflip_aug = 1\n', "flip_aug = 1 should be true or false"),
    ('[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n'
     '[[datasets.subsets]]\nimage_dir = "."\n', "min_bucket_reso = 512 is larger than max_bucket_reso"),
    ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n', "has no image_dir"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = "2"\n', "should be an integer"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/no/such/folder"\n', "/no/such/folder is not a folder"),
    ('[general]\nresolution = 64\n', "there is no [[datasets]] table"),
    ('[[datasets]]\nresolution = 0\n[[datasets.subsets]]\nimage_dir = "."\n', "resolution = 0 should be one size"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = ""\n', "has no image_dir"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "."\ncat_trigger = [1, 2]\n',
     "cat_trigger = [1, 2] should be a string or a list of non-empty strings"),
    ('[[datasets]\n', "not valid TOML"),
])
def test_bad_files_name_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_dataset_config(path, cli_data("--resolution", "64"))
    assert message in str(error.value) and "bad.toml" in str(error.value)


def test_file_is_read_as_toml_1_0_like_the_config_file(two_concepts):
    # stdlib tomllib, as for --config_file: a byte-order mark (Windows editors) is fine, and a mixed
    # array is valid TOML that the strict check then names (the old `toml` package called both invalid TOML).
    two_concepts.write_bytes(b"\xef\xbb\xbf" + two_concepts.read_bytes())
    (spec,) = load_dataset_config(two_concepts, cli_data())
    assert len(spec.subsets) == 3
    two_concepts.write_text(two_concepts.read_text(encoding="utf-8-sig").replace('["zxc"]', '["zxc", 1]'))
    with pytest.raises(UserInputError) as error:
        load_dataset_config(two_concepts, cli_data())
    assert "cat_trigger = ['zxc', 1] should be a string or a list of non-empty strings" in str(error.value)


def test_windows_backslash_path_names_the_line_and_how_to_write_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\lora\\img"\n', encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_dataset_config(path, cli_data())
    message = str(error.value)
    assert str(path) in message and "line 3" in message and "image_dir = 'C:\\lora\\img'" in message


@pytest.mark.parametrize("table, line, message", [
    ("[[datasets]]", 'resolution = "64"', "[[datasets]] #1 resolution = '64' is a string, and sd-scripts reads an "
                                          "integer or [width, height] here: write resolution = 64 "),
    ("[general]", 'resolution = "512,768"', "[general] resolution = '512,768' is a string, and sd-scripts reads an "
                                            "integer or [width, height] here: write resolution = [512, 768] "),
    ("[[datasets]]", "resolution = [512.5, 512]",
     "[[datasets]] #1 resolution = [512.5, 512] should be one size (resolution = 512)"),
    ("[[datasets]]", 'resolution = ["64", "64"]', "[[datasets]] #1 resolution = ['64', '64'] should be one size"),
])
def test_resolution_is_an_integer_or_a_pair_of_integers_as_in_sd_scripts(tmp_path, table, line, message):
    (tmp_path / "img").mkdir()
    path = tmp_path / "data.toml"
    body = {"[general]": f"[general]\n{line}\n[[datasets]]\nresolution = 64\n",
            "[[datasets]]": f"[[datasets]]\n{line}\n"}[table]
    path.write_text(body + '[[datasets.subsets]]\nimage_dir = "img"\n', encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_dataset_config(path, cli_data("--resolution", "64"))
    assert f"{path}: {message}" in str(error.value)


def test_all_problems_are_reported_together(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[datasets]]\nbatchsize = 2\n[[datasets.subsets]]\nimage_dir = "x"\ncache_info = "yes"\n'
                    '[[datasets]]\n[[datasets.subsets]]\nimage_dri = "y"\n')
    with pytest.raises(UserInputError) as error:
        load_dataset_config(path, cli_data())
    message = str(error.value)
    assert "batchsize" in message and "cache_info" in message and "[[datasets]] #2" in message


@pytest.mark.parametrize("edit, message", [
    (('cat_trigger = ["zxc"]', ""), "has no trigger"),
    (('cat_trigger = ["zxc"]', 'cat_trigger = ["qqq"]'), "appears in none of the 4 captions"),
])
def test_subset_trigger_problems_stop_the_run_at_start(two_concepts, tmp_path, capsys, edit, message):
    two_concepts.write_text(two_concepts.read_text().replace(*edit))
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "unused.safetensors"), "--dataset_config",
            str(two_concepts), "--output_dir", str(tmp_path / "out")]
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "mug" in err


def test_fine_tune_subset_reads_captions_and_tags_from_its_metadata_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.jpg", "c.webp"):
        Image.new("RGB", (16, 16)).save(images / name)
    (tmp_path / "meta.json").write_text(json.dumps({
        "a": {"caption": "sks teapot on a table", "tags": "red, shiny"},
        str(images / "b.jpg"): {"tags": "sks teapot, blue"},
        "c.webp": {"caption": "sks teapot"},
    }), encoding="utf-8")
    config = tmp_path / "ft.toml"
    config.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "images"\n'
                      'metadata_file = "meta.json"\nnum_repeats = 2\n', encoding="utf-8")
    ((subset,),) = [spec.subsets for spec in load_dataset_config(config, cli_data())]
    assert subset.repeats == 2 and subset.metadata_file == tmp_path / "meta.json"
    assert [(i.path.name, i.caption) for i in subset.items] == [
        ("a.png", "sks teapot on a table, red, shiny"), ("b.jpg", "sks teapot, blue"), ("c.webp", "sks teapot")]


@pytest.mark.parametrize("meta, message", [
    ({"missing": {"caption": "x"}}, "no image found for missing"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_metadata_files_are_named(tmp_path, meta, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    config = tmp_path / "ft.toml"
    config.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "images"\n'
                      'metadata_file = "meta.json"\n', encoding="utf-8")
    with pytest.raises(UserInputError) as error:
        load_dataset_config(config, cli_data())
    assert message in str(error.value) and "meta.json" in str(error.value)


def test_a_dataset_cannot_mix_folders_and_metadata_files(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "meta.json").write_text('{"a": {"caption": "x"}}', encoding="utf-8")
    config = tmp_path / "mix.toml"
    config.write_text('[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "images"\n'
                      'metadata_file = "meta.json"\n[[datasets.subsets]]\nimage_dir = "images"\n', encoding="utf-8")
    with pytest.raises(UserInputError, match="mixes image_dir subsets with metadata_file subsets"):
        load_dataset_config(config, cli_data())


def test_in_json_reads_the_older_fine_tune_layout(tmp_path):
    from library.data.run_data import load_training_data

    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "meta.json").write_text('{"a": {"caption": "a photo of sks teapot"}}', encoding="utf-8")
    config = parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                         "--train_data_dir", str(tmp_path / "images"), "--in_json", str(tmp_path / "meta.json"),
                         "--resolution", "64", "--cat_trigger", "sks"])
    (subset,) = load_training_data(config).subsets
    assert [i.caption for i in subset.items] == ["a photo of sks teapot"] and subset.name == "meta.json"
    repeated = parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                           "--train_data_dir", str(tmp_path / "images"), "--in_json", str(tmp_path / "meta.json"),
                           "--resolution", "64", "--cat_trigger", "sks", "--dataset_repeats", "3"])
    assert load_training_data(repeated).num_train_images == 3


def test_same_stem_images_are_refused_with_the_disk_cache(tmp_path):
    from library.data.run_data import load_training_data

    folder = tmp_path / "train" / "1_sks teapot"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    Image.new("RGB", (16, 16)).save(folder / "a.jpg")
    flags = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir",
             str(tmp_path / "train"), "--resolution", "64", "--cat_trigger", "sks"]
    assert len(load_training_data(parse_args(flags)).subsets[0].items) == 2
    with pytest.raises(UserInputError, match="a.jpg and a.png would share the latent cache file a.npz"):
        load_training_data(parse_args(flags + ["--cache_latents_to_disk"]))


def test_trigger_free_caption_of_a_rejoined_caption_with_another_separator(tmp_path):
    from dataclasses import replace

    from library.data.caption_transforms import CaptionOptions
    from library.data.folder_dataset import ImageItem, SubsetOptions

    config = parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path), "--train_data_dir",
                         "d", "--resolution", "64", "--cat_trigger", "sks"])
    item = ImageItem(tmp_path / "a.png", "red; dog; sks", "dog", False)
    item = replace(item, options=SubsetOptions(CaptionOptions(shuffle=True, separator=";")))
    assert free_caption(config, item, "red, dog, sks") == "red, dog"
