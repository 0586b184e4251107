"""networks.lora_cat on FLUX.1: sd-scripts' BFL-layout names over diffusers' transformer, fused layers
(one adapter over q, k, v [and the MLP input]) that are exactly the fused layer's LoRA, the CAT
switch, files and their family."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.func import functional_call
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import networks.lora_cat as lora_cat
from networks.lora_cat.errors import UserInputError
from networks.lora_cat.file_format import read_lora_file
from networks.lora_cat.fit import FLUX, file_family
from networks.lora_cat.fused_layer import FusedLoRAModule
from networks.lora_cat.flux_names import DOUBLE_BLOCK_LAYERS, SINGLE_BLOCK_LAYERS

HIDDEN = 32  # 2 heads of 16
TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
            guidance_embeds=True)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, max_position_embeddings=77, projection_dim=32, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    for model in (transformer, clip, t5):
        model.requires_grad_(False)
    return transformer, clip.eval(), t5.eval()


def _network(transformer, clip, t5, **network_args):
    network = lora_cat.create_network(1.0, 4, 2, None, [clip, t5], transformer, **network_args)
    network.apply_to([clip, t5], transformer, True, True)
    with torch.no_grad():  # non-zero up projections, so that every adapter changes its layer
        for lora in network.all_loras:
            lora.lora_up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(lora.lora_name)))
    return network


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(4)
    return dict(hidden_states=torch.randn(batch, 16, 64, generator=g), encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.3, 0.8])[:batch],
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.full((batch,), 3.5))


def test_names_are_sd_scripts_bfl_names():
    transformer, clip, t5 = _models()
    names = {lora.lora_name for lora in _network(transformer, clip, t5).all_loras}
    double = {f"lora_unet_double_blocks_{i}_{layer.replace('.', '_')}" for i in range(2) for layer in DOUBLE_BLOCK_LAYERS}
    single = {f"lora_unet_single_blocks_{i}_{layer.replace('.', '_')}" for i in range(2) for layer in SINGLE_BLOCK_LAYERS}
    unet = {name for name in names if name.startswith("lora_unet_")}
    assert unet == double | single and len(unet) == 2 * 10 + 2 * 3
    assert "lora_unet_double_blocks_0_img_attn_qkv" in unet and "lora_unet_single_blocks_1_modulation_lin" in unet
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any(name.startswith("lora_te3_") for name in names), "T5 is not trained unless asked (sd-scripts)"
    with_t5 = {lora.lora_name for lora in _network(transformer, clip, t5, train_t5xxl="True").all_loras}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in with_t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in with_t5


def test_fused_layers_have_the_fused_shapes():
    transformer, clip, t5 = _models()
    loras = {lora.lora_name: lora for lora in _network(transformer, clip, t5).all_loras}
    qkv = loras["lora_unet_double_blocks_0_txt_attn_qkv"]
    assert isinstance(qkv, FusedLoRAModule) and qkv.lora_up.weight.shape == (3 * HIDDEN, 4)
    assert loras["lora_unet_single_blocks_0_linear1"].lora_up.weight.shape == (3 * HIDDEN + 4 * HIDDEN, 4)
    assert loras["lora_unet_single_blocks_0_linear2"].lora_down.weight.shape == (4, HIDDEN + 4 * HIDDEN)
    assert loras["lora_unet_double_blocks_1_img_mod_lin"].lora_up.weight.shape == (6 * HIDDEN, 4)


def _merged_weights(transformer, network) -> dict[str, torch.Tensor]:
    """Every adapted base weight plus its share of scale * up @ down, as a differentiable function of the adapters."""
    weights = dict(transformer.named_parameters())
    paths = {id(module): name for name, module in transformer.named_modules()}
    for lora in network.unet_loras:
        delta = lora.lora_up.weight @ lora.lora_down.weight * lora.scale
        parts = lora.parts if isinstance(lora, FusedLoRAModule) else lora.org_module
        for part, rows in zip(parts, delta.split([p.out_features for p in parts])):
            key = paths[id(part)] + ".weight"
            weights[key] = weights[key] + rows
    return weights


def test_each_fused_adapter_is_the_fused_layers_lora_in_output_and_gradients():
    transformer, clip, t5 = _models()
    network = _network(transformer, clip, t5)
    network.prepare_grad_etc(None, transformer)
    inputs = _inputs()
    adapted = transformer(**inputs).sample
    adapted.square().mean().backward()
    ours = {name: p.grad.clone() for name, p in network.named_parameters() if "lora_unet" in name}
    network.zero_grad(set_to_none=True)
    network.restore()
    reference = functional_call(transformer, _merged_weights(transformer, network), kwargs=inputs).sample
    assert torch.allclose(adapted, reference, atol=1e-5)
    reference.square().mean().backward()
    for name, p in network.named_parameters():
        if "lora_unet" in name:
            assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-7), name


@torch.no_grad()
def test_multiplier_zero_is_the_bare_transformer_and_merge_is_the_adapted_one():
    transformer, clip, t5 = _models()
    inputs = _inputs()
    bare = transformer(**inputs).sample
    network = _network(transformer, clip, t5)
    adapted = transformer(**inputs).sample
    assert not torch.allclose(adapted, bare, atol=1e-4)
    with network.adapters_off():
        assert torch.equal(transformer(**inputs).sample, bare)
    network.merge()
    assert torch.allclose(transformer(**inputs).sample, adapted, atol=1e-5)
    network.unmerge()
    network.restore()
    assert torch.allclose(transformer(**inputs).sample, bare, atol=1e-6)


def test_the_shared_down_projection_runs_once_per_call():
    transformer, clip, t5 = _models()
    network = _network(transformer, clip, t5, dropout="0.5")
    network.train()
    qkv = next(lora for lora in network.all_loras if lora.lora_name == "lora_unet_single_blocks_0_linear1")
    calls = []
    qkv.lora_down.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        transformer(**_inputs())
    assert len(calls) == 1, "q, k, v and the MLP input share one down projection and one dropout mask"
    assert qkv._shared is None, "no input is kept alive after the last part"


def test_files_round_trip_with_sd_scripts_names_and_are_flux_files(tmp_path):
    transformer, clip, t5 = _models()
    network = _network(transformer, clip, t5)
    inputs = _inputs()
    with torch.no_grad():
        adapted = transformer(**inputs).sample
    file = tmp_path / "flux_lora.safetensors"
    network.save_weights(file, None, {"ss_network_module": "networks.lora_flux"})
    state, _ = read_lora_file(file)
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * HIDDEN, 4)
    assert file_family(key.split(".")[0] for key in state)[0] == FLUX
    network.restore()
    fresh = _models()[0]
    loaded, _ = lora_cat.create_network_from_weights(1.0, file, None, [clip, t5], fresh)
    loaded.apply_to([clip, t5], fresh, True, True)
    loaded.load_weights(file)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, adapted)


def test_a_sdxl_file_is_refused_on_flux_with_a_sentence(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(file))
    transformer, clip, t5 = _models()
    with pytest.raises(UserInputError, match="this LoRA is for SDXL .* but the model is FLUX.1"):
        lora_cat.create_network_from_weights(1.0, file, None, [clip, t5], transformer)


def test_block_lr_weights_are_refused_on_flux():
    transformer, clip, t5 = _models()
    with pytest.raises(UserInputError, match="FLUX.1"):
        lora_cat.create_network(1.0, 4, 1, None, [clip, t5], transformer,
                                 down_lr_weight="1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5")
