"""LyCORIS presets and arguments that do not fit diffusers' U-Net are refused with a sentence naming the
value and a preset that works, never a bare traceback; the preset lists match the installed LyCORIS."""


import pytest
import torch
from lycoris.config import PRESET

import train_network_cat
from library.cli.train_args import parse_args
from library.errors import UserInputError
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.training.network_errors import (
    LYCORIS_DUPLICATING_PRESETS,
    LYCORIS_NO_UNET_PRESETS,
    LYCORIS_WORKING_PRESETS,
)
from library.training.network_setup import build_network

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("lycoris_preset_state")  # conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, *network_args):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(workspace / "out"),
        "--network_dim", "4", "--network_alpha", "2", "--max_train_steps", "1", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", "--network_module", "lycoris.kohya", "--network_args", *network_args,
    ]


def _build(workspace, *network_args, extra=()):
    return build_network(parse_args(_argv(workspace, *network_args) + list(extra)), build_tiny_sd(seed=0), CPU)


def test_every_lycoris_preset_is_classified():
    """A new preset in a newer LyCORIS fails here until it is measured and put in one list."""
    lists = (*LYCORIS_DUPLICATING_PRESETS, *LYCORIS_NO_UNET_PRESETS, *LYCORIS_WORKING_PRESETS)
    assert sorted(lists) == sorted(PRESET)


@pytest.mark.parametrize("preset", [None, *LYCORIS_DUPLICATING_PRESETS])
def test_presets_that_build_a_layer_twice_are_refused(workspace, preset):
    args = ["algo=locon"] + ([f"preset={preset}"] if preset else [])
    with pytest.raises(UserInputError) as refused:
        _build(workspace, *args)
    message = str(refused.value)
    named = preset or "full"
    assert message.startswith(f"--network_module lycoris.kohya --network_args {' '.join(args)}: preset={named}"
                              + (" (LyCORIS' default)" if preset is None else "") + " does not fit diffusers' U-Net")
    assert "builds the layer lora_unet_time_embedding_linear_1 twice" in message
    assert "The presets full, full-lin and unet-only all do this here" in message
    assert "--network_args preset=attn-mlp" in message


@pytest.mark.parametrize("preset, algo", [("attn-only", "locon"), ("ia3", "ia3"), ("ia3", "loha")])
def test_presets_that_adapt_no_unet_layer_are_refused(workspace, preset, algo):
    with pytest.raises(UserInputError, match=rf"^--network_module lycoris.kohya --network_args algo={algo} "
                                             rf"preset={preset}: preset={preset} adapts no layer of diffusers' U-Net "
                                             r"\(the presets attn-only and ia3 match nothing there\); use "
                                             r"--network_args preset=attn-mlp"):
        _build(workspace, f"algo={algo}", f"preset={preset}")


@pytest.mark.parametrize("preset, algo", [*((preset, "locon") for preset in LYCORIS_WORKING_PRESETS),
                                          ("unet-convblock-only", "loha"), ("unet-convblock-only", "lokr")])
def test_presets_that_fit_build_and_pass_the_guard(workspace, preset, algo):
    network = _build(workspace, f"algo={algo}", f"preset={preset}")
    assert network.unet_loras and sum(p.numel() for p in network.parameters()) > 0


def test_preset_file_with_the_full_targets_trains(workspace, tmp_path):
    """The README's preset file: what `full` means, without naming the time embedding twice."""
    path = tmp_path / "sd_full.toml"
    path.write_text(
        'enable_conv = true\n'
        'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
        'unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\n'
        'text_encoder_target_name = []\n'
    )
    network = _build(workspace, "algo=lokr", f"preset={path}")
    names = {lora.lora_name for lora in network.unet_loras}
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_resnets_0_conv1",
            "lora_unet_down_blocks_0_attentions_0_proj_in"} <= names
    assert network.text_encoder_loras


def test_text_encoder_only_with_attn_only_is_allowed(workspace):
    network = _build(workspace, "algo=locon", "preset=attn-only", extra=["--network_train_text_encoder_only"])
    assert network.text_encoder_loras and not network.unet_loras


def test_a_network_with_nothing_to_train_is_refused(workspace):
    with pytest.raises(UserInputError, match=r"algo=ia3 preset=ia3: the network adapts no layer of this model, so "
                                             r"there is nothing to train; choose targets that exist in it"):
        _build(workspace, "algo=ia3", "preset=ia3", extra=["--network_train_text_encoder_only"])


@pytest.mark.parametrize("args, sentence", [
    (["preset=no-such-preset"],
     r"preset=no-such-preset is neither one of LyCORIS' presets \(attn-mlp, .*\) nor a preset \.toml file it could read"),
    (["algo=lorra", "preset=attn-mlp"], r"algo=lorra is not a LyCORIS algorithm; use one of .*locon.*"),
    (["algo=locon", "preset=attn-mlp", "conv_dim=four"],
     r"the network module refused these arguments \(invalid literal for int\(\) with base 10: 'four'\)"),
])
def test_bad_values_get_a_sentence(workspace, args, sentence):
    with pytest.raises(UserInputError, match=rf"^--network_module lycoris.kohya --network_args {' '.join(args)}: "
                                             + sentence):
        _build(workspace, *args)


def test_cli_says_it_in_one_sentence(workspace, capsys):
    assert train_network_cat.main(_argv(workspace, "algo=locon")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --network_module lycoris.kohya --network_args algo=locon: preset=full "
                          "(LyCORIS' default) does not fit diffusers' U-Net")
    assert "Traceback" not in err and "AssertionError" not in err
