"""Each family's training script end to end on its tiny model, the same tests for every family:
files and metadata, diffusers reproduces the trained LoRA, resume is exact, gradient checkpointing
trains the same LoRA, samples and the drift signal run, and a GUI-style TOML trains. What only one
family has is tested beside (test_train_cli, test_sdxl_train_cli, test_flux_train_cli)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import flux_train_network_cat
import networks.lora_cat as lora_cat
import sdxl_train_network_cat
import train_network_cat
from library.families.sd.models import load_stable_diffusion
from library.families.sdxl.models import load_sdxl
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_tiny_flux, save_bfl_files
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file
from networks.lora_cat.file_format import read_lora_file


@dataclass(frozen=True)
class Family:
    """One family's script, tiny checkpoint and what its files must say."""

    main: Callable[[list[str]], int]
    build: Callable[[], Any]
    save: Callable[[Any, Path], Path]
    load: Callable[[Path], Any]
    config_dir: Path
    model_version: str
    architecture: str
    prefixes: tuple[str, ...]  # every prefix its files carry
    part_flags: tuple[str, ...] = ()  # flags naming the files beside the checkpoint (FLUX.1: --clip_l --t5xxl --ae)
    diffusers_loads_tiny: bool = True  # diffusers' converter fits the tiny model (not FLUX.1's: tests/test_flux_lora_file.py)


FLUX_PARTS = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors", "ae": "ae.safetensors"}


def _save_flux(models, path: Path) -> Path:
    """The four files of a FLUX.1 setup beside each other, the transformer (BFL layout) at `path`."""
    transformer, *_ = save_bfl_files(models, path.parent)
    return transformer.replace(path)


def _part_argv(family, root: Path) -> list[str]:
    return [item for flag in family.part_flags for item in (f"--{flag}", str(root / FLUX_PARTS[flag]))]


