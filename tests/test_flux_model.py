"""FLUX.1's model parts: the architecture configs, the BFL <-> diffusers transformer layout, the
tiny model and its T5 tokenizer, and the files written for it, read back as users' files are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.errors import UserInputError
from library.families import ldm_single_file
from library.families.flux import bfl_layout
from library.families.flux.tokenizers import load_t5_tokenizer
from library.families.model_parts import MODEL_CONFIGS_DIR
from library.testing.tiny_flux import (
    TINY_FLUX_CONFIG,
    TINY_T5_TOKENIZER,
    build_tiny_flux,
    build_tiny_t5_tokenizer,
    save_bfl_files,
    save_flux_diffusers_folder,
)

FLUX_DEV_CONFIG = MODEL_CONFIGS_DIR / "flux_dev"
# FLUX.1-dev's transformer as released (sd-scripts and diffusers read 11.9B); schnell lacks the
# guidance embedder's two Linear layers (256 -> 3072 -> 3072).
FLUX_DEV_TRANSFORMER_PARAMETERS = 11_901_408_320
GUIDANCE_EMBEDDER_PARAMETERS = 256 * 3072 + 3072 + 3072 * 3072 + 3072
T5_XXL_ENCODER_PARAMETERS = 4_762_310_656


@pytest.fixture(scope="module")
def parts():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def bfl_files(parts, tmp_path_factory):
    return save_bfl_files(parts, tmp_path_factory.mktemp("flux_files"))


def transformer_inputs(config, batch: int = 2, seq: int = 16, text: int = 8, seed: int = 1) -> dict:
    """A FluxTransformer2DModel call: packed latents, T5 states, pooled CLIP, t in [0, 1], ids, guidance."""
    generator = torch.Generator().manual_seed(seed)
    side = int(seq**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, seq, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        "timestep": torch.rand(batch, generator=generator),
        "img_ids": img_ids.reshape(seq, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5) if config.guidance_embeds else None,
    }


def fresh_transformer(**overrides) -> FluxTransformer2DModel:
    config = FluxTransformer2DModel.load_config(TINY_FLUX_CONFIG, subfolder="transformer")
    return FluxTransformer2DModel.from_config(config, **overrides).eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


# --- the BFL <-> diffusers layout ---------------------------------------------------------------

@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_diffusers_to_bfl_and_back_is_bitwise(guidance):
    transformer = build_tiny_flux(seed=3, guidance=guidance).transformer
    state = transformer.state_dict()
    bfl = bfl_layout.diffusers_to_bfl(state, transformer.config)
    assert ("guidance_in.in_layer.weight" in bfl) == guidance
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    assert bfl["double_blocks.1.img_attn.qkv.weight"].shape == (3 * 32, 32)
    assert_same_state(bfl_layout.bfl_to_diffusers(bfl, transformer.config), state)


def _ramp_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's keys with dim-0 sizes kept and one column: distinct ramps, so any misplaced row shows."""
    state, offset = {}, 0
    for key, tensor in model.state_dict().items():
        rows = tensor.shape[0]
        ramp = torch.arange(offset, offset + rows, dtype=torch.float64)
        state[key] = ramp if tensor.dim() == 1 else ramp[:, None]
        offset += rows
    return state


