"""`networks.lora_cat` on the tiny SD model: the kohya contract, names, the multiplier switch, files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import networks.lora_cat as lora_cat
from library.errors import UserInputError
from networks.lora_cat.file_format import read_lora_file
from library.cat.network_protocol import Network, NetworkModuleFactory, multiplier_set_to, unwrap_network
from library.testing.tiny_sd import build_tiny_sd


@pytest.fixture()
def sd():
    return build_tiny_sd(seed=0)


def _randomise(network, seed=1):
    """Give every adapter a non-zero up weight, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return network


def _network(sd, **network_args):
    network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet, **network_args)
    network.apply_to(sd.text_encoder, sd.unet)
    return _randomise(network)


def _inputs(sd, batch=2):
    gen = torch.Generator().manual_seed(7)
    cfg = sd.unet.config
    latents = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    ids = torch.randint(0, 49406, (batch, 77), generator=gen)
    return latents, torch.tensor([10, 500]), ids


@torch.no_grad()
def _outputs(sd, inputs):
    latents, timesteps, ids = inputs
    hidden = sd.text_encoder(ids).last_hidden_state
    return sd.unet(latents, timesteps, hidden).sample, hidden


def test_module_and_network_satisfy_the_contract(sd):
    assert isinstance(lora_cat, NetworkModuleFactory)
    assert isinstance(_network(sd), Network)


def test_kohya_names(sd):
    names = set(_network(sd).state_dict())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in names
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in names
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in names
    assert not any("resnets" in n or "samplers" in n for n in names), "no conv blocks without conv_dim"
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in names)