FAMILIES = {
    "sd1": Family(train_network_cat.main, lambda: build_tiny_sd(seed=0), save_single_file,
                  lambda p: load_stable_diffusion(p, model_config=tiny_config_dir(False)), tiny_config_dir(False),
                  "sd_v1", "stable-diffusion-v1/lora", ("lora_unet_down_blocks_", "lora_te_text_model_")),
    "sdxl": Family(sdxl_train_network_cat.main, lambda: build_tiny_sdxl(seed=0), save_sdxl_single_file,
                   lambda p: load_sdxl(p, model_config=TINY_SDXL_CONFIG), TINY_SDXL_CONFIG, "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base/lora",
                   ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                    "lora_te1_text_model_", "lora_te2_text_model_")),
    "flux": Family(flux_train_network_cat.main, lambda: build_tiny_flux(seed=0), _save_flux, None, TINY_FLUX_CONFIG,
                   "flux1", "flux-1-dev/lora",
                   ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_te1_text_model_"),
                   part_flags=("clip_l", "t5xxl", "ae"), diffusers_loads_tiny=False),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    family.save(family.build(), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    (root / "prompts.txt").write_text("a photo of sks teapot --n blurry --w 64 --h 64 --s 2 --d 7\n", encoding="utf-8")
    (root / "preservation.txt").write_text("a photo of a dog\na red car\n", encoding="utf-8")
    return family, root


def _argv(root: Path, family: Family, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(root / "tiny.safetensors"), "--model_config", str(family.config_dir),
        "--train_data_dir", str(root / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "1e-3", "--max_train_steps", "3", "--train_batch_size", "2", "--seed", "3",
        "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", *_part_argv(family, root), *extra,
    ]


def test_files_names_and_metadata(case, tmp_path):
    family, root = case
    assert family.main(_argv(root, family, tmp_path / "out", "--cat_weight", "0.5")) == 0
    tensors, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["ss_base_model_version"] == family.model_version
    assert metadata["modelspec.architecture"] == family.architecture
    assert metadata["ss_cat_weight"] == "0.5" and metadata["ss_steps"] == "3"
    for prefix in family.prefixes:
        assert any(name.startswith(prefix) for name in tensors), prefix
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_up" in k), "training moved the adapters"


def test_diffusers_reproduces_the_trained_lora(case, tmp_path):
    family, root = case
    if not family.diffusers_loads_tiny:
        pytest.skip("diffusers' FLUX LoRA converter needs FLUX.1's real width: tests/test_flux_lora_file.py")
    assert family.main(_argv(root, family, tmp_path / "out")) == 0
    path = tmp_path / "out" / "cat.safetensors"
    ours, theirs = family.load(root / "tiny.safetensors"), family.load(root / "tiny.safetensors")
    network, _ = lora_cat.create_network_from_weights(1.0, path, ours.vae, ours.network_text_encoder, ours.unet)
    network.apply_to(ours.network_text_encoder, ours.unet)
    network.load_weights(path)
    theirs.pipeline().load_lora_weights(str(path))
    ids = ours.tokenize(["a photo of sks teapot"])
    latents = torch.randn(ours.latent_shape(1, 64, 64), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300])

    def predict(models):
        denoiser = models.denoiser()
        return denoiser.predict(latents, t, denoiser.encode(ids))

    with torch.no_grad():
        adapted, loaded = predict(ours), predict(theirs)
        with network.adapters_off():
            base = predict(ours)
    assert (adapted - base).abs().max() > 1e-5, "the LoRA changes the prediction, or the test proves nothing"
    assert (adapted - loaded).abs().max() < 1e-4


def test_resume_equals_uninterrupted(case, tmp_path):
    family, root = case
    straight, first = tmp_path / "straight", tmp_path / "first"
    assert family.main(_argv(root, family, straight, "--max_train_steps", "4")) == 0
    assert family.main(_argv(root, family, first, "--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2",
                             "--output_name", "part")) == 0
    resumed = tmp_path / "resumed"
    assert family.main(_argv(root, family, resumed, "--max_train_steps", "4",
                             "--resume", str(first / "part-step00000002-state"))) == 0
    expected, _ = read_lora_file(straight / "cat.safetensors")
    got, _ = read_lora_file(resumed / "cat.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_gradient_checkpointing_trains_the_same_lora(case, tmp_path):
    family, root = case
    assert family.main(_argv(root, family, tmp_path / "plain")) == 0
    assert family.main(_argv(root, family, tmp_path / "ckpt", "--gradient_checkpointing")) == 0
    expected, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    got, _ = read_lora_file(tmp_path / "ckpt" / "cat.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_samples_and_drift_signal_run(case, tmp_path):
    family, root = case
    out = tmp_path / "out"
    argv = _argv(root, family, out, "--sample_prompts", str(root / "prompts.txt"), "--sample_every_n_steps", "3",
                 "--sample_cat_compare", "--preservation_prompts", str(root / "preservation.txt"),
                 "--preservation_every_n_steps", "3")
    assert family.main(argv) == 0
    (strip,) = sorted((out / "sample").iterdir())
    assert strip.name.startswith("cat_000003_00_") and strip.name.endswith("_7.png")
    image = Image.open(strip)  # --sample_cat_compare: base, LoRA without the trigger, LoRA with it
    assert image.size == (3 * 64, 64) and "trigger-free prompt: a photo of teapot" in image.text["cat_compare"]


def test_validation_runs_and_changes_nothing_in_training(case, tmp_path, monkeypatch):
    import library.training.validation as validation

    family, root = case
    rounds = []
    real_run = validation.Validation.run
    monkeypatch.setattr(validation.Validation, "run",
                        lambda self, kind, step, epoch, bar: rounds.append(real_run(self, kind, step, epoch, bar))
                        or rounds[-1])
    split = ("--validation_split", "0.5", "--cat_weight", "1")
    assert family.main(_argv(root, family, tmp_path / "busy", *split, "--validate_every_n_steps", "1")) == 0
    assert family.main(_argv(root, family, tmp_path / "quiet", *split, "--validate_every_n_epochs", "9")) == 0
    busy, _ = read_lora_file(tmp_path / "busy" / "cat.safetensors")
    quiet, _ = read_lora_file(tmp_path / "quiet" / "cat.safetensors")
    assert all(torch.equal(busy[k], quiet[k]) for k in busy)
    assert len(rounds) == 5  # 2 steps an epoch: steps 1, 2, the end of epoch 1, step 3, the end of the cut epoch 2
    assert all(r["loss/validation/cat"] > 0 and torch.isfinite(torch.tensor(list(r.values()))).all() for r in rounds[1:])
    assert rounds[0]["loss/validation/step_average"] != rounds[1]["loss/validation/step_average"]


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_cat_prompts_and_drift_budget_train(case, tmp_path, monkeypatch, mode):
    import library.training.trainer as trainer

    family, root = case
    seen = []
    real = trainer.cat_step

    def spy(denoiser, network, batch, alpha, *rest):
        losses = real(denoiser, network, batch, alpha, *rest)
        seen.append((alpha, len(batch.prompt_ids), losses.prompts))
        return losses

    monkeypatch.setattr(trainer, "cat_step", spy)
    argv = _argv(root, family, tmp_path / "out", "--cat_prompts", str(root / "preservation.txt"), "--cat_mode", mode,
                 "--cat_prompts_per_step", "2", "--cat_drift_budget", "1e-9")
    assert family.main(argv) == 0
    assert [count for _, count, _ in seen] == [2, 2, 2]
    assert seen[0][2] < 1e-9 and all(prompts > 1e-7 for _, _, prompts in seen[1:])  # a fresh LoRA is the base model
    assert seen[2][0] > seen[1][0]  # above the budget: alpha rises


def test_gui_style_config_file(case, tmp_path):
    family, root = case
    out = tmp_path / "out"
    toml = tmp_path / "gui.toml"
    toml.write_text(
        "[model]\n"
        f"pretrained_model_name_or_path = '{root / 'tiny.safetensors'}'\nmodel_config = '{family.config_dir}'\n"
        + "".join(f"{flag} = '{root / FLUX_PARTS[flag]}'\n" for flag in family.part_flags) +
        "[dataset]\n"
        f"train_data_dir = '{root / 'data' / 'train'}'\ncaption_extension = '.txt'\nresolution = '64,64'\n"
        "enable_bucket = true\nbucket_reso_steps = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
        "train_batch_size = 2\nmax_data_loader_n_workers = 0\nmax_token_length = 75\n"
        "[network]\nnetwork_module = 'networks.lora'\nnetwork_dim = 4\nnetwork_alpha = 2\n"
        "[optimizer]\noptimizer_type = 'AdamW'\nlearning_rate = 0.001\nunet_lr = 0.001\n"
        "text_encoder_lr = [0.0005, 0.0005]\nlr_scheduler = 'constant'\n"
        "[training]\nmax_train_steps = 2\nseed = 1\nmixed_precision = 'no'\nsave_precision = 'fp16'\n"
        f"[output]\noutput_dir = '{out}'\noutput_name = 'gui'\n[cat]\ncat_trigger = ['sks']\n",
        encoding="utf-8",
    )
    assert family.main(["--config_file", str(toml)]) == 0
    tensors, metadata = read_lora_file(out / "gui.safetensors")
    assert metadata["ss_base_model_version"] == family.model_version
    assert all(t.dtype == torch.float16 for t in tensors.values())
