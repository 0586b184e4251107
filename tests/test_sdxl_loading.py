"""Loading SDXL as users have it: diffusers folders, SGM-layout .safetensors and .ckpt single files, --vae.

The tiny SDXL model is written by `library.testing.tiny_sdxl` in the formats users download and read back
through `load_sdxl`, so the single-file path runs diffusers' real SGM conversion; the outputs compared are
the ones training uses (both encoders' states and pooled embedding, the U-Net with size/crop numbers, the VAE).
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.config.train_config import ModelArgs
from library.errors import UserInputError
from library.families.sd.models import load_stable_diffusion
from library.families.sdxl import models as sdxl_models
from library.families.sdxl.family import SDXLModels
from library.families.sdxl.models import SDXL_BASE_CONFIG, load_sdxl
from library.testing import ldm_layout
from library.testing.tiny_sd import tiny_config_dir
from library.testing.tiny_sdxl import (
    TINY_SDXL_CONFIG,
    build_tiny_sdxl,
    save_sdxl_diffusers_folder,
    save_sdxl_single_file,
    sgm_state_dict,
)

SEED = 3
OTHER_VAE_SEED = 7
FORMATS = ["folder", "safetensors", "ckpt"]
PARTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class TinySDXLFiles:
    folder: Path
    safetensors: Path
    ckpt: Path


@pytest.fixture(scope="module")
def tiny_sdxl_files(tmp_path_factory: pytest.TempPathFactory) -> TinySDXLFiles:
    """The tiny SDXL model (seed SEED) as a diffusers folder, a .safetensors and a .ckpt; read-only for tests."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    models = build_tiny_sdxl(seed=SEED)
    return TinySDXLFiles(
        folder=save_sdxl_diffusers_folder(models, root / "diffusers"),
        safetensors=save_sdxl_single_file(models, root / "model.safetensors"),
        ckpt=save_sdxl_single_file(models, root / "model.ckpt"),
    )


@pytest.fixture(scope="module")
def reference() -> SDXLModels:
    return build_tiny_sdxl(seed=SEED)


def _load(files: TinySDXLFiles, form: str, **kwargs) -> SDXLModels:
    """Load one saved form of the tiny model; single files need the tiny architecture config."""
    kwargs.setdefault("model_config", TINY_SDXL_CONFIG)
    return load_sdxl(getattr(files, form), **kwargs)


@torch.no_grad()
def _outputs(models: SDXLModels) -> dict[str, torch.Tensor]:
    """Both encoders' states and pooled embedding, the U-Net prediction with size/crop numbers, VAE both ways."""
    generator = torch.Generator().manual_seed(0)
    denoiser = models.denoiser()
    text = denoiser.encode(models.tokenize(["a photo of sks dog", "a dog"]))
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 48, 16, 0, 64, 64]])
    prediction = denoiser.predict(latents, torch.tensor([10, 900]), text, time_ids=time_ids)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    return {
        "states": text.states,
        "pooled": text.pooled,
        "unet": prediction,
        "encoded": models.vae.encode(image).latent_dist.mean,
        "decoded": models.vae.decode(latents).sample,
    }


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert expected_sd.keys() == actual_sd.keys()
    different = [key for key in expected_sd if not torch.equal(expected_sd[key], actual_sd[key].to(expected_sd[key]))]
    assert not different, f"weights differ: {different[:5]}"


def _assert_same_outputs(expected: dict, actual: dict) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=f"{name} differs")


def _other_vae() -> AutoencoderKL:
    return build_tiny_sdxl(seed=OTHER_VAE_SEED).vae


def _save_vae_file(vae: AutoencoderKL, path: Path) -> Path:
    """A standalone VAE file as A1111 users download them: LDM keys without a prefix."""
    state_dict = ldm_layout.vae_to_ldm(vae.state_dict(), vae.config, prefix="")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    return path


def _without_vae_keys(path: Path, tmp_path: Path) -> Path:
    state_dict = {key: value for key, value in load_file(path).items() if not key.startswith("first_stage_model.")}
    pruned = tmp_path / "no_vae.safetensors"
    save_file(state_dict, pruned)
    return pruned


# --- the same model from every format -----------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_folder_safetensors_and_ckpt_load_the_built_model(tiny_sdxl_files, reference, form):
    expected = _outputs(reference)
    assert expected["states"].abs().mean() > 0.1 and expected["unet"].abs().mean() > 0.1  # not a degenerate model
    loaded = _load(tiny_sdxl_files, form)
    for part in PARTS:
        _assert_same_weights(getattr(reference, part), getattr(loaded, part))
    _assert_same_outputs(expected, _outputs(loaded))


