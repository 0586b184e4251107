"""SDXL LoRA files as sd-scripts writes them: SGM U-Net names, `lora_te1`/`lora_te2`, SDXL modelspec.

sd-scripts trains SDXL on Stability's own U-Net layout, so its files say
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` where diffusers' module is
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. Our network names the diffusers U-Net's
layers that way, diffusers' `load_lora_weights` reads the file back onto the same layers, files with
diffusers-layout SDXL names load under SGM names, and an SD 1.x file is refused by an SDXL network.
"""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import networks.lora_cat as lora_cat
from library.testing.tiny_sd import build_tiny_sd
from library.testing.tiny_sdxl import build_tiny_sdxl
from networks.lora_cat.errors import UserInputError
from networks.lora_cat.metadata import modelspec_metadata
from networks.lora_cat.targets import diffusers_layout_unet_names, text_encoder_targets, unet_targets

LOCON = {"conv_dim": "2", "conv_alpha": "1"}
PROMPTS = ["a photo of sks teapot", "a teapot"]

# One of each kind of layer in the tiny SDXL (levels: DownBlock2D, CrossAttnDownBlock2D with 1 and
# with 2 transformer layers), named as sd-scripts' SDXL U-Net (library/sdxl_original_unet.py) names it.
EXPECTED_UNET_NAMES = [
    # level 0 has no attention: resnets at input_blocks 1 and 2, the downsampler at 3
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_2_0_out_layers_3",
    "lora_unet_input_blocks_3_0_op",
    # level 1: resnet + transformer at 4 and 5 (16 -> 32 channels: a skip connection), downsampler at 6
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2",
    "lora_unet_input_blocks_5_1_proj_out",
    "lora_unet_input_blocks_6_0_op",
    # level 2: two transformer layers per attention
    "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_v",
    "lora_unet_input_blocks_8_0_emb_layers_1",
    "lora_unet_middle_block_0_in_layers_2",
    "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2",
    "lora_unet_middle_block_2_emb_layers_1",
    # up: three resnets per level, the upsampler behind the attention of the level's last slot
    "lora_unet_output_blocks_0_0_skip_connection",
    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_v",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_k",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_6_0_in_layers_2",
    "lora_unet_output_blocks_8_0_out_layers_3",
]
EXPECTED_TEXT_ENCODER_NAMES = [
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_2_mlp_fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_2_self_attn_out_proj",
]
# Per Transformer2DModel: proj_in, proj_out and 10 per transformer layer (attn1 and attn2 q/k/v/out, ff in/out).
# Attentions: down 2 x 1 layer + 2 x 2, mid 1 x 2, up 3 x 2 + 3 x 1 -> 2*12 + 2*22 + 22 + 3*22 + 3*12 = 192.
TINY_UNET_ATTENTION_LAYERS = 192
# 17 resnets (6 down, 2 mid, 9 up): 17 emb_layers_1 + 10 skip_connection (1 down, 9 up) Linear/1x1, and
# 34 in_layers_2/out_layers_3 + 2 downsampler op + 2 upsampler conv 3x3 -> 257 with conv_dim.
TINY_UNET_LOCON_LAYERS = 192 + 27 + 38
TINY_TEXT_ENCODER_LAYERS = 3 * 6  # q, k, v, out_proj, fc1, fc2 per layer


def _network(models, network_args, seed=3):
    network = lora_cat.create_network(1.0, 4, 2.0, models.vae, models.text_encoders, models.unet, **network_args)
    network.apply_to(models.text_encoders, models.unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)  # lora_up too: every layer changes the output
    return network


def _names(network, prefix):
    return {lora.lora_name for lora in network.all_loras if lora.lora_name.startswith(prefix)}


# --- (a) the names ---------------------------------------------------------------------------------