def test_conversion_matches_diffusers_at_flux_dev_width():
    """At FLUX.1-dev's width (the only one diffusers' converter handles), ours gives diffusers' result.

    One column per weight keeps this cheap; the row layout, which is what the conversion moves, is real.
    """
    config = FluxTransformer2DModel.load_config(FLUX_DEV_CONFIG, subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config, num_layers=2, num_single_layers=2)
    diffusers_state = _ramp_state_dict(model)
    bfl = bfl_layout.diffusers_to_bfl(diffusers_state, model.config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({bfl_layout.BFL_PREFIX + k: v for k, v in bfl.items()})
    assert_same_state(theirs, diffusers_state)
    assert_same_state(bfl_layout.bfl_to_diffusers(bfl, model.config), diffusers_state)


def test_final_layer_modulation_is_shift_then_scale_in_bfl(parts):
    """BFL's LastLayer: shift, scale = adaLN_modulation(c).chunk(2); out = linear((1 + scale) * norm(x) + shift)."""
    transformer = parts.transformer
    bfl = bfl_layout.diffusers_to_bfl(transformer.state_dict(), transformer.config)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 32, generator=generator)
    conditioning = torch.randn(2, 32, generator=generator)
    modulation = torch.nn.functional.silu(conditioning) @ bfl["final_layer.adaLN_modulation.1.weight"].T
    shift, scale = (modulation + bfl["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    normed = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
    bfl_out = ((1 + scale[:, None]) * normed + shift[:, None]) @ bfl["final_layer.linear.weight"].T
    bfl_out = bfl_out + bfl["final_layer.linear.bias"]
    diffusers_out = transformer.proj_out(transformer.norm_out(x, conditioning))
    torch.testing.assert_close(diffusers_out, bfl_out)


def test_unknown_and_missing_keys_are_refused(parts):
    config = parts.transformer.config
    bfl = bfl_layout.diffusers_to_bfl(parts.transformer.state_dict(), config)
    with pytest.raises(ValueError, match="double_blocks.7"):
        bfl_layout.bfl_to_diffusers({**bfl, "double_blocks.7.img_mod.lin.weight": torch.zeros(1)}, config)
    del bfl["single_blocks.1.linear2.bias"]
    with pytest.raises(ValueError, match="single_blocks.1.linear2.bias"):
        bfl_layout.bfl_to_diffusers(bfl, config)


def test_detection_of_layout_and_guidance(parts, bfl_files):
    bfl_keys = load_file(bfl_files[0]).keys()
    diffusers_keys = parts.transformer.state_dict().keys()
    prefixed = [bfl_layout.BFL_PREFIX + key for key in bfl_keys]
    assert bfl_layout.is_bfl_flux(bfl_keys) and bfl_layout.is_bfl_flux(prefixed)
    assert not bfl_layout.is_bfl_flux(diffusers_keys)
    assert bfl_layout.is_diffusers_flux(diffusers_keys) and not bfl_layout.is_diffusers_flux(bfl_keys)
    assert bfl_layout.has_guidance(prefixed) and bfl_layout.has_guidance(diffusers_keys)
    schnell = build_tiny_flux(guidance=False).transformer
    assert not bfl_layout.has_guidance(bfl_layout.diffusers_to_bfl(schnell.state_dict(), schnell.config))
    assert not bfl_layout.has_guidance(schnell.state_dict())


def test_reduced_depth_bfl_file_loads_with_inferred_config(bfl_files):
    """A BFL file with fewer blocks (one of each, as pruned checkpoints have) loads with the depths it has."""
    full = load_file(bfl_files[0])
    reduced = {bfl_layout.BFL_PREFIX + key: tensor for key, tensor in full.items()
               if not key.startswith(("double_blocks.1.", "single_blocks.1."))}
    base = FluxTransformer2DModel.load_config(TINY_FLUX_CONFIG, subfolder="transformer")
    overrides = bfl_layout.infer_bfl_config(reduced, base)
    assert overrides["num_layers"] == 1 and overrides["num_single_layers"] == 1
    assert overrides["num_attention_heads"] == 2 and overrides["guidance_embeds"] is True
    model = fresh_transformer(**overrides)
    model.load_state_dict(bfl_layout.bfl_to_diffusers(reduced, model.config), strict=True)
    assert bfl_layout.infer_bfl_config(full, base) == {
        "in_channels": 64, "out_channels": 64, "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    }
    with pytest.raises(UserInputError, match="head dim"):
        bfl_layout.infer_bfl_config(full, {**base, "attention_head_dim": 8})


# --- the files written for the tiny model -------------------------------------------------------

@torch.no_grad()
def test_bfl_transformer_file_gives_the_same_outputs(parts, bfl_files):
    transformer_file = bfl_files[0]
    assert transformer_file.name == "flux1-dev.safetensors"
    loaded = fresh_transformer()
    loaded.load_state_dict(bfl_layout.bfl_to_diffusers(load_file(transformer_file), loaded.config), strict=True)
    inputs = transformer_inputs(parts.transformer.config)
    expected = parts.transformer(**inputs).sample
    assert torch.equal(loaded(**inputs).sample, expected)
    assert not torch.equal(fresh_transformer()(**inputs).sample, expected)  # the weights matter


@torch.no_grad()
def test_text_encoder_files_load_strictly(parts, bfl_files):
    _, clip_file, t5_file, _ = bfl_files
    clip_state = load_file(clip_file)
    assert all(key.startswith("text_model.") for key in clip_state)
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(TINY_FLUX_CONFIG, subfolder="text_encoder")).eval()
    clip.load_state_dict({key.removeprefix("text_model."): v for key, v in clip_state.items()}, strict=True)
    ids = parts.clip_tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    assert torch.equal(clip(ids).pooler_output, parts.clip_l(ids).pooler_output)

    t5_state = load_file(t5_file)
    assert {key.split(".")[0] for key in t5_state} == {"shared", "encoder"}
    assert torch.equal(t5_state["shared.weight"], t5_state["encoder.embed_tokens.weight"])
    t5 = T5EncoderModel(T5Config.from_pretrained(TINY_FLUX_CONFIG, subfolder="text_encoder_2")).eval()
    t5.load_state_dict(t5_state, strict=True)
    ids = parts.t5_tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    assert torch.equal(t5(ids).last_hidden_state, parts.t5(ids).last_hidden_state)


def test_ae_file_has_bfl_names_and_loads_back(parts, bfl_files):
    """BFL's ae.safetensors names: LDM's, unprefixed, no quant convs; diffusers' LDM converter reads them."""
    ae_file = bfl_files[3]
    state = load_file(ae_file)
    assert {key.split(".")[0] for key in state} == {"encoder", "decoder"}
    assert not any("quant_conv" in key for key in state)
    assert state["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert {"encoder.down.0.block.0.norm1.weight", "decoder.up.3.upsample.conv.weight", "encoder.norm_out.bias"} <= state.keys()
    vae = ldm_single_file.load_vae(state, TINY_FLUX_CONFIG, ae_file, torch.float32)
    assert isinstance(vae, AutoencoderKL)
    assert_same_state(vae.state_dict(), parts.vae.state_dict())


# --- the tiny T5 tokenizer ------------------------------------------------------------------------

def test_tiny_t5_tokenizer_has_t5_ids_and_is_reproducible(parts, tmp_path):
    tokenizer = parts.t5_tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    assert len(tokenizer) <= parts.t5.config.vocab_size
    prompt = "A photo of a sks cat, sitting on a red chair."
    ids = tokenizer(prompt).input_ids
    assert ids[-1] == 1 and 2 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    padded = tokenizer(prompt, padding="max_length", max_length=len(ids) + 5).input_ids
    assert padded == ids + [0] * 5
    # The committed files are what the builder writes, every time.
    build_tiny_t5_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_T5_TOKENIZER / name).read_bytes(), name
    assert load_t5_tokenizer(tmp_path)(prompt).input_ids == ids


def test_load_t5_tokenizer_refuses_a_folder_without_one(tmp_path):
    with pytest.raises(UserInputError, match="tokenizer_2"):
        load_t5_tokenizer(tmp_path)


# --- the real architecture, on the meta device ----------------------------------------------------

def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_flux_dev_architecture_has_the_released_sizes():
    config = FluxTransformer2DModel.load_config(FLUX_DEV_CONFIG, subfolder="transformer")
    with torch.device("meta"):
        dev = FluxTransformer2DModel.from_config(config)
        schnell = FluxTransformer2DModel.from_config(config, guidance_embeds=False)
        t5 = T5EncoderModel(T5Config.from_pretrained(FLUX_DEV_CONFIG, subfolder="text_encoder_2"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(FLUX_DEV_CONFIG, subfolder="text_encoder"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(FLUX_DEV_CONFIG, subfolder="vae"))
    assert _parameter_count(dev) == pytest.approx(FLUX_DEV_TRANSFORMER_PARAMETERS, rel=0.01)
    assert _parameter_count(dev) - _parameter_count(schnell) == GUIDANCE_EMBEDDER_PARAMETERS
    assert _parameter_count(t5) == pytest.approx(T5_XXL_ENCODER_PARAMETERS, rel=0.01)
    assert _parameter_count(clip) == pytest.approx(123_060_480, rel=0.01)  # CLIP ViT-L/14's text tower
    assert _parameter_count(vae) == pytest.approx(83_819_683, rel=0.01)  # ae.safetensors: 335 MB in fp32
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8


# --- the parts fit together -----------------------------------------------------------------------

def test_flux_pipeline_runs_on_the_tiny_parts_and_from_the_folder(parts, tmp_path):
    """Two sampling steps at 64x64 (4x4 packed latents), in memory and from the written diffusers folder."""
    def sample(pipeline: FluxPipeline) -> np.ndarray:
        return pipeline(
            "a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
            max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np",
        ).images

    images = sample(parts.pipeline())
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert images.std() > 0
    folder = save_flux_diffusers_folder(parts, tmp_path / "tiny_flux")
    reloaded = FluxPipeline.from_pretrained(folder, local_files_only=True)
    np.testing.assert_array_equal(sample(reloaded), images)
