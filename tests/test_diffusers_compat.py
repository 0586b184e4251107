"""Our LoRA files load in diffusers (`load_lora_weights`) and give our network's outputs."""

import copy

import pytest
import torch

import networks.lora_cat as lora_cat
from library.testing.tiny_sd import build_tiny_sd


def _trained_network(sd, network_args):
    network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet, **network_args)
    network.apply_to(sd.text_encoder, sd.unet)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return network


@torch.no_grad()
def _predict(sd, ids, latents, timesteps):
    hidden = sd.text_encoder(ids).last_hidden_state
    return hidden, sd.unet(latents, timesteps, hidden).sample


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("network_args", [{}, {"conv_dim": "2", "conv_alpha": "1"}], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_reproduces_our_outputs(tmp_path, v2, network_args):
    ours = build_tiny_sd(seed=0, v2=v2)
    theirs = copy.deepcopy(ours)
    network = _trained_network(ours, network_args)
    network.set_multiplier(0.8)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_cat"})

    pipe = theirs.pipeline()
    pipe.load_lora_weights(str(path), adapter_name="cat")
    pipe.set_adapters(["cat"], adapter_weights=[0.8])

    gen = torch.Generator().manual_seed(0)
    cfg = ours.unet.config
    ids = ours.tokenizer(["a photo of sks teapot", "a teapot"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    timesteps = torch.tensor([50, 700])
    our_hidden, our_eps = _predict(ours, ids, latents, timesteps)
    their_hidden, their_eps = _predict(theirs, ids, latents, timesteps)
    with network.adapters_off():
        base_hidden, base_eps = _predict(ours, ids, latents, timesteps)

    assert (our_hidden - base_hidden).abs().max() > 1e-2, "the text-encoder LoRA must matter"
    assert (our_eps - base_eps).abs().max() > 1e-2, "the U-Net LoRA must matter"
    assert (our_hidden - their_hidden).abs().max() < 1e-4
    assert (our_eps - their_eps).abs().max() < 1e-4
