"""`flux_train_network_cat.py` on the tiny FLUX.1 model: what only FLUX.1 has (flow matching, the
guidance input, text-encoder caching with T5, schnell) and its refusals; the shared end-to-end
tests are tests/test_family_cli.py's."""

from __future__ import annotations

import pytest
import torch

import flux_train_network_cat
from library.families.flux.denoiser import FluxDenoiser
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_tiny_flux, save_bfl_files
from library.testing.tiny_sdxl import build_tiny_sdxl, save_sdxl_single_file
from library.training import flow_matching
from networks.lora_cat.file_format import read_lora_file


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    save_bfl_files(build_tiny_flux(seed=0), root)
    (root / "schnell").mkdir()
    save_bfl_files(build_tiny_flux(seed=0, guidance=False), root / "schnell")
    save_sdxl_single_file(build_tiny_sdxl(seed=0), root / "tiny_sdxl.safetensors")
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, out, *extra, model="flux1-dev.safetensors", parts=None):
    parts = parts or workspace
    return [
        "--pretrained_model_name_or_path", str(parts / model), "--clip_l", str(parts / "clip_l.safetensors"),
        "--t5xxl", str(parts / "t5xxl.safetensors"), "--ae", str(parts / "ae.safetensors"),
        "--model_config", str(TINY_FLUX_CONFIG), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "cat",
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", "--model_prediction_type", "raw", *extra,
    ]


def _recording_predictions(monkeypatch) -> list:
    seen = []
    predict = FluxDenoiser.predict

    def recording(self, noisy_latents, timesteps, text_states, guidance=None):
        seen.append((timesteps.tolist(), None if guidance is None else guidance.tolist()))
        return predict(self, noisy_latents, timesteps, text_states, guidance)

    monkeypatch.setattr(FluxDenoiser, "predict", recording)
    return seen


def test_every_prediction_of_a_step_shares_sigma_and_the_guidance(workspace, tmp_path, monkeypatch):
    seen = _recording_predictions(monkeypatch)
    assert flux_train_network_cat.main(_argv(workspace, tmp_path / "out", "--guidance_scale", "2.5",
                                             "--timestep_sampling", "shift")) == 0
    steps = [seen[i : i + 3] for i in range(2, len(seen), 3)]  # after the network guard's two probe passes
    assert len(steps) == 2
    for reference, adapted, free in steps:  # sequential CAT: reference, trigger pass, trigger-free pass
        assert reference == adapted == free and reference[1] == [2.5, 2.5]
        assert all(0 < t <= 1000 for t in reference[0]), "timesteps are 1000 * sigma"
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["ss_guidance_scale"] == "2.5" and metadata["ss_timestep_sampling"] == "shift"
    assert metadata["ss_model_prediction_type"] == "raw" and metadata["ss_base_model_version"] == "flux1"


def test_the_main_loss_moves_the_output_by_model_prediction_type(workspace, tmp_path, monkeypatch):
    seen = []
    moved = flow_matching.in_target_space
    monkeypatch.setattr(flow_matching, "in_target_space",
                        lambda prediction, noisy, sigmas, kind: seen.append(kind) or moved(prediction, noisy, sigmas, kind))
    argv = _argv(workspace, tmp_path / "out", "--model_prediction_type", "sigma_scaled", "--weighting_scheme", "sigma_sqrt")
    assert flux_train_network_cat.main(argv) == 0
    assert seen == ["sigma_scaled"] * 2, "one main term per step, in sd-scripts' sigma_scaled space"


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_cached_text_encoder_outputs_train_the_same_lora(workspace, tmp_path, mode):
    base = ("--network_train_unet_only", "--cat_mode", mode, "--optimizer_type", "SGDNesterov", "--learning_rate", "1.0",
            "--apply_t5_attn_mask")
    assert flux_train_network_cat.main(_argv(workspace, tmp_path / "plain", *base)) == 0
    assert flux_train_network_cat.main(_argv(workspace, tmp_path / "cached", *base, "--cache_text_encoder_outputs")) == 0
    expected, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    got, _ = read_lora_file(tmp_path / "cached" / "cat.safetensors")
    assert expected.keys() == got.keys() and not any(name.startswith("lora_te") for name in got)
    assert any(expected[name].abs().max() > 1e-4 for name in expected if "lora_up" in name), "training moved the LoRA"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_schnell_trains_without_a_guidance_input(workspace, tmp_path, monkeypatch):
    seen = _recording_predictions(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", model="flux1-schnell.safetensors", parts=workspace / "schnell")
    assert flux_train_network_cat.main(argv) == 0
    assert all(guidance is None for _, guidance in seen[2:])
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"


def test_t5_adapters_train_when_asked(workspace, tmp_path):
    assert flux_train_network_cat.main(_argv(workspace, tmp_path / "out", "--network_args", "train_t5xxl=True")) == 0
    tensors, _ = read_lora_file(tmp_path / "out" / "cat.safetensors")
    t5_up = [v for k, v in tensors.items() if k.startswith("lora_te3_") and "lora_up" in k]
    assert t5_up and any(v.abs().max() > 0 for v in t5_up)


@pytest.mark.parametrize("change, message", [
    (lambda argv, ws: _replace(argv, "--pretrained_model_name_or_path", str(ws / "tiny_sdxl.safetensors")),
     "sdxl_train_network_cat.py"),
    (lambda argv, ws: _drop(argv, "--ae"), "--ae"),
    (lambda argv, ws: _replace(argv, "--t5xxl", str(ws / "clip_l.safetensors")), "is not a T5-XXL encoder"),
    (lambda argv, ws: argv + ["--noise_offset", "0.05"], "does not apply to FLUX.1"),
    (lambda argv, ws: argv + ["--cache_text_encoder_outputs"], "needs --network_train_unet_only"),
])
def test_mistakes_are_refused_with_a_sentence_and_keep_files(workspace, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.safetensors").write_bytes(b"keep me")
    assert flux_train_network_cat.main(change(_argv(workspace, out), workspace)) == 2
    assert message in capsys.readouterr().err
    assert (out / "earlier.safetensors").read_bytes() == b"keep me"


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _drop(argv: list[str], flag: str) -> list[str]:
    index = argv.index(flag)
    return argv[:index] + argv[index + 2:]
