"""fp16 loss scaling: an overflow of the scaled gradients is the scaler's signal to skip a step and
halve its scale, not a divergence. Tested on CPU with torch's own GradScaler for "cpu", put where
accelerate puts its CUDA scaler, and one overflow forced at a chosen optimizer step."""

import logging

import pytest
import torch
from accelerate import Accelerator

import library.training.trainer as trainer
import train_network_cat
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from networks.lora_cat.file_format import read_lora_file

INIT_SCALE = 2.0**10


class CPUScalerAccelerator(Accelerator):
    """accelerate's fp16 set-up as on a GPU (native AMP with a GradScaler), on the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_amp = True
        self.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


@pytest.fixture
def overflow_at(monkeypatch):
    """Use the CPU scaler; make the gradients of optimizer step `step` (1-based) infinite, as an
    overflowing fp16 backward leaves them. Returns the list of scales seen after each step."""
    monkeypatch.setattr(trainer, "Accelerator", CPUScalerAccelerator)
    average = trainer.average_gradients
    calls = {"n": 0}

    def overflowing(params, processes, step: int):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == step:
            params[0].grad.view(-1)[0] = float("inf")
        return average(params, processes)

    def arm(step: int, start: int = 0):
        calls["n"] = start
        monkeypatch.setattr(trainer, "average_gradients", lambda p, n: overflowing(p, n, step))

    return arm


def _argv(workspace, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--max_train_steps", "5", "--train_batch_size", "2", "--seed", "3",
        "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", "--mixed_precision", "fp16",
        "--max_grad_norm", "1.0", *extra,
    ]


def test_an_overflow_skips_its_step_and_halves_the_scale(workspace, tmp_path, overflow_at, monkeypatch, caplog):
    scales = []
    step = trainer.Accelerator.backward

    def recording_backward(self, loss, **kwargs):
        scales.append(self.scaler.get_scale())
        return step(self, loss, **kwargs)

    monkeypatch.setattr(CPUScalerAccelerator, "backward", recording_backward)
    overflow_at(3)
    with caplog.at_level(logging.INFO, logger="library.training.trainer"):
        assert train_network_cat.main(_argv(workspace, tmp_path / "out", "--save_every_n_steps", "1")) == 0
    # sequential CAT: two backward passes per step; the scale drops once, after step 3.
    per_step = scales[0::2]
    assert per_step == [INIT_SCALE] * 3 + [INIT_SCALE / 2] * 2
    assert any("step 3: fp16 gradients overflowed" in record.message for record in caplog.records)
    files = {i: read_lora_file(tmp_path / "out" / f"cat-step0000000{i}.safetensors")[0] for i in (2, 3, 4)}
    assert all(torch.equal(files[2][k], files[3][k]) for k in files[2]), "the skipped step left the LoRA unchanged"
    assert any(not torch.equal(files[3][k], files[4][k]) for k in files[3]), "the next step trained again"


@pytest.mark.parametrize("clipping", [("--max_grad_norm", "1.0"), ("--max_grad_norm", "0")])
def test_without_a_scaler_infinite_gradients_still_stop_the_run(workspace, tmp_path, monkeypatch, capsys, clipping):
    # With clipping, the check reads the clipping's norm; without, the largest |gradient|.
    average = trainer.average_gradients

    def overflowing(params, processes):
        params = list(params)
        params[0].grad.view(-1)[0] = float("inf")
        return average(params, processes)

    monkeypatch.setattr(trainer, "average_gradients", overflowing)
    argv = _argv(workspace, tmp_path / "out", "--mixed_precision", "no", *clipping)
    assert train_network_cat.main(argv) == 1
    assert "gradients became NaN or infinite" in capsys.readouterr().err


def test_resume_is_exact_across_a_skipped_step(workspace, tmp_path, overflow_at):
    # The overflow comes before the saved point: the state must carry the lowered scale and the lr
    # schedule that waited one step (a warm-up makes every position of the schedule visible).
    schedule = ("--lr_scheduler", "linear", "--lr_warmup_steps", "2")
    overflow_at(2)
    assert train_network_cat.main(_argv(workspace, tmp_path / "full", *schedule)) == 0
    overflow_at(2)
    saving = _argv(workspace, tmp_path / "saving", *schedule, "--save_state", "--save_every_n_steps", "3")
    assert train_network_cat.main(saving) == 0
    state = tmp_path / "saving" / "cat-step00000003-state"
    assert torch.load(state / "grad_scaler.pt")["scale"] == INIT_SCALE / 2
    overflow_at(0)  # no overflow after the resumed point
    assert train_network_cat.main(_argv(workspace, tmp_path / "resumed", *schedule, "--resume", str(state))) == 0
    full, _ = read_lora_file(tmp_path / "full" / "cat.safetensors")
    resumed, _ = read_lora_file(tmp_path / "resumed" / "cat.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_lr_schedule_waits_for_a_real_update(workspace, tmp_path, overflow_at, monkeypatch):
    rates = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    overflow_at(2)
    argv = _argv(workspace, tmp_path / "out", "--lr_scheduler", "linear", "--lr_warmup_steps", "4", "--optimizer_type", "AdamW")
    assert train_network_cat.main(argv) == 0
    # Step 2 is skipped (the optimizer never runs), so the warm-up resumes where it stopped.
    assert rates == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
