"""One rule for "does this LoRA file fit the model": the adapter's `fit`, used by its network and by evaluate_kps."""

import pytest
import torch

import networks.lora_cat as lora_cat
from library.errors import UserInputError
from library.evaluation.lora_fit import check_lora_fits
from library.testing.tiny_sd import build_tiny_sd
from networks.lora_cat.file_format import describe_lora_state_dict, read_lora_file, save_lora_file
from networks.lora_cat.fit import fits, lora_shapes
from networks.lora_cat.layer import LoRAModule


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd(seed=0)


@pytest.mark.parametrize("v2", [False, True])
def test_the_rule_is_the_shapes_the_adapter_builds_on_every_layer_a_file_may_name(v2):
    models = build_tiny_sd(seed=0, v2=v2)
    layers = models.lora_layers()
    assert any(isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1) for layer in layers.values())
    for name, layer in layers.items():
        lora = LoRAModule(name, layer, 3, None)
        assert lora_shapes(layer, 3) == (tuple(lora.lora_down.weight.shape), tuple(lora.lora_up.weight.shape)), name


def _locon_file(sd, path, break_up_kernel=False):
    """A LoCon file (3x3 convs adapted too) for `sd`; optionally one 3x3 conv's lora_up made 3x3 (rank kept)."""
    network = lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet, conv_dim="4", conv_alpha="4")
    tensors = dict(network.state_dict())
    key = next(k for k, v in tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[2:] == (3, 3))
    up_key = key.replace("lora_down", "lora_up")
    if break_up_kernel:
        tensors[up_key] = torch.zeros(*tensors[up_key].shape[:2], 3, 3)
    save_lora_file(path, tensors, None)
    return key.removesuffix(".lora_down.weight")


def test_a_fitting_file_fits_for_both_callers(sd, tmp_path):
    path = tmp_path / "locon.safetensors"
    _locon_file(sd, path)
    check_lora_fits(path, sd.lora_layers())
    network, _ = lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)
    network.load_weights(path)
    entries = describe_lora_state_dict(read_lora_file(path)[0], str(path))
    assert all(fits(entry, sd.lora_layers()[name]) for name, entry in entries.items())


def test_a_wrong_up_kernel_is_a_misfit_for_both_callers_not_a_rank_mismatch(sd, tmp_path):
    """The network used to compare only the first dimension of `lora_up`: a 3x3 up at the right rank read as
    "has rank 4 but this network has rank 4". Both callers now apply the same rule."""
    path = tmp_path / "bad_up.safetensors"
    name = _locon_file(sd, path, break_up_kernel=True)
    with pytest.raises(UserInputError, match=rf"bad_up\.safetensors has {name} with down .* but this model's layer needs"):
        check_lora_fits(path, sd.lora_layers())
    shape_sentence = rf"bad_up\.safetensors: {name}\.lora_down\.weight .* do not fit this model's layer"
    with pytest.raises(UserInputError, match=shape_sentence):
        lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)
    network = lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet, conv_dim="4", conv_alpha="4")
    with pytest.raises(UserInputError, match=shape_sentence):
        network.load_weights(path)


def test_a_rank_the_network_was_not_built_with_is_still_named_as_such(sd, tmp_path):
    path = tmp_path / "locon.safetensors"
    _locon_file(sd, path)
    network = lora_cat.create_network(1.0, 2, 2, sd.vae, sd.text_encoder, sd.unet, conv_dim="2", conv_alpha="2")
    with pytest.raises(UserInputError, match="has rank 4 but this network has rank 2; pass --network_dim"):
        network.load_weights(path)
    check_lora_fits(path, sd.lora_layers())  # evaluation takes a LoRA at the file's own rank


def test_an_sdxl_file_with_diffusers_layout_u_net_names_fits_under_its_aliases(tmp_path):
    from library.testing.tiny_sdxl import build_tiny_sdxl
    from networks.lora_cat.targets import diffusers_layout_unet_names

    models = build_tiny_sdxl(seed=0)
    network = lora_cat.create_network(1.0, 4, 4, models.vae, models.network_text_encoder, models.unet)
    aliases = diffusers_layout_unet_names(models.unet)
    to_diffusers = {sgm: old for old, sgm in aliases.items()}
    tensors = {}
    for key, tensor in network.state_dict().items():
        name, dot, rest = key.partition(".")
        tensors[to_diffusers.get(name, name) + dot + rest] = tensor
    assert any(key.startswith("lora_unet_down_blocks_") for key in tensors)
    path = tmp_path / "diffusers_layout.safetensors"
    save_lora_file(path, tensors, None)
    with pytest.raises(UserInputError, match="does not have"):
        check_lora_fits(path, models.lora_layers())
    check_lora_fits(path, models.lora_layers(), aliases)