def test_the_size_and_crop_numbers_reach_the_loaded_unet(tiny_sdxl_files):
    """label_emb (diffusers' add_embedding) carried over: other time_ids give another prediction."""
    models = _load(tiny_sdxl_files, "safetensors")
    denoiser = models.denoiser()
    with torch.no_grad():
        text = denoiser.encode(models.tokenize(["a dog"]))
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        timestep = torch.tensor([500])
        square = denoiser.predict(latents, timestep, text, time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
        cropped = denoiser.predict(latents, timestep, text, time_ids=torch.tensor([[128.0, 64, 32, 0, 64, 64]]))
    assert (square - cropped).abs().max() > 1e-3


def test_loaded_models_are_frozen_in_eval_mode_in_the_dtype(tiny_sdxl_files):
    models = _load(tiny_sdxl_files, "safetensors", dtype=torch.bfloat16)
    for part in PARTS:
        module = getattr(models, part)
        assert not module.training
        assert all(not parameter.requires_grad for parameter in module.parameters())
        assert {parameter.dtype for parameter in module.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["as-fp16", "as-fp32"])
def test_an_fp16_checkpoint_loads(reference, tmp_path, dtype):
    """Most SDXL files are published in fp16; loaded in either dtype they hold the fp16-rounded weights."""
    state_dict = {
        key: value.half() if value.is_floating_point() else value for key, value in sgm_state_dict(reference).items()
    }
    path = tmp_path / "fp16.safetensors"
    save_file(state_dict, path)
    loaded = load_sdxl(path, model_config=TINY_SDXL_CONFIG, dtype=dtype)
    for part in PARTS:
        module = getattr(loaded, part)
        assert {parameter.dtype for parameter in module.parameters()} == {dtype}
        expected = {key: value.half().to(dtype) for key, value in getattr(reference, part).state_dict().items()}
        actual = module.state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected), part


def test_disable_mmap_reads_the_file_without_memory_mapping(tiny_sdxl_files, reference, monkeypatch):
    from library.families import checkpoint_file

    def no_memory_map(*args, **kwargs):
        raise AssertionError("safe_open memory-maps the file")

    monkeypatch.setattr(checkpoint_file, "safe_open", no_memory_map)
    loaded = _load(tiny_sdxl_files, "safetensors", disable_mmap=True)
    for part in PARTS:
        _assert_same_weights(getattr(reference, part), getattr(loaded, part))
    with pytest.raises(AssertionError, match="memory-maps"):
        _load(tiny_sdxl_files, "safetensors")


def test_disable_mmap_names_a_damaged_file(tiny_sdxl_files, tmp_path):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(tiny_sdxl_files.safetensors.read_bytes()[:5000])
    with pytest.raises(UserInputError, match="damaged.safetensors could not be read as safetensors"):
        load_sdxl(damaged, model_config=TINY_SDXL_CONFIG, disable_mmap=True)


# --- the single-file layout ----------------------------------------------------------------------