def test_tiny_sdxl_names_are_the_ones_sd_scripts_writes():
    models = build_tiny_sdxl(seed=0)
    network = _network(models, LOCON)
    unet_names = _names(network, "lora_unet_")
    assert set(EXPECTED_UNET_NAMES) <= unet_names
    assert set(EXPECTED_TEXT_ENCODER_NAMES) <= _names(network, "lora_te")
    assert len(unet_names) == TINY_UNET_LOCON_LAYERS
    assert len(_names(network, "lora_te1_")) == len(_names(network, "lora_te2_")) == TINY_TEXT_ENCODER_LAYERS
    assert len(_names(network, "lora_te_")) == 0
    for name in unet_names:  # all SGM; no conv_in, time/label embedding, attention in level 0, last upsampler
        assert name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        assert not name.startswith(("lora_unet_input_blocks_0_", "lora_unet_input_blocks_1_1_", "lora_unet_output_blocks_8_1"))
    plain = _network(build_tiny_sdxl(seed=0), {})
    assert len(_names(plain, "lora_unet_")) == TINY_UNET_ATTENTION_LAYERS


# SDXL base 1.0's shapes (its unet/ and text_encoder*/ configs), built on the meta device: no memory, no weights.
SDXL_BASE_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    sample_size=128,
)


def _meta_sdxl_base():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, projection_dim=1280))
    return unet, te1, te2


def test_full_sdxl_has_sd_scripts_layer_counts():
    """sd-scripts logs "create LoRA for U-Net: 722 modules" for an SDXL LoRA (788 with conv_dim), 264 for both TEs."""
    unet, te1, te2 = _meta_sdxl_base()
    attention = {t.lora_name for t in unet_targets(unet, with_conv_blocks=False)}
    assert len(attention) == 722
    assert len(unet_targets(unet, with_conv_blocks=True)) == 788
    assert len(text_encoder_targets(te1, "lora_te1")) + len(text_encoder_targets(te2, "lora_te2")) == 264
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k" in attention  # 10 layers at level 2
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2" in attention


# sd-scripts' sdxl_train_network passes its own SDXL U-Net (library/sdxl_original_unet.py), whose module paths
# are SGM's already. A stand-in with its class names and the first five input_blocks:
class ResnetBlock2D(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.in_layers = torch.nn.Sequential(torch.nn.GroupNorm(1, channels), torch.nn.SiLU(), torch.nn.Conv2d(channels, channels, 3))
        self.emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(8, channels))


class Downsample2D(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = torch.nn.Conv2d(channels, channels, 3, stride=2)


class Transformer2DModel(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.proj_in = torch.nn.Linear(channels, channels)
        block = torch.nn.Module()
        block.attn1 = torch.nn.Module()
        block.attn1.to_q = torch.nn.Linear(channels, channels)
        self.transformer_blocks = torch.nn.ModuleList([block])


class SdxlUNet2DConditionModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)),
            torch.nn.ModuleList([ResnetBlock2D(4)]),
            torch.nn.ModuleList([ResnetBlock2D(4)]),
            torch.nn.Sequential(Downsample2D(4)),
            torch.nn.ModuleList([ResnetBlock2D(4), Transformer2DModel(4)]),
        ])


