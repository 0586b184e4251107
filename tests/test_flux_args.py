"""flux_train_network_cat.py's command line: sd-scripts' FLUX flags reach the configuration, the other
scripts refuse them naming the FLUX script, and the DDPM-only flags are refused for FLUX."""

import pytest

from library.cli.train_args import parse_args
from library.config.training_script import FLUX_SCRIPT, SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.training.network_setup import import_network_module

BASE = ["--pretrained_model_name_or_path", "flux1-dev.safetensors", "--train_data_dir", "data", "--resolution", "64",
        "--output_dir", "out", "--cat_trigger", "sks"]


def test_flux_flags_reach_the_configuration():
    config = parse_args([*BASE, "--clip_l", "clip_l.safetensors", "--t5xxl", "t5xxl_fp16.safetensors", "--ae", "ae.safetensors",
                         "--guidance_scale", "1.0", "--t5xxl_max_token_length", "256", "--apply_t5_attn_mask",
                         "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
                         "--weighting_scheme", "logit_normal", "--logit_std", "0.5"], FLUX_SCRIPT)
    model, flow = config.model, config.flow
    assert (model.clip_l, model.t5xxl, model.ae) == ("clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors")
    assert model.guidance_scale == 1.0 and model.t5xxl_max_token_length == 256 and model.apply_t5_attn_mask
    assert (flow.timestep_sampling, flow.discrete_flow_shift, flow.model_prediction_type) == ("shift", 3.1582, "raw")
    assert flow.weighting_scheme == "logit_normal" and flow.logit_std == 0.5


def test_sd_scripts_defaults_for_flux():
    flow = parse_args(BASE, FLUX_SCRIPT).flow
    assert (flow.timestep_sampling, flow.model_prediction_type, flow.discrete_flow_shift) == ("sigma", "sigma_scaled", 3.0)
    assert parse_args(BASE, SD_SCRIPT).flow is None, "DDPM families have no flow-matching configuration"


@pytest.mark.parametrize("script", [SD_SCRIPT, SDXL_SCRIPT])
@pytest.mark.parametrize("extra", [["--clip_l", "clip_l.safetensors"], ["--guidance_scale", "1"],
                                   ["--timestep_sampling", "shift"], ["--apply_t5_attn_mask"]])
def test_other_scripts_refuse_flux_flags_naming_the_flux_script(script, extra):
    with pytest.raises(UserInputError, match=f"--{extra[0][2:]}.*FLUX.1 flag .*flux_train_network_cat.py"):
        parse_args([*BASE, *extra], script)


@pytest.mark.parametrize("extra, words", [
    (["--noise_offset", "0.1"], "noise_offset 0.1: does not apply to FLUX.1"),
    (["--min_snr_gamma", "5"], "min_snr_gamma 5: does not apply to FLUX.1 .*--weighting_scheme"),
    (["--v_parameterization"], "v_parameterization: does not apply"),
    (["--zero_terminal_snr"], "zero_terminal_snr: does not apply"),
    (["--max_timestep", "900"], "max_timestep 900: .*--timestep_sampling"),
    (["--model_type", "chroma"], "Chroma is not supported yet"),
    (["--blocks_to_swap", "18"], "block swapping is not implemented"),
    (["--split_mode"], "block swapping is not implemented"),
    (["--t5xxl_max_token_length", "0"], "positive number of T5 tokens"),
    (["--loss_type", "huber"], "huber_schedule snr with --loss_type huber.*--huber_schedule constant"),
    (["--v2"], "FLUX.1 has no 2.x variant"),
])
def test_flux_refuses_what_does_not_apply_with_a_sentence(extra, words):
    with pytest.raises(UserInputError, match=words):
        parse_args([*BASE, *extra], FLUX_SCRIPT)


def test_a_gui_s_zero_for_a_ddpm_flag_means_off():
    config = parse_args([*BASE, "--noise_offset", "0", "--min_snr_gamma", "0"], FLUX_SCRIPT)
    assert config.noise.noise_offset == 0


def test_huber_with_a_constant_schedule_is_accepted():
    config = parse_args([*BASE, "--loss_type", "huber", "--huber_schedule", "constant"], FLUX_SCRIPT)
    assert config.loss.loss_type == "huber"


def test_the_flux_network_module_name_guis_write_is_ours():
    import networks.lora_cat

    assert import_network_module("networks.lora_flux") is networks.lora_cat


def test_wildcard_captions_cannot_have_their_text_encoder_outputs_cached():
    with pytest.raises(UserInputError, match="--enable_wildcard"):
        parse_args([*BASE, "--enable_wildcard", "--cache_text_encoder_outputs", "--network_train_unet_only"], FLUX_SCRIPT)
