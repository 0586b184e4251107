"""Block-wise U-Net learning rates with sd-scripts' block numbering, presets and zero threshold."""

from __future__ import annotations

import logging
import math

import pytest

from networks.lora_cat.block_lr import (
    BlockLrWeights,
    fits_sd_layout,
    parse_block_weights,
    parse_mid_weight,
    preset_curve,
    unet_block_index,
)
from library.errors import UserInputError


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 1),
        ("lora_unet_down_blocks_0_resnets_1_conv1", 2),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 4),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", 9),
        ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
        ("lora_unet_mid_block_attentions_0_proj_in", 12),
        ("lora_unet_mid_block_resnets_1_time_emb_proj", 12),
        ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
        ("lora_unet_up_blocks_2_resnets_1_conv1", 20),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", 24),
    ],
)
def test_unet_block_index_of_representative_names(name: str, index: int) -> None:
    assert unet_block_index(name) == index


@pytest.mark.parametrize(
    "name",
    [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_encoder_layers_11_mlp_fc1",
        "lora_unet_conv_in",
        "lora_unet_time_embedding_linear_1",
        "down_blocks_0_attentions_0_proj_in",  # no lora_unet_ prefix
    ],
)
def test_names_outside_the_unet_blocks_have_no_index(name: str) -> None:
    assert unet_block_index(name) is None


def test_small_unet_uses_sd_block_numbers_from_the_name() -> None:
    """Two levels, one layer per down level: down 1, 3 (downsampler), 4; up 13, 14, 15, 16, 17."""
    names = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": 1,
        "lora_unet_down_blocks_0_downsamplers_0_conv": 3,
        "lora_unet_down_blocks_1_attentions_0_proj_in": 4,
        "lora_unet_up_blocks_0_resnets_1_conv1": 14,
        "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
        "lora_unet_up_blocks_1_attentions_1_proj_out": 17,
    }
    assert {name: unet_block_index(name) for name in names} == names
    assert all(fits_sd_layout(name) for name in names)


def test_presets_follow_sd_scripts_curves() -> None:
    x = [i / 11 for i in range(12)]
    assert preset_curve("sine") == pytest.approx([math.sin(math.pi * v / 2) for v in x])
    assert preset_curve("cosine") == pytest.approx([math.cos(math.pi * v / 2) for v in x], abs=1e-12)
    assert preset_curve("linear") == pytest.approx(x)
    assert preset_curve("reverse_linear") == pytest.approx(x[::-1])
    assert preset_curve("zeros") == [0.0] * 12
    assert preset_curve("sine")[0] == 0.0 and preset_curve("sine")[-1] == 1.0
    assert preset_curve("cosine")[0] == 1.0 and preset_curve("cosine")[-1] == 0.0


def test_preset_with_offset_adds_to_every_entry() -> None:
    assert parse_block_weights("zeros+0.5", key="down_lr_weight") == [0.5] * 12
    assert parse_block_weights("linear+1", key="up_lr_weight") == pytest.approx([1 + i / 11 for i in range(12)])


def test_list_of_twelve_is_kept_and_empty_entries_are_zero() -> None:
    value = "1,,0.5" + ",1" * 9
    assert parse_block_weights(value, key="down_lr_weight") == [1.0, 0.0, 0.5] + [1.0] * 9


def test_short_list_is_padded_with_ones_and_long_list_truncated(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="networks.lora_cat.block_lr"):
        assert parse_block_weights("0.5,0.25", key="down_lr_weight") == [0.5, 0.25] + [1.0] * 10
        assert parse_block_weights(",".join(["0.5"] * 14), key="up_lr_weight") == [0.5] * 12
    assert "down_lr_weight" in caplog.text and "up_lr_weight" in caplog.text


def test_num_blocks_sets_the_length() -> None:
    assert parse_block_weights("linear", key="down_lr_weight", num_blocks=3) == [0.0, 0.5, 1.0]
    assert parse_block_weights("2,3", key="down_lr_weight", num_blocks=3) == [2.0, 3.0, 1.0]


@pytest.mark.parametrize("value", [None, "", "  ", "None"])
def test_unset_values_give_none(value) -> None:
    assert parse_block_weights(value, key="down_lr_weight") is None
    assert parse_mid_weight(value, key="mid_lr_weight") is None


@pytest.mark.parametrize(
    "value", ["1,2,x", "sinus", "0.5", "cosine+", "cosine+abc", "1,nan,1", "1,inf"]
)
def test_bad_block_weights_name_key_and_value(value: str) -> None:
    with pytest.raises(UserInputError) as error:
        parse_block_weights(value, key="down_lr_weight")
    assert f"down_lr_weight={value!r}" in str(error.value)
    assert "preset" in str(error.value)


def test_mid_weight_takes_the_first_entry(caplog) -> None:
    assert parse_mid_weight("0.5", key="mid_lr_weight") == 0.5
    with caplog.at_level(logging.WARNING, logger="networks.lora_cat.block_lr"):
        assert parse_mid_weight("0.25,2", key="mid_lr_weight") == 0.25
    assert "mid_lr_weight" in caplog.text


