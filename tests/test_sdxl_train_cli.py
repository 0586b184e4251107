"""`sdxl_train_network_cat.py` on the tiny SDXL model: what only SDXL has (size/crop conditioning,
text-encoder output caching, two text-encoder learning rates) and SDXL's refusals."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import sdxl_train_network_cat
import train_network_cat
from library.families.sdxl.denoiser import SDXLDenoiser
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file
from library.training import text_cache
from networks.lora_cat.file_format import read_lora_file


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    save_sdxl_single_file(build_tiny_sdxl(seed=0), root / "tiny_sdxl.safetensors")
    save_single_file(build_tiny_sd(seed=0), root / "tiny_sd.safetensors")
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny_sdxl.safetensors"), "--model_config", str(TINY_SDXL_CONFIG),
        "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", *extra,
    ]


def _recording_time_ids(monkeypatch) -> list:
    seen = []
    predict = SDXLDenoiser.predict

    def recording(self, noisy_latents, timesteps, text_states, time_ids=None):
        seen.append(None if time_ids is None else time_ids.tolist())
        return predict(self, noisy_latents, timesteps, text_states, time_ids)

    monkeypatch.setattr(SDXLDenoiser, "predict", recording)
    return seen


def test_every_prediction_is_told_the_image_s_size_and_crop(workspace, tmp_path, monkeypatch):
    # One 96x64 image in the 64x64 bucket: sd-scripts tells SDXL original (h, w) = (64, 96), crop
    # (top, left) = (10, 0) (its centred fit of 64 x 42.67 in the bucket), target (64, 64).
    folder = tmp_path / "data" / "1_sks teapot"
    folder.mkdir(parents=True)
    Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a photo of sks teapot", encoding="utf-8")
    seen = _recording_time_ids(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "--train_data_dir", str(tmp_path / "data"), "--train_batch_size", "1",
                 "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32")
    assert sdxl_train_network_cat.main(argv) == 0
    told = [ids for ids in seen if ids is not None]
    # Per step: the reference and both adapted passes share the numbers.
    assert told == [[[64.0, 96.0, 10.0, 0.0, 64.0, 64.0]]] * 6, told


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_cached_text_encoder_outputs_train_the_same_lora_without_the_encoders(workspace, tmp_path, monkeypatch, mode):
    # SGD: an update linear in the gradient, so rounding differences stay rounding-sized (Adam's
    # normalised step can turn a 1e-7 difference in a near-zero gradient into one of the step size).
    base = ("--network_train_unet_only", "--cat_mode", mode, "--optimizer_type", "SGDNesterov", "--learning_rate", "1.0")
    assert sdxl_train_network_cat.main(_argv(workspace, tmp_path / "plain", *base)) == 0
    calls = []
    encode = SDXLDenoiser.encode
    monkeypatch.setattr(SDXLDenoiser, "encode", lambda self, ids: calls.append(ids.shape[0]) or encode(self, ids))
    assert sdxl_train_network_cat.main(_argv(workspace, tmp_path / "cached", *base, "--cache_text_encoder_outputs")) == 0
    # The network guard's two probe passes, then the empty caption, then the 8 captions (4 training,
    # 4 trigger-free) a batch size (2, sd-scripts' default --text_encoder_batch_size) at a time.
    assert calls[2:] == [1, 2, 2, 2, 2]
    calls.clear()
    one = _argv(workspace, tmp_path / "one", *base, "--cache_text_encoder_outputs", "--text_encoder_batch_size", "3")
    assert sdxl_train_network_cat.main(one) == 0
    assert calls[2:] == [1, 3, 3, 2]
    expected, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    got, _ = read_lora_file(tmp_path / "cached" / "cat.safetensors")
    assert expected.keys() == got.keys()
    # Caching encodes other batches than training does: CPU matmuls round differently by batch size
    # (3.6e-7 measured on the pooled embedding).
    assert any(expected[name].abs().max() > 1e-4 for name in expected if "lora_up" in name), "training moved the LoRA"
    by_three, _ = read_lora_file(tmp_path / "one" / "cat.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(by_three[name], expected[name], atol=1e-6, rtol=1e-5)


def test_the_disk_cache_is_reused_only_for_the_same_captions(workspace, tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data)
    argv = _argv(workspace, tmp_path / "out", "--train_data_dir", str(data / "train"), "--network_train_unet_only",
                 "--cache_text_encoder_outputs_to_disk")
    assert sdxl_train_network_cat.main(argv) == 0
    files = sorted((data / "train" / "2_sks teapot").glob("*" + text_cache.DISK_SUFFIX))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    (data / "train" / "2_sks teapot" / "000.txt").write_text("a drawing of sks teapot\n", encoding="utf-8")
    assert sdxl_train_network_cat.main(argv) == 0
    assert [f.stat().st_mtime_ns for f in files][1:] == stamps[1:], "unchanged captions: files reused"
    assert files[0].stat().st_mtime_ns != stamps[0], "a changed caption: its file is written anew"
    # Another model (other text-encoder weights): every file is written anew.
    other = tmp_path / "other.safetensors"
    save_sdxl_single_file(build_tiny_sdxl(seed=1), other)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert sdxl_train_network_cat.main(argv + ["--pretrained_model_name_or_path", str(other)]) == 0
    assert all(f.stat().st_mtime_ns != stamp for f, stamp in zip(files, stamps))


def test_two_text_encoder_learning_rates(workspace, tmp_path, monkeypatch):
    import library.training.trainer as trainer

    groups = []
    build = trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer", lambda g, *a: groups.extend(g) or build(g, *a))
    argv = _argv(workspace, tmp_path / "out", "--text_encoder_lr", "1e-5", "2e-5", "--unet_lr", "1e-3",
                 "--max_train_steps", "1")
    assert sdxl_train_network_cat.main(argv) == 0
    rates = sorted({group["lr"] for group in groups})
    assert rates == [1e-5, 2e-5, 1e-3]


@pytest.mark.parametrize("extra, message", [
    (("--v2",), "SDXL has no 2.x variant"),
    (("--enable_bucket", "--bucket_reso_steps", "48"), "multiple of 32"),
    (("--cache_text_encoder_outputs",), "needs --network_train_unet_only"),
    (("--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"), "--shuffle_caption"),
    (("--text_encoder_lr", "1e-5", "1e-5", "1e-5"), "has 2 text encoders"),
])
def test_sdxl_rules_are_refused_with_a_sentence_and_keep_files(workspace, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.safetensors").write_bytes(b"keep me")
    assert sdxl_train_network_cat.main(_argv(workspace, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert (out / "earlier.safetensors").read_bytes() == b"keep me"


def test_a_checkpoint_of_the_other_family_names_the_other_script(workspace, tmp_path, capsys):
    sd_argv = _argv(workspace, tmp_path / "a", "--pretrained_model_name_or_path", str(workspace / "tiny_sd.safetensors"),
                    "--model_config", str(tiny_config_dir(False)))
    assert sdxl_train_network_cat.main(sd_argv) == 2
    assert "train_network_cat.py" in capsys.readouterr().err
    xl_argv = _argv(workspace, tmp_path / "b", "--model_config", str(tiny_config_dir(False)))
    assert train_network_cat.main(xl_argv) == 2
    assert "sdxl_train_network_cat.py" in capsys.readouterr().err


def test_an_sd1_lora_as_network_weights_is_refused(workspace, tmp_path, capsys):
    sd1 = tmp_path / "sd1"
    sd_argv = ["--pretrained_model_name_or_path", str(workspace / "tiny_sd.safetensors"), "--model_config",
               str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension",
               ".txt", "--resolution", "64", "--output_dir", str(sd1), "--output_name", "sd1", "--network_dim", "4",
               "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--cat_weight", "0"]
    assert train_network_cat.main(sd_argv) == 0
    argv = _argv(workspace, tmp_path / "out", "--network_weights", str(sd1 / "sd1.safetensors"))
    assert sdxl_train_network_cat.main(argv) == 2
    assert "sd1.safetensors" in capsys.readouterr().err


def test_sd_refuses_text_encoder_caching_naming_the_sdxl_script(workspace, tmp_path, capsys):
    argv = _argv(workspace, tmp_path / "out", "--pretrained_model_name_or_path", str(workspace / "tiny_sd.safetensors"),
                 "--model_config", str(tiny_config_dir(False)), "--cache_text_encoder_outputs", "--network_train_unet_only")
    assert train_network_cat.main(argv) == 2
    assert "sdxl_train_network_cat.py" in capsys.readouterr().err


def test_v_prediction_with_zero_terminal_snr(workspace, tmp_path):
    argv = _argv(workspace, tmp_path / "out", "--v_parameterization", "--zero_terminal_snr")
    assert sdxl_train_network_cat.main(argv) == 0
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_zero_terminal_snr"] == "True"


def test_long_prompts_reach_the_u_net_as_one_long_sequence(workspace, tmp_path, monkeypatch):
    lengths = []
    predict = SDXLDenoiser.predict

    def recording(self, noisy_latents, timesteps, text_states, time_ids=None):
        lengths.append((text_states.states.shape[1], text_states.pooled.shape))
        return predict(self, noisy_latents, timesteps, text_states, time_ids)

    monkeypatch.setattr(SDXLDenoiser, "predict", recording)
    assert sdxl_train_network_cat.main(_argv(workspace, tmp_path / "out", "--max_token_length", "225")) == 0
    # 3 windows of 75 tokens + <BOS> + <EOS>; one pooled vector per sample.
    assert lengths and all(length == 227 for length, _ in lengths)
    assert all(pooled[-1] == 32 and len(pooled) == 2 for _, pooled in lengths)


def test_a_dataset_subset_that_shuffles_captions_cannot_be_cached(workspace, tmp_path, capsys):
    config = tmp_path / "dataset.toml"
    config.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\n"
        f"image_dir = '{workspace / 'data' / 'train' / '2_sks teapot'}'\ncaption_extension = '.txt'\n"
        "shuffle_caption = true\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "--dataset_config", str(config), "--network_train_unet_only",
                 "--cache_text_encoder_outputs")
    argv.remove("--train_data_dir")
    argv.remove(str(workspace / "data" / "train"))
    assert sdxl_train_network_cat.main(argv) == 2
    error = capsys.readouterr().err
    assert "2_sks teapot" in error and "shuffle_caption" in error


def test_clip_skip_is_warned_about_and_not_used(workspace, tmp_path, caplog):
    from library.cli.train_args import parse_args
    from library.config.training_script import SDXL_SCRIPT

    with caplog.at_level("WARNING"):
        parse_args(_argv(workspace, tmp_path / "out", "--clip_skip", "2"), SDXL_SCRIPT)
    assert "clip skip is not used" in caplog.text and "sdxl_train_network.py" in caplog.text


def test_samples_with_cached_text_encoder_outputs(workspace, tmp_path):
    # The encoders leave the training device after caching; a sample brings them back for its prompt.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks teapot --w 64 --h 64 --s 2\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "--network_train_unet_only", "--cache_text_encoder_outputs",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    assert sdxl_train_network_cat.main(argv) == 0
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1