def test_single_file_is_in_sgm_layout(tiny_sdxl_files, reference):
    state_dict = load_file(tiny_sdxl_files.safetensors)
    assert "model.diffusion_model.input_blocks.0.0.weight" in state_dict
    assert torch.equal(
        state_dict["model.diffusion_model.label_emb.0.2.weight"], reference.unet.add_embedding.linear_2.weight
    )
    # The last level has two transformer layers per attention, kept under the attention's slot.
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in state_dict
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state_dict
    assert state_dict["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    te2 = "conditioner.embedders.1.model."
    assert state_dict[te2 + "transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert torch.equal(state_dict[te2 + "text_projection"], reference.text_encoder_2.text_projection.weight.T)
    assert te2 + "logit_scale" in state_dict
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
    ckpt = torch.load(tiny_sdxl_files.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert ckpt.keys() == state_dict.keys()


def test_the_writer_covers_every_weight(reference):
    """Each weight of each part is written once: nothing dropped, nothing written twice."""
    expected = sum(len(getattr(reference, part).state_dict()) for part in PARTS)
    # + TE1's position_ids buffer and TE2's logit_scale, which SGM files carry; - TE2's q/k/v fused 3 into 1.
    fused = 2 * 2 * reference.text_encoder_2.config.num_hidden_layers
    assert len(sgm_state_dict(reference)) == expected + 2 - fused


def test_sdxl_base_configs_are_the_real_architecture():
    """configs/models/sdxl_base builds SDXL base 1.0: parameter counts of its U-Net, VAE and both encoders."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIG, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE_CONFIG, subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG, subfolder="text_encoder_2"))
    counts = [sum(parameter.numel() for parameter in model.parameters()) for model in (unet, vae, te1, te2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 2048
    assert unet.config.projection_class_embeddings_input_dim == te2.config.projection_dim + 6 * 256
    assert vae.config.scaling_factor == 0.13025
    assert sdxl_models.architecture_dir() == SDXL_BASE_CONFIG


def test_single_file_is_converted_against_sdxl_base_by_default(tiny_sdxl_files):
    """Without model_config the tiny file meets the real SDXL architecture, and the mismatch is a sentence."""
    with pytest.raises(UserInputError, match=r"model\.safetensors does not fit the architecture config .*sdxl_base"):
        load_sdxl(tiny_sdxl_files.safetensors)


def test_model_config_without_text_encoder_2_is_refused(tiny_sdxl_files):
    with pytest.raises(UserInputError, match=r"lacks text_encoder_2/config\.json.*sdxl_base"):
        load_sdxl(tiny_sdxl_files.safetensors, model_config=tiny_config_dir())


def test_a_weight_missing_from_text_encoder_2_is_named(tiny_sdxl_files, tmp_path):
    state_dict = load_file(tiny_sdxl_files.safetensors)
    del state_dict["conditioner.embedders.1.model.text_projection"]
    path = tmp_path / "no_projection.safetensors"
    save_file(state_dict, path)
    with pytest.raises(UserInputError, match=r"second text encoder .* lacks 1 weight\(s\) .*text_projection\.weight"):
        load_sdxl(path, model_config=TINY_SDXL_CONFIG)


def test_a_refiner_and_a_partial_file_are_refused(tiny_sdxl_files, tmp_path):
    state_dict = load_file(tiny_sdxl_files.safetensors)
    refiner = {
        key.replace("conditioner.embedders.1.", "conditioner.embedders.0."): value
        for key, value in state_dict.items()
        if not key.startswith("conditioner.embedders.0.")
    }
    save_file(refiner, tmp_path / "refiner.safetensors")
    with pytest.raises(UserInputError, match="refiner.safetensors is an SDXL refiner"):
        load_sdxl(tmp_path / "refiner.safetensors", model_config=TINY_SDXL_CONFIG)
    unet_only = {key: value for key, value in state_dict.items() if key.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    not_full = r"unet_only.safetensors is not a full SDXL checkpoint.*conditioner\.embedders\.0"
    with pytest.raises(UserInputError, match=not_full):
        load_sdxl(tmp_path / "unet_only.safetensors", model_config=TINY_SDXL_CONFIG)


# --- tokenizers and flags ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "safetensors"])
def test_tokenizers_pad_as_sdxl_and_clean_text(tiny_sdxl_files, form):
    models = _load(tiny_sdxl_files, form)
    assert (models.tokenizer_1.pad_token_id, models.tokenizer_2.pad_token_id) == (49407, 0)
    ids = models.tokenize(["sks"])
    assert ids[0, 0].tolist() == [49406, 48136, 49407] + [49407] * 74
    assert ids[0, 1].tolist() == [49406, 48136, 49407] + [0] * 74
    assert torch.equal(models.tokenize(["the dog’s toy"]), models.tokenize(["the dog's toy"]))


def test_folder_without_tokenizers_gets_the_offline_ones(tiny_sdxl_files, tmp_path):
    folder = Path(shutil.copytree(tiny_sdxl_files.folder, tmp_path / "model"))
    shutil.rmtree(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer_2")
    models = load_sdxl(folder)
    with_tokenizers = _load(tiny_sdxl_files, "folder")
    assert torch.equal(models.tokenize(["a photo of sks dog"]), with_tokenizers.tokenize(["a photo of sks dog"]))


@pytest.mark.parametrize("form", ["folder", "safetensors"])
def test_prediction_type_follows_v_parameterization(tiny_sdxl_files, form):
    epsilon = _load(tiny_sdxl_files, form)
    v_prediction = _load(tiny_sdxl_files, form, v_parameterization=True)
    assert epsilon.noise_scheduler.config.prediction_type == "epsilon"
    assert v_prediction.noise_scheduler.config.prediction_type == "v_prediction"
    assert v_prediction.v_parameterization and not epsilon.v_parameterization
    config = v_prediction.noise_scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end) == (
        1000, "scaled_linear", 0.00085, 0.012
    )
    assert type(v_prediction.noise_scheduler).__name__ == "DDPMScheduler"


def test_load_passes_the_training_flags(tiny_sdxl_files, reference, tmp_path, monkeypatch):
    """The family's ModelLoader: path, --v_parameterization, --vae, model_config, --disable_mmap_load_safetensors."""
    other = _other_vae()
    vae_file = tmp_path / "vae.safetensors"
    _save_vae_file(other, vae_file)
    seen = {}
    read = sdxl_models.read_state_dict

    def spy(path, *args, **kwargs):
        seen[Path(path).name] = kwargs.get("disable_mmap")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(sdxl_models, "read_state_dict", spy)
    fields = {field.name: None for field in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{
        **fields,
        "pretrained_model_name_or_path": str(tiny_sdxl_files.safetensors),
        "v_parameterization": True,
        "vae": str(vae_file),
        "model_config": str(TINY_SDXL_CONFIG),
        "disable_mmap_load_safetensors": True,
    })
    models = sdxl_models.load(args)
    assert seen == {"model.safetensors": True}
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    _assert_same_weights(other, models.vae)
    _assert_same_weights(reference.unet, models.unet)


# --- --vae ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vae_form", ["folder", "ldm-file"])
@pytest.mark.parametrize("form", ["folder", "safetensors"])
def test_vae_replaces_the_models_vae(tiny_sdxl_files, reference, tmp_path, form, vae_form):
    other = _other_vae()
    if vae_form == "folder":
        vae_path = tmp_path / "vae"
        other.save_pretrained(vae_path)
    else:
        vae_path = _save_vae_file(other, tmp_path / "vae.safetensors")
    models = _load(tiny_sdxl_files, form, vae=vae_path)
    _assert_same_weights(other, models.vae)
    _assert_same_weights(reference.unet, models.unet)
    assert not torch.equal(other.decoder.conv_out.weight, reference.vae.decoder.conv_out.weight)


def test_checkpoint_without_vae_loads_with_vae_and_asks_for_it_without(tiny_sdxl_files, reference, tmp_path):
    pruned = _without_vae_keys(tiny_sdxl_files.safetensors, tmp_path)
    with pytest.raises(UserInputError, match="no_vae.safetensors has no VAE weights.*pass --vae"):
        load_sdxl(pruned, model_config=TINY_SDXL_CONFIG)
    other = _other_vae()
    vae_folder = tmp_path / "vae"
    other.save_pretrained(vae_folder)
    models = load_sdxl(pruned, model_config=TINY_SDXL_CONFIG, vae=vae_folder)
    _assert_same_weights(other, models.vae)
    _assert_same_weights(reference.text_encoder_2, models.text_encoder_2)


def test_folder_without_vae_weights_loads_with_vae(tiny_sdxl_files, tmp_path):
    folder = Path(shutil.copytree(tiny_sdxl_files.folder, tmp_path / "model"))
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    other = _other_vae()
    other.save_pretrained(tmp_path / "vae")
    _assert_same_weights(other, load_sdxl(folder, vae=tmp_path / "vae").vae)


# --- the wrong family, a missing path ------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("form", FORMATS)
def test_sd_model_given_to_load_sdxl_names_train_network_cat(request, v2, form):
    files = request.getfixturevalue("tiny_sd_v2_files" if v2 else "tiny_sd_v1_files")
    path = getattr(files, form)
    refused = rf"{path.name} is Stable Diffusion 1\.x/2\.x.* with train_network_cat\.py"
    with pytest.raises(UserInputError, match=refused):
        load_sdxl(path, model_config=TINY_SDXL_CONFIG)


@pytest.mark.parametrize("form", FORMATS)
def test_sdxl_model_given_to_load_stable_diffusion_names_sdxl_train_network_cat(tiny_sdxl_files, form):
    path = getattr(tiny_sdxl_files, form)
    with pytest.raises(UserInputError, match=rf"{path.name} is SDXL.* with sdxl_train_network_cat\.py"):
        load_stable_diffusion(path, model_config=tiny_config_dir())


def test_sdxl_checkpoint_is_named_as_sdxl_even_with_vae(tiny_sdxl_files, tmp_path):
    pruned = _without_vae_keys(tiny_sdxl_files.safetensors, tmp_path)
    other = _other_vae()
    other.save_pretrained(tmp_path / "vae")
    with pytest.raises(UserInputError, match="is SDXL.*sdxl_train_network_cat"):
        load_stable_diffusion(pruned, vae=tmp_path / "vae", model_config=tiny_config_dir())


@pytest.mark.parametrize("name", ["missing.safetensors", "missing_folder"])
def test_a_missing_path_is_named(tmp_path, name):
    with pytest.raises(UserInputError, match=rf"{name} does not exist"):
        load_sdxl(tmp_path / name)

