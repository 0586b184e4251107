"""Training details a user never sees but pays for: which passes build graphs, where autocast is on,
and each data-parallel process's own noise stream."""

import pytest
import torch
from accelerate import Accelerator

import library.training.network_guard as network_guard
import library.training.trainer as trainer
import train_network_cat
from library.families.sd.denoiser import SDDenoiser
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("details")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", *extra,
    ]


@pytest.mark.parametrize("unet_only", [True, False], ids=["unet-only", "with-text-encoder"])
def test_a_frozen_text_encoder_builds_no_graph_under_checkpointing(workspace, tmp_path, monkeypatch, unet_only):
    graphs, probing = [], []
    encode, probe = SDDenoiser.encode, network_guard._prediction

    def recording(self, input_ids):
        states = encode(self, input_ids)
        if not probing:  # the network guard's start-up probe is no training step
            graphs.append(states.requires_grad)
        return states

    def guard_prediction(*args):
        probing.append(True)
        try:
            return probe(*args)
        finally:
            probing.pop()

    monkeypatch.setattr(SDDenoiser, "encode", recording)
    monkeypatch.setattr(network_guard, "_prediction", guard_prediction)
    extra = ("--gradient_checkpointing",) + (("--network_train_unet_only",) if unet_only else ())
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", *extra)) == 0
    # Every step encodes the reference (no grad) and two adapted captions.
    assert len(graphs) == 6 and graphs[0::3] == [False, False]
    adapted = graphs[1::3] + graphs[2::3]
    assert adapted == ([False] * 4 if unet_only else [True] * 4)


def test_backward_runs_outside_autocast(workspace, tmp_path, monkeypatch):
    forward, backward = [], []
    predict, real_backward = SDDenoiser.predict, Accelerator.backward

    def recording_predict(self, *args):
        forward.append(torch.is_autocast_enabled("cpu"))
        return predict(self, *args)

    def recording_backward(self, loss, **kwargs):
        backward.append(torch.is_autocast_enabled("cpu"))
        return real_backward(self, loss, **kwargs)

    monkeypatch.setattr(SDDenoiser, "predict", recording_predict)
    monkeypatch.setattr(Accelerator, "backward", recording_backward)
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", "--mixed_precision", "bf16")) == 0
    assert forward and all(forward), "the forward passes run under bf16 autocast"
    assert len(backward) == 4 and not any(backward), "no backward pass runs under autocast"


def test_each_process_has_its_own_noise_stream():
    assert trainer.process_seed(7, 0) == 7, "one process trains exactly as before"
    seeds = {trainer.process_seed(7, rank) for rank in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**64 for s in seeds)
    draws = [torch.randn(4, generator=torch.Generator().manual_seed(trainer.process_seed(7, r))) for r in (0, 1)]
    assert not torch.equal(*draws)