def test_sd_scripts_own_sdxl_unet_keeps_its_sgm_paths_and_reads_diffusers_layout_names():
    unet = SdxlUNet2DConditionModel()
    names = {t.lora_name for t in unet_targets(unet, with_conv_blocks=True)}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names and "lora_unet_input_blocks_3_0_op" in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names and len(names) == 9
    aliases = diffusers_layout_unet_names(unet)
    assert aliases["lora_unet_down_blocks_0_resnets_0_conv1"] == "lora_unet_input_blocks_1_0_in_layers_2"
    assert aliases["lora_unet_down_blocks_0_resnets_1_time_emb_proj"] == "lora_unet_input_blocks_2_0_emb_layers_1"
    assert aliases["lora_unet_down_blocks_0_downsamplers_0_conv"] == "lora_unet_input_blocks_3_0_op"
    assert aliases["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    xl = build_tiny_sdxl(seed=0)
    network = lora_cat.create_network(1.0, 4, 2.0, xl.vae, xl.text_encoders, unet)
    assert network.family == "SDXL"


def test_sd1_names_stay_in_diffusers_layout():
    sd = build_tiny_sd(seed=0)
    names = {t.lora_name for t in unet_targets(sd.unet, with_conv_blocks=True)}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert all(name.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for name in names)
    assert diffusers_layout_unet_names(sd.unet) == {}


# --- (b) diffusers loads our file onto the same layers ----------------------------------------------


@torch.no_grad()
def _outputs(models, ids, latents, timesteps):
    denoiser = models.denoiser()
    text = denoiser.encode(ids)
    return text.states, text.pooled, denoiser.predict(latents, timesteps, text)


def _adapted_layers(module):
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


@pytest.mark.parametrize("network_args", [{}, LOCON], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_reproduces_our_outputs(tmp_path, network_args):
    ours = build_tiny_sdxl(seed=0)
    theirs = copy.deepcopy(ours)
    network = _network(ours, network_args)
    network.set_multiplier(0.8)
    path = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(path, torch.float32, {"ss_network_module": "networks.lora_cat"})

    pipe = theirs.pipeline()
    pipe.load_lora_weights(str(path), adapter_name="cat")
    pipe.set_adapters(["cat"], adapter_weights=[0.8])

    gen = torch.Generator().manual_seed(0)
    cfg = ours.unet.config
    ids = ours.tokenize(PROMPTS)
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    timesteps = torch.tensor([50, 700])
    our_states, our_pooled, our_eps = _outputs(ours, ids, latents, timesteps)
    their_states, their_pooled, their_eps = _outputs(theirs, ids, latents, timesteps)
    with network.adapters_off():
        base_states, base_pooled, base_eps = _outputs(ours, ids, latents, timesteps)

    # every layer of the file became a diffusers/peft adapter on the model part it names
    assert _adapted_layers(theirs.unet) == len(_names(network, "lora_unet_"))
    assert _adapted_layers(theirs.text_encoder_1) == len(_names(network, "lora_te1_"))
    assert _adapted_layers(theirs.text_encoder_2) == len(_names(network, "lora_te2_"))
    width_1 = ours.text_encoder_1.config.hidden_size
    assert (our_states[..., :width_1] - base_states[..., :width_1]).abs().max() > 1e-2, "the TE1 LoRA must matter"
    assert (our_states[..., width_1:] - base_states[..., width_1:]).abs().max() > 1e-2, "the TE2 LoRA must matter"
    assert (our_pooled - base_pooled).abs().max() > 1e-2
    assert (our_eps - base_eps).abs().max() > 1e-2, "the U-Net LoRA must matter"
    assert (our_states - their_states).abs().max() < 1e-4
    assert (our_pooled - their_pooled).abs().max() < 1e-4
    assert (our_eps - their_eps).abs().max() < 1e-4


# --- (c) diffusers-layout SDXL files load under SGM names -------------------------------------------


def _in_diffusers_layout(state_dict, unet):
    to_diffusers = {sgm: old for old, sgm in diffusers_layout_unet_names(unet).items()}
    renamed = {}
    for key, tensor in state_dict.items():
        name, _, rest = key.partition(".")
        renamed[f"{to_diffusers.get(name, name)}.{rest}"] = tensor
    return renamed


def test_diffusers_layout_sdxl_file_loads_with_the_same_weights(tmp_path):
    models = build_tiny_sdxl(seed=0)
    network = _network(models, LOCON)
    network.restore()
    reference = {k: v.clone() for k, v in network.state_dict().items()}
    diffusers_sd = _in_diffusers_layout(reference, models.unet)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in diffusers_sd
    path = tmp_path / "diffusers_layout.safetensors"
    save_file(diffusers_sd, str(path))

    fresh = build_tiny_sdxl(seed=0)
    loaded, weights_sd = lora_cat.create_network_from_weights(1.0, path, fresh.vae, fresh.text_encoders, fresh.unet)
    assert set(weights_sd) == set(reference)  # --base_weights callers get SGM names back
    loaded.apply_to(fresh.text_encoders, fresh.unet)
    result = loaded.load_weights(path)
    assert result["unexpected_keys"] == [] and result["missing_keys"] == []
    assert set(loaded.state_dict()) == set(reference)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key

    # --network_weights into a network built from flags, and --base_weights merging
    flagged = lora_cat.create_network(1.0, 4, 2.0, fresh.vae, fresh.text_encoders, fresh.unet, **LOCON)
    assert flagged.load_weights(path)["unexpected_keys"] == []
    assert all(torch.equal(v, reference[k]) for k, v in flagged.state_dict().items())


def test_base_weights_in_diffusers_layout_merge_into_the_sdxl_model(tmp_path):
    ours = build_tiny_sdxl(seed=0)
    network = _network(ours, LOCON)
    path = tmp_path / "diffusers_layout.safetensors"
    save_file(_in_diffusers_layout(network.state_dict(), ours.unet), str(path))

    merged = build_tiny_sdxl(seed=0)
    module, weights_sd = lora_cat.create_network_from_weights(1.0, path, merged.vae, merged.text_encoders, merged.unet)
    module.merge_to(merged.text_encoders, merged.unet, weights_sd)
    ids = ours.tokenize(PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 900])
    expected = _outputs(ours, ids, latents, timesteps)
    got = _outputs(merged, ids, latents, timesteps)
    with network.adapters_off():
        base = _outputs(ours, ids, latents, timesteps)
    assert (expected[2] - base[2]).abs().max() > 1e-2
    for want, have in zip(expected, got):
        assert (want - have).abs().max() < 1e-4


# --- (d) the other model family is refused ----------------------------------------------------------


def test_sd1_lora_given_to_an_sdxl_network_is_refused(tmp_path):
    sd = build_tiny_sd(seed=0)
    sd_network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet)
    path = tmp_path / "sd1.safetensors"
    sd_network.save_weights(path, torch.float32, {})

    xl = build_tiny_sdxl(seed=0)
    xl_network = lora_cat.create_network(1.0, 4, 2.0, xl.vae, xl.text_encoders, xl.unet)
    xl_network.apply_to(xl.text_encoders, xl.unet)
    message = r"sd1\.safetensors: this LoRA is for Stable Diffusion 1\.x/2\.x \(it has layers such as lora_te_.*the model is SDXL"
    with pytest.raises(UserInputError, match=message):
        xl_network.load_weights(path)
    with pytest.raises(UserInputError, match=message):
        lora_cat.create_network_from_weights(1.0, path, xl.vae, xl.text_encoders, xl.unet)