@pytest.mark.parametrize("value", ["cosine", "half", "1,x"])
def test_bad_mid_weight_names_key_and_value(value: str) -> None:
    with pytest.raises(UserInputError, match=f"mid_lr_weight={value!r}"):
        parse_mid_weight(value, key="mid_lr_weight")


def test_no_weights_given_means_no_block_lr() -> None:
    assert BlockLrWeights.from_network_args({}) is None
    assert BlockLrWeights.from_network_args({"block_lr_zero_threshold": "0.1", "conv_dim": "4"}) is None


def test_weight_for_uses_the_block_and_leaves_other_groups_at_one() -> None:
    weights = BlockLrWeights.from_network_args({"mid_lr_weight": "0.5"})
    assert weights is not None
    assert weights.weight_for("lora_unet_mid_block_attentions_0_proj_in") == 0.5
    assert weights.weight_for("lora_unet_down_blocks_1_attentions_0_proj_in") == 1.0
    assert weights.weight_for("lora_unet_up_blocks_3_attentions_2_proj_out") == 1.0
    assert weights.weight_for("lora_te_text_model_encoder_layers_0_mlp_fc1") == 1.0
    assert weights.block_index("lora_unet_mid_block_attentions_0_proj_in") == 12
    assert weights.block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") is None


def test_weight_for_indexes_down_and_up_lists() -> None:
    down = ",".join(str(i / 10) for i in range(12))  # 0.0, 0.1, ..., 1.1
    up = ",".join(str(2 + i) for i in range(12))  # 2, 3, ..., 13
    weights = BlockLrWeights.from_network_args({"down_lr_weight": down, "up_lr_weight": up})
    assert weights.weight_for("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == 0.4
    assert weights.weight_for("lora_unet_down_blocks_0_downsamplers_0_conv") == 0.3
    assert weights.weight_for("lora_unet_up_blocks_2_resnets_1_conv1") == 9.0
    assert weights.weight_for("lora_unet_up_blocks_0_upsamplers_0_conv") == 4.0
    assert weights.weight_for("lora_unet_mid_block_attentions_0_proj_in") == 1.0


def test_zero_threshold_zeroes_given_weights_at_or_below_it_and_skips_those_modules() -> None:
    weights = BlockLrWeights.from_network_args(
        {"down_lr_weight": "1,1,0.1,0.2" + ",1" * 8, "up_lr_weight": "-1" + ",1" * 11, "block_lr_zero_threshold": "0.1"}
    )
    assert weights.zero_threshold == 0.1
    assert weights.weight_for("lora_unet_down_blocks_0_resnets_1_conv1") == 0.0  # 0.1 is not > 0.1
    assert weights.weight_for("lora_unet_down_blocks_0_downsamplers_0_conv") == 0.2
    assert weights.is_zero("lora_unet_down_blocks_0_resnets_1_conv1")
    assert not weights.is_zero("lora_unet_down_blocks_0_downsamplers_0_conv")
    assert weights.weight_for("lora_unet_up_blocks_0_resnets_0_conv1") == 0.0  # negative -> 0
    assert weights.weight_for("lora_unet_mid_block_resnets_0_conv1") == 1.0  # not given: threshold not applied


def test_default_threshold_zeroes_negative_and_zero_weights_only() -> None:
    weights = BlockLrWeights(down=(1.0, 0.0, -0.5) + (0.01,) * 9)
    assert weights.block_weights()[:4] == (1.0, 0.0, 0.0, 0.01)
    assert len(weights.block_weights()) == 25


def test_sine_preset_removes_nothing_real_but_lowers_the_shallow_down_blocks() -> None:
    weights = BlockLrWeights.from_network_args({"down_lr_weight": "sine"})
    assert weights.weight_for("lora_unet_down_blocks_0_attentions_0_proj_in") == pytest.approx(math.sin(math.pi / 22))
    assert weights.weight_for("lora_unet_down_blocks_3_resnets_1_conv1") == 1.0


def test_bad_zero_threshold_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="block_lr_zero_threshold='low'"):
        BlockLrWeights.from_network_args({"up_lr_weight": "cosine", "block_lr_zero_threshold": "low"})


def test_layers_with_no_sd_block_are_refused_when_block_lr_is_on() -> None:
    weights = BlockLrWeights.from_network_args({"up_lr_weight": "cosine"})
    for name in ("lora_unet_down_blocks_0_resnets_2_conv1", "lora_unet_down_blocks_4_resnets_0_conv1",
                 "lora_unet_up_blocks_1_resnets_3_conv1"):
        assert not fits_sd_layout(name)
        with pytest.raises(UserInputError, match=name):
            weights.weight_for(name)


def test_direct_construction_checks_lengths() -> None:
    with pytest.raises(ValueError, match="12 entries"):
        BlockLrWeights(up=(1.0, 1.0))
