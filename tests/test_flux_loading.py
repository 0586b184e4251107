"""Loading FLUX.1 as users give it to flux_train_network.py: a diffusers folder, or a BFL (or diffusers)
transformer file with --clip_l, --t5xxl and --ae; each read back bitwise, each mistake refused with a
sentence, and the family told apart from SD and SDXL both ways."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.config.train_config import ModelArgs
from library.config.training_script import FLUX_SCRIPT, SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.families.detect import detect_family, is_sdxl_folder
from library.families.flux import bfl_layout
from library.families.flux import single_file as flux_single_file
from library.families.flux.models import T5_TOKENIZER_CACHE_NAME, load, load_flux
from library.families.sd.models import load_stable_diffusion
from library.families.sdxl.models import load_sdxl
from library.testing import ldm_layout
from library.testing.tiny_flux import (
    TINY_FLUX_CONFIG,
    TINY_T5_TOKENIZER,
    build_tiny_flux,
    clip_l_state_dict,
    save_bfl_files,
    save_flux_diffusers_folder,
    t5_state_dict,
)
from library.testing.tiny_sd import (
    build_tiny_sd,
    save_diffusers_folder,
    save_single_file,
    write_state_dict,
)
from library.testing.tiny_sdxl import (
    build_tiny_sdxl,
    save_sdxl_diffusers_folder,
    save_sdxl_single_file,
)

PROMPT = "a photo of a cat sitting on a red chair"


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def files(dev, tmp_path_factory):
    """The tiny dev model as a user has it: a diffusers folder; the four single files; the transformer
    under `model.diffusion_model.` and in diffusers' layout."""
    root = tmp_path_factory.mktemp("flux")
    transformer, clip_l, t5xxl, ae = save_bfl_files(dev, root / "single")
    prefixed, diffusers_layout = root / "prefixed.safetensors", root / "diffusers_transformer.safetensors"
    write_state_dict({bfl_layout.BFL_PREFIX + key: tensor for key, tensor in load_file(transformer).items()}, prefixed)
    write_state_dict({key: tensor.clone() for key, tensor in dev.transformer.state_dict().items()}, diffusers_layout)
    return {
        "folder": save_flux_diffusers_folder(dev, root / "folder"),
        "bfl": transformer, "prefixed": prefixed, "diffusers_layout": diffusers_layout,
        "clip_l": clip_l, "t5xxl": t5xxl, "ae": ae,
    }


@pytest.fixture(scope="module")
def other_families(tmp_path_factory):
    """Tiny SD 1.x and SDXL models, as folders and single files."""
    root = tmp_path_factory.mktemp("other_families")
    sd, sdxl = build_tiny_sd(seed=0), build_tiny_sdxl(seed=0)
    return {
        "sd_folder": save_diffusers_folder(sd, root / "sd"), "sd_file": save_single_file(sd, root / "sd.safetensors"),
        "sdxl_folder": save_sdxl_diffusers_folder(sdxl, root / "sdxl"),
        "sdxl_file": save_sdxl_single_file(sdxl, root / "sdxl.safetensors"),
        "sd_vae": _write(ldm_layout.vae_to_ldm(sd.vae.state_dict(), sd.vae.config, prefix=""), root / "sd_vae.safetensors"),
    }


def _write(state_dict, path):
    write_state_dict({key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}, path)
    return path


def model_args(path, **flags) -> ModelArgs:
    """The training flags for `path` against the tiny architecture, every other flag at its off value."""
    required = {field.name: None for field in dataclasses.fields(ModelArgs) if field.default is dataclasses.MISSING}
    return ModelArgs(**{**required, "pretrained_model_name_or_path": str(path), "v2": False,
                        "v_parameterization": False, "model_config": str(TINY_FLUX_CONFIG), **flags})


def single_file_flags(files) -> dict:
    return {"clip_l": str(files["clip_l"]), "t5xxl": str(files["t5xxl"]), "ae": str(files["ae"])}


def outputs(models) -> dict[str, torch.Tensor]:
    """The transformer's prediction on fixed inputs, CLIP-L's pooled output and T5's states of PROMPT's ids."""
    config = models.transformer.config
    generator = torch.Generator().manual_seed(0)
    ids = models.tokenize([PROMPT])
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    guidance = torch.tensor([3.5]) if config.guidance_embeds else None
    prediction = models.transformer(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.4]), img_ids=img_ids, txt_ids=torch.zeros(8, 3), guidance=guidance, return_dict=False,
    )[0]
    with torch.no_grad():
        return {
            "ids": ids,
            "transformer": prediction,
            "clip_pooled": models.clip_l(ids[:, :77]).pooler_output,
            "t5_states": models.t5(ids[:, 77:]).last_hidden_state,
        }


def assert_same_model(reference, loaded) -> None:
    """Same outputs (tokenized at the loaded model's T5 length) and the same AE weights."""
    expected = outputs(dataclasses.replace(reference, t5_max_length=loaded.t5_max_length))
    got = outputs(loaded)
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    reference_vae, loaded_vae = reference.vae.state_dict(), loaded.vae.state_dict()
    assert reference_vae.keys() == loaded_vae.keys()
    assert all(torch.equal(tensor, loaded_vae[key]) for key, tensor in reference_vae.items())