def test_conv_dim_adds_locon_layers_with_their_ranks(sd):
    network = _network(sd, conv_dim="3", conv_alpha="1.5")
    sd_ = network.state_dict()
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd_[f"{conv}.lora_down.weight"].shape[:2] == (3, sd.unet.down_blocks[0].resnets[0].conv1.in_channels)
    assert sd_[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    assert float(sd_[f"{conv}.alpha"]) == 1.5
    assert sd_["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in sd_
    assert any(k.startswith("lora_unet_up_blocks_0_upsamplers_0_conv") for k in sd_)


def test_multiplier_zero_is_the_base_model_bitwise(sd):
    inputs = _inputs(sd)
    base_eps, base_hidden = _outputs(sd, inputs)
    network = _network(sd, conv_dim="2")
    adapted_eps, adapted_hidden = _outputs(sd, inputs)
    assert not torch.allclose(adapted_eps, base_eps) and not torch.allclose(adapted_hidden, base_hidden)
    network.set_multiplier(0.6)
    with network.adapters_off():
        off_eps, off_hidden = _outputs(sd, inputs)
    assert torch.equal(off_eps, base_eps) and torch.equal(off_hidden, base_hidden)
    assert network.multiplier == 0.6, "the previous multiplier comes back, not 1.0"
    assert all(lora.multiplier == 0.6 for lora in network.all_loras)


def test_multiplier_switch_on_a_data_parallel_wrapper(sd):
    import torch.distributed as dist

    network = _network(sd)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(network)
        assert unwrap_network(wrapped) is network
        with multiplier_set_to(wrapped, 0.0):
            assert all(lora.multiplier == 0.0 for lora in network.all_loras)
        assert network.multiplier == 1.0
    finally:
        dist.destroy_process_group()


def test_only_adapter_parameters_get_gradients(sd):
    network = _network(sd)
    network.prepare_grad_etc(sd.text_encoder, sd.unet)
    latents, timesteps, ids = _inputs(sd)
    sd.unet(latents, timesteps, sd.text_encoder(ids).last_hidden_state).sample.square().mean().backward()
    assert all(p.grad is None for p in list(sd.unet.parameters()) + list(sd.text_encoder.parameters()))
    grads = [p.grad for p in network.get_trainable_params()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_gradient_checkpointing_changes_no_gradient(sd):
    network = _network(sd)
    latents, timesteps, ids = _inputs(sd)

    def grads():
        network.zero_grad()
        sd.unet(latents, timesteps, sd.text_encoder(ids).last_hidden_state).sample.square().mean().backward()
        return [p.grad.clone() for p in network.parameters()]

    sd.unet.train()
    plain = grads()
    sd.unet.enable_gradient_checkpointing()
    network.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unet_only_network_has_no_text_encoder_keys(sd):
    network = lora_cat.create_network(1.0, 4, 1.0, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == []
    assert all(k.startswith("lora_unet_") for k in network.state_dict())
    assert "forward" not in vars(sd.text_encoder.encoder.layers[0].self_attn.q_proj)


def test_save_load_round_trip_is_bitwise_with_metadata(sd, tmp_path):
    network = _network(sd, conv_dim="2", conv_alpha="1")
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float32, {"ss_network_dim": "4", "ss_output_name": "lora"})
    tensors, metadata = read_lora_file(path)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_output_name"] == "lora"
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    assert all(isinstance(v, str) for v in metadata.values())
    reloaded, _ = lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)
    reloaded.load_weights(path)
    for key, value in network.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"


def test_save_casts_every_tensor_alpha_included(sd, tmp_path):
    path = tmp_path / "half.safetensors"
    _network(sd).save_weights(path, torch.float16, None)
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert set(f.metadata()) == {"sshs_model_hash", "sshs_legacy_hash"}


def test_from_weights_infers_ranks_alphas_and_conv_ranks(sd, tmp_path):
    network = lora_cat.create_network(1.0, 8, 3.0, sd.vae, sd.text_encoder, sd.unet, conv_dim="2", conv_alpha="0.5")
    network.apply_to(sd.text_encoder, sd.unet)
    _randomise(network)
    path = tmp_path / "l.safetensors"
    network.save_weights(path, None, None)
    inputs = _inputs(sd)
    expected = _outputs(sd, inputs)
    network.restore()
    rebuilt, weights_sd = lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)
    assert {l.lora_name: (l.rank, float(l.alpha)) for l in rebuilt.all_loras} == {
        l.lora_name: (l.rank, float(l.alpha)) for l in network.all_loras
    }
    rebuilt.apply_to(sd.text_encoder, sd.unet)
    rebuilt.load_weights(path)
    for a, b in zip(expected, _outputs(sd, inputs)):
        assert torch.equal(a, b)


def test_merge_to_equals_applying_the_network(sd, tmp_path):
    inputs = _inputs(sd)
    network = _network(sd, conv_dim="2")
    network.set_multiplier(0.5)
    expected = _outputs(sd, inputs)
    path = tmp_path / "base.safetensors"
    network.save_weights(path, None, None)
    network.restore()
    merger, weights_sd = lora_cat.create_network_from_weights(0.5, path, sd.vae, sd.text_encoder, sd.unet, for_inference=True)
    merger.merge_to(sd.text_encoder, sd.unet, weights_sd, torch.float32, "cpu")
    for a, b in zip(expected, _outputs(sd, inputs)):
        assert (a - b).abs().max() < 1e-5
    assert lora_cat.LoRANetwork.is_mergeable(merger)


def test_optimizer_groups_learning_rates_and_loraplus(sd):
    network = _network(sd, loraplus_unet_lr_ratio="16")
    groups, descriptions = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    by_name = dict(zip(descriptions, groups))
    assert set(by_name) == {"textencoder", "unet", "unet plus"}
    assert by_name["textencoder"]["lr"] == 5e-5 and by_name["unet"]["lr"] == 1e-4
    assert by_name["unet plus"]["lr"] == pytest.approx(1.6e-3)
    up_ids = {id(l.lora_up.weight) for l in network.unet_loras}
    assert {id(p) for p in by_name["unet plus"]["params"]} == up_ids
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(network.parameters()))


def test_zero_learning_rate_group_is_left_out(sd):
    groups, descriptions = _network(sd).prepare_optimizer_params(0.0, None, 1e-3)
    assert descriptions == ["unet"] and groups[0]["lr"] == 1e-3


def test_block_lr_weights_make_per_block_groups(sd):
    network = _network(sd, down_lr_weight="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5", mid_lr_weight="2")
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == 1e-3
    assert any(d.startswith("unet_block") and lr == pytest.approx(5e-5) for d, lr in lrs.items())
    assert any(d.startswith("unet_block") and lr == pytest.approx(2e-4) for d, lr in lrs.items())


def test_max_norm_regularization(sd):
    network = _network(sd)
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(1e-3, "cpu")
    assert keys_scaled == len(network.all_loras)
    assert max_norm == pytest.approx(1e-3, rel=1e-3) and mean_norm == pytest.approx(1e-3, rel=1e-3)


# --- bad input --------------------------------------------------------------------------------


