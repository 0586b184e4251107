"""The adapter on small layers: the LoRA math and `LoRAModule`'s switching, merging and gradients."""

import pytest
import torch
from torch import nn

from networks.lora_cat.layer import LoRAModule
from networks.lora_cat.lora_math import delta_weight, lora_scale, max_norm_ratio, rank_dropout_mask

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
}


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 5, layer.in_features)
    return torch.randn(2, layer.in_channels, 9, 9)


def _adapted(kind: str, rank: int = 4, alpha: float = 2.0, **kwargs) -> tuple[nn.Module, LoRAModule]:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    lora = LoRAModule("lora_test", layer, rank, alpha, **kwargs)
    nn.init.normal_(lora.lora_up.weight)  # a trained adapter: non-zero up
    lora.apply_to()
    return layer, lora


def test_scale_rule():
    assert lora_scale(8, 16) == 0.5
    assert lora_scale(None, 16) == 1.0
    assert lora_scale(0, 16) == 1.0


@pytest.mark.parametrize("kind", list(LAYERS))
def test_zero_initialised_up_equals_base(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    expected = layer(x)
    LoRAModule("lora_test", layer, 4, 1.0).apply_to()
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_multiplier_zero_is_base_bitwise(kind):
    layer, lora = _adapted(kind)
    x = _input(layer)
    adapted = layer(x)
    lora.multiplier = 0.0
    off = layer(x)
    lora.restore()
    base = layer(x)
    assert torch.equal(off, base)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_output_is_base_plus_scaled_delta(kind):
    layer, lora = _adapted(kind, rank=3, alpha=1.5, multiplier=0.7)
    x = _input(layer)
    adapted = layer(x)
    weight = layer.weight + lora.get_delta_weight()
    if isinstance(layer, nn.Linear):
        expected = nn.functional.linear(x, weight, layer.bias)
    else:
        expected = nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    assert lora.scale == 0.5


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_equals_unmerged(kind):
    layer, lora = _adapted(kind)
    original_weight = layer.weight.detach().clone()
    x = _input(layer)
    unmerged = layer(x)
    lora.merge()
    merged = layer(x)
    assert (merged - unmerged).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="unmerge"):
        lora.multiplier = 0.5
    lora.unmerge()
    assert (layer.weight - original_weight).abs().max() < 1e-6


@pytest.mark.parametrize("kind", list(LAYERS))
def test_only_adapter_parameters_get_gradients(kind):
    layer, lora = _adapted(kind)
    layer.requires_grad_(False)
    layer(_input(layer)).square().mean().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.grad.abs().sum() > 0
    assert lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
    assert [n for n, _ in lora.named_parameters()] == ["lora_down.weight", "lora_up.weight"]


def test_base_layer_is_not_in_state_dict():
    _, lora = _adapted("linear")
    assert sorted(lora.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]


def test_restore_gives_back_the_original_forward():
    layer, lora = _adapted("linear")
    x = _input(layer)
    lora.restore()
    assert "forward" not in vars(layer)
    lora.apply_to()
    lora.apply_to()  # idempotent: no double wrapping
    lora.restore()
    assert "forward" not in vars(layer)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_dropouts_act_only_in_training():
    layer, lora = _adapted("linear", dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    x = _input(layer)
    lora.eval()
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    lora.train()
    torch.manual_seed(1)
    outputs = [layer(x) for _ in range(6)]
    assert any(not torch.equal(o, first) for o in outputs)


def test_rank_dropout_mask_shapes_and_rate():
    torch.manual_seed(0)
    linear_mask = rank_dropout_mask(torch.zeros(64, 7, 16), 0.25)
    conv_mask = rank_dropout_mask(torch.zeros(64, 16, 3, 3), 0.25)
    assert linear_mask.shape == (64, 1, 16) and conv_mask.shape == (64, 16, 1, 1)
    assert 0.65 < linear_mask.mean().item() < 0.85


def test_delta_weight_of_conv_is_the_composed_conv():
    torch.manual_seed(0)
    down, up = torch.randn(4, 6, 3, 3), torch.randn(8, 4, 1, 1)
    x = torch.randn(1, 6, 7, 7)
    composed = nn.functional.conv2d(nn.functional.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(nn.functional.conv2d(x, delta_weight(down, up, 1.0), padding=1), composed, atol=1e-4, rtol=1e-4)


def test_max_norm_scales_down_to_the_bound():
    _, lora = _adapted("linear")
    before = lora.get_delta_weight(1.0).norm().item()
    scaled, after = lora.apply_max_norm(before / 4)
    assert scaled
    assert after == pytest.approx(before / 4, rel=1e-4)
    assert lora.get_delta_weight(1.0).norm().item() == pytest.approx(before / 4, rel=1e-4)
    assert max_norm_ratio(torch.ones(2, 2), 10.0) == (1.0, 2.0)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="value passed is 0"):
        LoRAModule("lora_x", nn.Linear(2, 2), 0, 1.0)


def test_loaded_alpha_updates_scale():
    _, lora = _adapted("linear", rank=4, alpha=4.0)
    state = lora.state_dict()
    state["alpha"] = torch.tensor(1.0)
    lora.load_state_dict(state)
    assert lora.scale == 0.25
