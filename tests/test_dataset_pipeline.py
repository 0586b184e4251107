"""A dataset as sd-scripts users have it, end to end through `train_network_cat.py`: mixed image
sizes in buckets, .txt captions, a regularisation folder, a dataset TOML, a prompt file; the
captions that reach the step, the latent cache, the metadata, and bad datasets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from library.training.train_batch import DiffusionNoising
from library.training.caption_tokens import CaptionTokens
import train_network_cat
from networks.lora_cat.file_format import read_lora_file
from library.testing.tiny_sd import tiny_config_dir

CAPTIONS = ["sks teapot, red, on a table", "sks teapot, blue, in a kitchen", "sks teapot, green, close-up",
            "sks teapot, white, studio light"]
SIZES = [(64, 64), (120, 30), (48, 96), (80, 40)]  # buckets 64x64, 128x32, 32x96, 64x64



@pytest.fixture(scope="module")
def model(tiny_sd_v1_files):
    return tiny_sd_v1_files.safetensors  # conftest.py: the tiny SD 1.x model (seed 0), written once per session


@pytest.fixture()
def dataset(tmp_path):
    """`train/3_sks teapot` (PNG, JPEG, WebP of mixed shapes, .txt captions), `reg/1_teapot` (no captions),
    a dataset TOML as the kohya_ss GUI writes one, and a prompt file."""
    rng = np.random.default_rng(0)
    train, reg = tmp_path / "train" / "3_sks teapot", tmp_path / "reg" / "1_teapot"
    train.mkdir(parents=True)
    reg.mkdir(parents=True)
    for index, ((w, h), caption, suffix) in enumerate(zip(SIZES, CAPTIONS, [".png", ".jpg", ".webp", ".png"])):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(train / f"{index}{suffix}")
        (train / f"{index}.txt").write_text(caption + "\n", encoding="utf-8")
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(reg / f"r{index}.png")
    (tmp_path / "dataset.toml").write_text(f"""
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "{train}"
  num_repeats = 3
  class_tokens = "sks teapot"

  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "teapot"
  is_reg = true
""", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("sks teapot on a beach --w 64 --h 64 --d 5 --s 2\n", encoding="utf-8")
    return tmp_path


def _argv(model, dataset, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
        "--dataset_config", str(dataset / "dataset.toml"), "--output_dir", str(out), "--output_name", "lora",
        "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "4", "--seed", "2",
        "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", *extra,
    ]


def test_sd_scripts_dataset_trains_unchanged_with_samples(model, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(model, dataset, out, "--sample_prompts", str(dataset / "prompts.txt"), "--sample_every_n_steps", "2")
    assert train_network_cat.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dataset 0: batch size 2" in printed and "bucket 0:" in printed, "the bucket table is printed at start"
    _, metadata = read_lora_file(out / "lora.safetensors")
    (entry,) = json.loads(metadata["ss_datasets"])
    assert entry["enable_bucket"] is True and entry["num_train_images"] == 12 and entry["num_reg_images"] == 2
    resolutions = {tuple(b["resolution"]) for b in entry["bucket_info"]["buckets"].values()}
    assert len(resolutions) >= 3 and all(w * h <= 64 * 64 for w, h in resolutions)
    assert sum(b["count"] for b in entry["bucket_info"]["buckets"].values()) == 24, "12 training + 12 regularisation"
    assert [s["is_reg"] for s in entry["subsets"]] == [False, True] and entry["subsets"][0]["flip_aug"] is True
    frequency = json.loads(metadata["ss_tag_frequency"])
    assert frequency["3_sks teapot"]["sks teapot"] == 4 and frequency["1_teapot"] == {"teapot": 2}
    assert metadata["ss_num_train_images"] == "12"
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert len(samples) == 2 and all(name.startswith("lora_") and name.endswith("_5.png") for name in samples)


_TOKENS_CALL = CaptionTokens.__call__


def _recording(seen: list):
    """The trainer's caption tokenizer (`CaptionTokens`), also appending the captions of each call to `seen`:
    each training step's captions, then (with CAT on) their trigger-free ones."""
    def recording(tokens, captions):
        seen.append(list(captions))
        return _TOKENS_CALL(tokens, captions)
    return recording


