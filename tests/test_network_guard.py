"""The multiplier-0 guard (`library.training.network_guard`): a `--network_module` whose "off" is not
the base model is refused with a sentence, ours passes bitwise, and the guard changes nothing."""

import copy
import random
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from library.cli.train_args import parse_args
from library.errors import UserInputError
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.training.network_guard import OffProbe
from library.training.network_setup import build_network
from networks import lora_cat

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


def _config(workspace, *extra):
    return parse_args([
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(workspace / "out"),
        "--network_dim", "4", "--network_alpha", "2", "--max_train_steps", "1", "--cat_trigger", "sks", *extra,
    ])


# --- a stub network module whose multiplier-0 path is not the base model ------------------------


class _OffsetAdapter(nn.Module):
    """Wraps one Linear; at multiplier 0 it still adds `offset` (plus `constant`): a DoRA-like leak.
    `offset` starts at zero, so a fresh network is the base model and only a perturbed one shows it."""

    def __init__(self, layer: nn.Linear, constant: float) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(layer.out_features))
        self.scale = nn.Parameter(torch.zeros(()))
        self.constant, self.multiplier, self.layer = constant, 1.0, [layer]

    def apply_to(self) -> None:
        self.org_forward = self.layer[0].forward
        self.layer[0].forward = self.forward

    def forward(self, x):
        out = self.org_forward(x)
        if self.multiplier == 0:
            return out + self.offset + self.constant
        return out * (1 + self.multiplier * self.scale) + self.offset


class _StubNetwork(nn.Module):
    def __init__(self, unet, constant: float) -> None:
        super().__init__()
        self.adapter = _OffsetAdapter(unet.time_embedding.linear_1, constant)
        self.multiplier = 1.0

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        self.adapter.apply_to()

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def set_multiplier(self, multiplier):
        self.multiplier = self.adapter.multiplier = multiplier


def _stub_module(constant: float = 0.0, with_multiplier: bool = True) -> types.ModuleType:
    module = types.ModuleType("stub_offset_network")

    def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
        network = _StubNetwork(unet, constant)
        if not with_multiplier:
            network.set_multiplier = None
        return network

    module.create_network = create_network
    return module


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", [0.0, 1e-2], ids=["offset_parameter", "constant"])
def test_a_network_whose_off_adds_something_is_refused(workspace, monkeypatch, constant):
    monkeypatch.setitem(sys.modules, "stub_offset_network", _stub_module(constant))
    config = _config(workspace, "--network_module", "stub_offset_network", "--network_args", "rank=3")
    with pytest.raises(UserInputError) as refused:
        build_network(config, build_tiny_sd(seed=0), CPU)
    message = str(refused.value)
    assert message.startswith("--network_module stub_offset_network --network_args rank=3: at multiplier 0 "
                              "this network is not the base model (max |off - base| = ")
    assert "networks.lora_cat" in message and "dora_wd" not in message.split("Use a network")[0]
    measured = float(message.split("max |off - base| = ")[1].split(" ")[0])
    assert measured > 1e-3


def test_the_perturbation_is_what_catches_a_zero_initialised_leak(workspace, monkeypatch):
    """Without random adapter values the stub's zero offset would pass: the guard must not rely on it."""
    models = build_tiny_sd(seed=0)
    probe = OffProbe.of_bare_model(models, CPU)
    network = _stub_module().create_network(1.0, 4, 2, models.vae, models.text_encoder, models.unet)
    network.apply_to(models.text_encoder, models.unet)
    with torch.no_grad():
        network.set_multiplier(0.0)
        unperturbed = models.denoiser().predict(probe.latents, probe.timesteps,
                                                models.denoiser().encode(probe.input_ids))
        network.set_multiplier(1.0)
    assert torch.equal(unperturbed, probe.bare)
    assert probe.off_difference(network) > 1e-3


def test_a_network_without_a_multiplier_switch_is_refused(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "stub_offset_network", _stub_module(with_multiplier=False))
    config = _config(workspace, "--network_module", "stub_offset_network")
    with pytest.raises(UserInputError, match=r"^--network_module stub_offset_network: the network has no "
                                             r"multiplier switch .*set_multiplier"):
        build_network(config, build_tiny_sd(seed=0), CPU)


# --- passes, and leaves everything as it was ---------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--network_args", "conv_dim=4", "conv_alpha=2"],
                                  ["--network_args", "dropout=0.1", "rank_dropout=0.2", "module_dropout=0.1"]])
def test_ours_is_the_base_model_bitwise_at_multiplier_0(workspace, args):
    models = build_tiny_sd(seed=0)
    probe = OffProbe.of_bare_model(models, CPU)
    config = _config(workspace, *args)
    network = build_network(config, models, CPU)
    assert probe.check(network, "ours") == 0.0


def test_the_guard_changes_nothing(workspace):
    """Random streams, parameters and buffers, train/eval flags and the multiplier are as before."""
    models = build_tiny_sd(seed=0)
    probe = OffProbe.of_bare_model(models, CPU)
    network = lora_cat.create_network(1.0, 4, 2, models.vae, models.text_encoder, models.unet,
                                      dropout="0.1", conv_dim="4")
    network.apply_to(models.text_encoder, models.unet)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.01)  # not the zero init, so a restore to zeros would show
    network.set_multiplier(0.7)
    network.train()
    models.unet.train()
    parameters = list(network.parameters())
    state = copy.deepcopy(network.state_dict())
    modes = [m.training for part in (network, models.unet, models.text_encoder) for m in part.modules()]
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    streams = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    assert probe.check(network, "ours") == 0.0

    assert torch.equal(torch.get_rng_state(), streams[0]) and random.getstate() == streams[1]
    assert np.array_equal(np.random.get_state()[1], streams[2])
    assert all(a is b for a, b in zip(network.parameters(), parameters))
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())
    assert modes == [m.training for part in (network, models.unet, models.text_encoder) for m in part.modules()]
    assert network.multiplier == 0.7