def test_sd1_unet_only_lora_given_to_an_sdxl_network_is_refused(tmp_path):
    sd = build_tiny_sd(seed=0)
    sd_network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet)
    sd_network.apply_to(sd.text_encoder, sd.unet, apply_text_encoder=False)
    path = tmp_path / "sd1_unet.safetensors"
    sd_network.save_weights(path, torch.float32, {})

    xl = build_tiny_sdxl(seed=0)
    xl_network = lora_cat.create_network(1.0, 4, 2.0, xl.vae, xl.text_encoders, xl.unet)
    with pytest.raises(UserInputError, match=r"sd1_unet\.safetensors: .*(do not fit|none of its)"):
        xl_network.load_weights(path)


def test_sdxl_lora_given_to_an_sd1_network_is_refused(tmp_path):
    xl = build_tiny_sdxl(seed=0)
    path = tmp_path / "sdxl.safetensors"
    _network(xl, {}).save_weights(path, torch.float32, {})

    sd = build_tiny_sd(seed=0)
    sd_network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet)
    message = r"sdxl\.safetensors: this LoRA is for SDXL .* the model is Stable Diffusion 1\.x/2\.x"
    with pytest.raises(UserInputError, match=message):
        sd_network.load_weights(path)
    with pytest.raises(UserInputError, match=message):
        lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)


def test_block_lr_weights_are_refused_for_sdxl():
    xl = build_tiny_sdxl(seed=0)
    with pytest.raises(UserInputError, match="down_lr_weight.*not yet for SDXL"):
        lora_cat.create_network(1.0, 4, 2.0, xl.vae, xl.text_encoders, xl.unet, down_lr_weight="sine")


# --- (e) metadata -----------------------------------------------------------------------------------


def test_sdxl_modelspec_is_sd_scripts_own():
    spec = modelspec_metadata(model_version="sdxl_base_v1-0", title="t", resolution=1024, timestamp=0.0)
    assert spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert spec["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert spec["modelspec.resolution"] == "1024x1024"
    assert spec["modelspec.prediction_type"] == "epsilon"
    v_spec = modelspec_metadata(
        model_version="sdxl_base_v1-0", title="t", resolution=(1024, 768), timestamp=0.0, v_parameterization=True
    )
    assert v_spec["modelspec.prediction_type"] == "v"
    assert v_spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert v_spec["modelspec.resolution"] == "1024x768"
    sd = modelspec_metadata(model_version="sd_v1", title="t", resolution=512, timestamp=0.0)
    assert sd["modelspec.implementation"] == "diffusers"
    assert sd["modelspec.prediction_type"] == "epsilon"