def test_captions_that_reach_the_step(model, dataset, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(CaptionTokens, "__call__", _recording(seen))
    assert train_network_cat.main(_argv(model, dataset, tmp_path / "out", "--max_train_steps", "6")) == 0
    trained, free = seen[0::2], seen[1::2]  # each step tokenizes the training captions, then the trigger-free ones
    captions = [c for batch in trained for c in batch]
    assert len(captions) == 12
    for caption, stripped in zip(captions, [c for batch in free for c in batch]):
        if caption == "teapot":
            assert stripped == "teapot", "a regularisation caption is its own trigger-free caption"
            continue
        tags = caption.split(", ")
        assert tags[0] == "sks teapot", "keep_tokens = 1 keeps the first tag in place"
        assert sorted(tags[1:]) in [sorted(c.split(", ")[1:]) for c in CAPTIONS]
        assert stripped == caption.replace("sks ", "", 1), "the trigger-free caption is the shuffled one, stripped"
    assert any(c not in CAPTIONS for c in captions if c != "teapot"), "tags were shuffled"
    again = []
    monkeypatch.setattr(CaptionTokens, "__call__", _recording(again))
    assert train_network_cat.main(_argv(model, dataset, tmp_path / "out2", "--max_train_steps", "6")) == 0
    assert again == seen, "the same seed gives the same captions"


def test_latent_cache_on_disk_gives_the_same_lora_and_is_reused(model, dataset, tmp_path):
    # The same latents up to the VAE's rounding: uncached, each batch of 2 is one VAE call; the cache
    # encodes one image per call (--vae_batch_size 1). Bitwise equality of the latents themselves is
    # tests/test_latents.py's.
    assert train_network_cat.main(_argv(model, dataset, tmp_path / "plain", "--cat_weight", "0")) == 0
    cached_run = _argv(model, dataset, tmp_path / "cached", "--cat_weight", "0", "--cache_latents_to_disk")
    assert train_network_cat.main(cached_run) == 0
    plain, _ = read_lora_file(tmp_path / "plain" / "lora.safetensors")
    cached, _ = read_lora_file(tmp_path / "cached" / "lora.safetensors")
    assert plain.keys() == cached.keys()
    assert all(torch.allclose(plain[k], cached[k], rtol=0, atol=1e-5) for k in plain)
    files = sorted((dataset / "train" / "3_sks teapot").glob("*.npz"))
    assert len(files) == 4
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = _argv(model, dataset, tmp_path / "again", "--cat_weight", "0", "--cache_latents_to_disk", "--max_train_steps", "1")
    assert train_network_cat.main(again) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == stamps, "valid cache files are reused, not rewritten"


def test_folders_with_bucket_flags_write_the_flat_metadata(model, dataset, tmp_path):
    argv = [
        "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(dataset / "train"), "--reg_data_dir", str(dataset / "reg"), "--resolution", "64",
        "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--caption_extension", ".txt", "--caption_prefix", "photo,", "--color_aug", "--random_crop",
        "--caption_tag_dropout_rate", "0.2", "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
        "--max_train_steps", "2", "--train_batch_size", "2", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0",
    ]
    assert train_network_cat.main(argv) == 0
    _, metadata = read_lora_file(tmp_path / "out" / "lora.safetensors")
    assert metadata["ss_enable_bucket"] == "True" and metadata["ss_color_aug"] == "True"
    assert metadata["ss_random_crop"] == "True" and metadata["ss_resolution"] == "(64, 64)"
    assert len(json.loads(metadata["ss_bucket_info"])["buckets"]) >= 3
    assert json.loads(metadata["ss_dataset_dirs"]) == {"3_sks teapot": {"n_repeats": 3, "img_count": 4}}


def test_cache_with_per_step_augmentations_is_refused(model, dataset, tmp_path, capsys):
    argv = _argv(model, dataset, tmp_path / "out", "--cache_latents", "--random_crop")
    assert train_network_cat.main(argv) == 2
    assert "--cache_latents cannot be used with color_aug or random_crop" in capsys.readouterr().err


def test_every_dataset_problem_is_reported_together_before_training(model, dataset, tmp_path, capsys):
    train = dataset / "train" / "3_sks teapot"
    (train / "broken.png").write_bytes(b"not an image")
    (dataset / "train" / "no_repeats").mkdir()
    (dataset / "reg" / "2_empty").mkdir()
    argv = [
        "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(dataset / "train"), "--reg_data_dir", str(dataset / "reg"), "--resolution", "64",
        "--caption_extension", ".txt", "--output_dir", str(tmp_path / "out"), "--cat_trigger", "zzz",
    ]
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    for words in ("broken.png", "no_repeats", "2_empty", "appears in none of the 5 captions"):
        assert words in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"


def test_data_loader_workers_do_not_change_the_lora(model, dataset, tmp_path):
    def argv(out, workers):
        return [
            "--pretrained_model_name_or_path", str(model), "--model_config", str(tiny_config_dir(False)),
            "--train_data_dir", str(dataset / "train"), "--resolution", "64", "--caption_extension", ".txt",
            "--flip_aug", "--random_crop", "--color_aug", "--shuffle_caption", "--train_batch_size", "4",
            "--max_train_epochs", "2", "--cat_weight", "0", "--network_dim", "4", "--seed", "1",
            "--output_dir", str(out), "--output_name", "lora", "--max_data_loader_n_workers", workers,
        ]

    assert train_network_cat.main(argv(tmp_path / "w0", "0")) == 0
    assert train_network_cat.main(argv(tmp_path / "w2", "2") + ["--persistent_data_loader_workers"]) == 0
    inline, _ = read_lora_file(tmp_path / "w0" / "lora.safetensors")
    workers, metadata = read_lora_file(tmp_path / "w2" / "lora.safetensors")
    assert metadata["ss_steps"] == "6" and all(torch.equal(inline[k], workers[k]) for k in inline)


def test_regularisation_samples_are_weighted_by_prior_loss_weight(model, dataset, tmp_path, monkeypatch):
    captions, weights = [], []
    build = DiffusionNoising.batch
    monkeypatch.setattr(CaptionTokens, "__call__", _recording(captions))
    monkeypatch.setattr(DiffusionNoising, "batch", lambda *a, **k: weights.append(a[4].tolist()) or build(*a, **k))
    argv = _argv(model, dataset, tmp_path / "out", "--prior_loss_weight", "0.25", "--max_train_steps", "8", "--cat_weight", "0")
    assert train_network_cat.main(argv) == 0
    pairs = [(c, w) for batch, ws in zip(captions, weights) for c, w in zip(batch, ws)]
    assert {w for c, w in pairs if c == "teapot"} == {0.25} and {w for c, w in pairs if c != "teapot"} == {1.0}


def _wildcard_captions(dataset):
    """The first training image's caption file: two lines, wildcards in the second."""
    (dataset / "train" / "3_sks teapot" / "0.txt").write_text(
        "sks teapot, red, on a table\n\n{a photo|a painting} of sks teapot, {{braces}}\n", encoding="utf-8")


def test_wildcards_and_multi_line_captions_reach_the_step_and_cat_strips_the_chosen_caption(model, dataset, tmp_path,
                                                                                           monkeypatch):
    _wildcard_captions(dataset)
    seen = []
    monkeypatch.setattr(CaptionTokens, "__call__", _recording(seen))
    toml = (dataset / "dataset.toml").read_text(encoding="utf-8").replace("shuffle_caption = true", "enable_wildcard = true")
    (dataset / "dataset.toml").write_text(toml, encoding="utf-8")
    assert train_network_cat.main(_argv(model, dataset, tmp_path / "out", "--max_train_steps", "40")) == 0
    # Each step tokenizes its captions, then their trigger-free ones (CAT is on).
    trained, free = [c for batch in seen[0::2] for c in batch], [c for batch in seen[1::2] for c in batch]
    choices = {"sks teapot, red, on a table", "a photo of sks teapot, {braces}", "a painting of sks teapot, {braces}"}
    drawn = [c for c in trained if c in choices or "{" in c or "photo" in c or "painting" in c]
    assert set(drawn) <= choices and len(set(drawn)) >= 2, drawn
    assert {c.replace("sks ", "", 1) for c in drawn} <= set(free), "each trigger-free caption strips the chosen one"


def test_without_wildcards_a_caption_file_s_first_line_trains_as_written(model, dataset, tmp_path, monkeypatch):
    _wildcard_captions(dataset)
    seen = []
    monkeypatch.setattr(CaptionTokens, "__call__", _recording(seen))
    toml = (dataset / "dataset.toml").read_text(encoding="utf-8").replace("shuffle_caption = true\n", "")
    (dataset / "dataset.toml").write_text(toml, encoding="utf-8")
    assert train_network_cat.main(_argv(model, dataset, tmp_path / "out", "--max_train_steps", "40")) == 0
    trained = {c for batch in seen[0::2] for c in batch}
    assert "sks teapot, red, on a table" in trained and not any("photo" in c or "painting" in c for c in trained)