# --- both layouts load, bitwise --------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["folder", "bfl", "prefixed", "diffusers_layout"])
def test_each_form_loads_as_the_model_it_was_written_from(dev, files, form):
    flags = {} if form == "folder" else single_file_flags(files)
    models = load(model_args(files[form], guidance_scale=2.5, t5xxl_max_token_length=64, apply_t5_attn_mask=True,
                             **flags))
    assert_same_model(dev, models)
    assert isinstance(models.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert models.noise_scheduler.config.shift == dev.noise_scheduler.config.shift
    assert (models.guidance_scale, models.t5_tokens, models.apply_t5_attn_mask) == (2.5, 64, True)
    assert models.tokenize([PROMPT]).shape == (1, 77 + 64)
    for model in models.text_encoders + [models.transformer, models.vae]:
        assert model.dtype == torch.float32 and not model.training
        assert not any(parameter.requires_grad for parameter in model.parameters())


def test_a_schnell_file_is_read_as_schnell(tmp_path):
    schnell = build_tiny_flux(seed=1, guidance=False)
    transformer, clip_l, t5xxl, ae = save_bfl_files(schnell, tmp_path)
    assert transformer.name == "flux1-schnell.safetensors"
    # The architecture folder has the guidance embedding: it is the file that says schnell has none.
    models = load(model_args(transformer, clip_l=str(clip_l), t5xxl=str(t5xxl), ae=str(ae)))
    assert models.transformer.config.guidance_embeds is False and models.is_schnell
    assert models.t5_tokens == 256
    assert_same_model(schnell, models)


def test_a_reduced_depth_file_loads_with_its_depths(dev, files, tmp_path):
    state_dict = {key: tensor for key, tensor in load_file(files["bfl"]).items()
                  if not key.startswith(("double_blocks.1.", "single_blocks.1."))}
    path = _write(state_dict, tmp_path / "pruned.safetensors")
    models = load_flux(path, model_config=TINY_FLUX_CONFIG, **single_file_flags(files))
    assert (models.transformer.config.num_layers, models.transformer.config.num_single_layers) == (1, 1)
    loaded = models.transformer.state_dict()
    assert all(torch.equal(tensor, loaded[key]) for key, tensor in dev.transformer.state_dict().items()
               if key in loaded)


def test_bf16_gives_bf16_models(dev, files):
    models = load_flux(files["bfl"], model_config=TINY_FLUX_CONFIG, dtype=torch.bfloat16, **single_file_flags(files))
    assert all(model.dtype == torch.bfloat16 for model in [*models.text_encoders, models.transformer, models.vae])
    assert torch.get_default_dtype() == torch.float32
    expected = dev.transformer.state_dict()["single_transformer_blocks.0.proj_mlp.weight"].to(torch.bfloat16)
    assert torch.equal(models.transformer.state_dict()["single_transformer_blocks.0.proj_mlp.weight"], expected)


def test_flags_replace_the_parts_of_a_folder(files, tmp_path):
    other = build_tiny_flux(seed=2)
    _, _, t5xxl, ae = save_bfl_files(other, tmp_path)
    models = load_flux(files["folder"], model_config=TINY_FLUX_CONFIG, t5xxl=t5xxl, ae=ae)
    ids = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        assert torch.equal(models.t5(ids).last_hidden_state, other.t5(ids).last_hidden_state)
    assert torch.equal(models.vae.decoder.conv_out.weight, other.vae.decoder.conv_out.weight)
    assert not torch.equal(models.clip_l.get_input_embeddings().weight, other.clip_l.get_input_embeddings().weight)


# --- the T5 tokenizer -----------------------------------------------------------------------------------------

@pytest.fixture
def config_without_tokenizer(tmp_path):
    folder = tmp_path / "tiny_flux_no_tokenizer"
    shutil.copytree(TINY_FLUX_CONFIG, folder, ignore=shutil.ignore_patterns("tokenizer_2"))
    return folder


def test_the_t5_tokenizer_comes_from_the_tokenizer_cache_dir(dev, files, config_without_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(TINY_T5_TOKENIZER, cache / T5_TOKENIZER_CACHE_NAME)
    models = load_flux(files["bfl"], model_config=config_without_tokenizer, tokenizer_cache_dir=cache,
                       **single_file_flags(files))
    assert torch.equal(models.tokenize([PROMPT]), dev.tokenize([PROMPT]))


def test_no_t5_tokenizer_offline_says_where_to_put_it(files, config_without_tokenizer):
    # tests run with HF_HUB_OFFLINE=1 (conftest): transformers then builds a tokenizer of special tokens alone.
    with pytest.raises(UserInputError, match=r"T5 tokenizer is in none of .*google_t5-v1_1-xxl.*--tokenizer_cache_dir"):
        load_flux(files["bfl"], model_config=config_without_tokenizer, **single_file_flags(files))


# --- mistakes, each refused with its sentence -------------------------------------------------------------------

def test_a_transformer_file_without_its_parts_names_the_missing_flags(files, monkeypatch):
    monkeypatch.setattr(flux_single_file, "read_state_dict", lambda *args, **kwargs: pytest.fail("read weights"))
    with pytest.raises(UserInputError, match=r"transformer alone \(bfl layout\), but --t5xxl, --ae were not given"):
        load(model_args(files["bfl"], clip_l=str(files["clip_l"])))
    with pytest.raises(UserInputError, match=r"but --clip_l, --t5xxl, --ae were not given; pass --clip_l FILE"):
        load(model_args(files["diffusers_layout"]))


def test_a_missing_path_is_named_with_its_flag(files, tmp_path):
    with pytest.raises(UserInputError, match=r"nowhere\.safetensors \(--pretrained_model_name_or_path\) does not exist"):
        load(model_args(tmp_path / "nowhere.safetensors"))
    with pytest.raises(UserInputError, match=r"The --ae file .*no_ae\.safetensors does not exist"):
        load(model_args(files["bfl"], **{**single_file_flags(files), "ae": str(tmp_path / "no_ae.safetensors")}))


@pytest.mark.parametrize("model, script", [("sdxl_file", SDXL_SCRIPT), ("sdxl_folder", SDXL_SCRIPT),
                                           ("sd_file", SD_SCRIPT), ("sd_folder", SD_SCRIPT)])
def test_an_sd_or_sdxl_model_is_sent_to_its_script(other_families, files, model, script):
    with pytest.raises(UserInputError, match=rf"is {script.model_name[:4]}.*not .*FLUX\.1.* with {script.name}\."):
        load(model_args(other_families[model], **single_file_flags(files)))


def test_a_t5xxl_of_another_size_or_model_names_the_tensor(files, tmp_path):
    wide_config = T5Config.from_pretrained(TINY_FLUX_CONFIG, subfolder="text_encoder_2", d_model=48)
    wide = _write(t5_state_dict(T5EncoderModel(wide_config)), tmp_path / "t5_wide.safetensors")
    with pytest.raises(UserInputError, match=r"--t5xxl file .*t5_wide\.safetensors does not fit .*text_encoder_2.*: "
                                             r"\S+ is \[\d+, 48\] in the file but \[\d+, 32\] in the config"):
        load(model_args(files["bfl"], **{**single_file_flags(files), "t5xxl": str(wide)}))
    with pytest.raises(UserInputError, match=r"--t5xxl file .*clip_l\.safetensors is not a T5-XXL encoder"):
        load(model_args(files["bfl"], **{**single_file_flags(files), "t5xxl": str(files["clip_l"])}))


def test_a_clip_l_that_is_not_clip_l_is_refused(files, tmp_path):
    with pytest.raises(UserInputError, match=r"--clip_l file .*t5xxl\.safetensors is not a CLIP-L text encoder"):
        load(model_args(files["bfl"], **{**single_file_flags(files), "clip_l": str(files["t5xxl"])}))
    wide_config = CLIPTextConfig.from_pretrained(TINY_FLUX_CONFIG, subfolder="text_encoder", hidden_size=64)
    wide = _write(clip_l_state_dict(CLIPTextModel(wide_config)), tmp_path / "clip_g.safetensors")
    with pytest.raises(UserInputError, match=r"--clip_l file .*clip_g\.safetensors does not fit .* is \[\d+, 64\] "
                                             r"in the file but \[\d+, 32\]"):
        load(model_args(files["bfl"], **{**single_file_flags(files), "clip_l": str(wide)}))


def test_an_sd_vae_as_ae_is_refused(files, other_families):
    with pytest.raises(UserInputError, match=r"--ae file .*sd_vae\.safetensors is a 4-channel autoencoder .* "
                                             r"not FLUX\.1's 16-channel AE"):
        load(model_args(files["folder"], ae=str(other_families["sd_vae"])))


# --- the family, told both ways ---------------------------------------------------------------------------------

def test_detect_family_tells_flux_from_sd_and_sdxl(files, other_families):
    for form in ("folder", "bfl", "prefixed", "diffusers_layout"):
        assert detect_family(files[form]) == FLUX_SCRIPT, form
    assert detect_family(other_families["sdxl_folder"]) == SDXL_SCRIPT
    assert is_sdxl_folder(other_families["sdxl_folder"]) and not is_sdxl_folder(files["folder"])  # both have text_encoder_2/
    assert detect_family(other_families["sdxl_file"]) == SDXL_SCRIPT
    assert detect_family(other_families["sd_folder"]) == SD_SCRIPT
    assert detect_family(other_families["sd_file"]) == SD_SCRIPT


@pytest.mark.parametrize("form", ["folder", "bfl"])
def test_the_sd_and_sdxl_loaders_send_flux_to_its_script(files, form):
    with pytest.raises(UserInputError, match=r"is FLUX\.1, not Stable Diffusion 1\.x/2\.x; .*flux_train_network_cat\.py"):
        load_stable_diffusion(files[form])
    with pytest.raises(UserInputError, match=r"is FLUX\.1, not SDXL; .*flux_train_network_cat\.py"):
        load_sdxl(files[form])