def test_file_for_another_model_is_refused_with_file_and_key(sd, tmp_path):
    other = build_tiny_sd(seed=0, v2=True)  # other cross-attention and text widths
    path = tmp_path / "other.safetensors"
    net = lora_cat.create_network(1.0, 4, 1.0, other.vae, other.text_encoder, other.unet)
    net.apply_to(other.text_encoder, other.unet)
    net.save_weights(path, None, None)
    network = _network(sd)
    with pytest.raises(UserInputError, match=r"other\.safetensors.*lora_(te|unet)_\w+"):
        network.load_weights(path)
    with pytest.raises(UserInputError, match="other.safetensors"):
        lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)


def test_rank_mismatch_says_how_to_fix(sd, tmp_path):
    path = tmp_path / "rank8.safetensors"
    net = lora_cat.create_network(1.0, 8, 1.0, sd.vae, sd.text_encoder, sd.unet)
    net.save_weights(path, None, None)
    with pytest.raises(UserInputError, match="rank 8.*--network_dim"):
        _network(sd).load_weights(path)


def test_down_without_up_is_refused(sd, tmp_path):
    tensors = dict(_network(sd).state_dict())
    missing = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"
    del tensors[missing]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    with pytest.raises(UserInputError, match=r"broken\.safetensors.*lora_unet_mid_block_attentions_0_proj_in\.lora_up"):
        _network(sd).load_weights(path)


def test_non_safetensors_files_are_refused(sd, tmp_path):
    pickle = tmp_path / "lora.pt"
    torch.save(_network(sd).state_dict(), pickle)
    with pytest.raises(UserInputError, match=r"lora\.pt.*not a \.safetensors"):
        _network(sd).load_weights(pickle)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserInputError, match="garbage.safetensors"):
        _network(sd).load_weights(garbage)
    with pytest.raises(UserInputError, match="does not exist"):
        _network(sd).load_weights(tmp_path / "missing.safetensors")


def test_foreign_tensors_are_refused(sd, tmp_path):
    path = tmp_path / "lycoris.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, path)
    with pytest.raises(UserInputError, match="hada_w1_a.*LyCORIS"):
        _network(sd).load_weights(path)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"conv_dim": "four"}, "conv_dim='four': expected a positive integer"),
        ({"rank_dropout": "1.5"}, r"rank_dropout='1.5': expected a probability"),
        ({"loraplus_lr_ratio": "-2"}, "loraplus_lr_ratio='-2': expected a positive number"),
        ({"conv_alpha": "x"}, "conv_alpha='x': expected a number"),
        ({"algo": "locon"}, "LyCORIS"),
        ({"dora_wd": "true"}, "DoRA"),
        ({"block_dims": "4,4"}, "block_dims"),
    ],
)
def test_bad_network_args_name_key_and_value(sd, args, message):
    with pytest.raises(UserInputError, match=message):
        lora_cat.create_network(1.0, 4, 1.0, sd.vae, sd.text_encoder, sd.unet, **args)


def test_bad_network_dim_and_alpha_are_written_as_flags(sd):
    # --network_dim is a flag, not a network_args pair: the sentence says it the way the user typed it.
    with pytest.raises(UserInputError) as err:
        lora_cat.create_network(1.0, 0, 1.0, sd.vae, sd.text_encoder, sd.unet)
    assert str(err.value) == "--network_dim 0: expected a positive integer, e.g. --network_dim 4."
    with pytest.raises(UserInputError) as err:
        lora_cat.create_network(1.0, 4, "one", sd.vae, sd.text_encoder, sd.unet)
    assert str(err.value) == "--network_alpha one: expected a number, e.g. --network_alpha 1.0."
    with pytest.raises(UserInputError) as err:
        lora_cat.create_network(1.0, 4, 1.0, sd.vae, sd.text_encoder, sd.unet, conv_dim="four")
    assert str(err.value) == "network_args conv_dim='four': expected a positive integer, e.g. conv_dim=4."


def test_string_args_and_trainer_dropout_are_parsed(sd):
    network = lora_cat.create_network(
        1.0, "8", "4", sd.vae, sd.text_encoder, sd.unet, dropout=0.1, rank_dropout="0.2", conv_dim="0"
    )
    assert network.config.rank == 8 and network.config.alpha == 4.0
    assert network.config.dropout == 0.1 and network.config.rank_dropout == 0.2
    assert network.config.conv_rank is None
    assert json.dumps(network.config.rank)  # plain numbers, ready for metadata
