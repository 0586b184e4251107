"""Loading SD1/SD2 as users have it: diffusers folders, .safetensors and .ckpt single files, --vae.

The tiny models are written by `library.testing.tiny_sd` in the formats users download and read back through
`load_stable_diffusion`, so the single-file path runs diffusers' real LDM conversion.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.testing import ldm_layout
from library.errors import UserInputError
from library.families.sd.family import StableDiffusionModels
from library.families.sd.models import MODEL_CONFIGS_DIR, load_stable_diffusion
from library.testing.tiny_sd import build_tiny_sd, ldm_state_dict, save_single_file, tiny_config_dir, write_state_dict

FORMATS = ["folder", "safetensors", "ckpt"]


def _files(request: pytest.FixtureRequest, v2: bool):
    return request.getfixturevalue("tiny_sd_v2_files" if v2 else "tiny_sd_v1_files")


def _load(files, form: str, **kwargs) -> StableDiffusionModels:
    """Load one saved form of a tiny model; single files need the tiny architecture config."""
    if form != "folder":
        kwargs.setdefault("model_config", tiny_config_dir(files.v2))
    return load_stable_diffusion(getattr(files, form), v2=files.v2, **kwargs)


@torch.no_grad()
def _outputs(models: StableDiffusionModels) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states, VAE latents and reconstruction, U-Net prediction on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = models.tokenizer(["a photo of sks dog", "a dog"], padding="max_length", return_tensors="pt").input_ids
    hidden = models.text_encoder(ids).last_hidden_state
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    latents = models.vae.encode(image).latent_dist.mean
    cross = torch.randn(2, 77, models.unet.config.cross_attention_dim, generator=generator)
    noise_pred = models.unet(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 900]), cross).sample
    return {"text": hidden, "latents": latents, "decoded": models.vae.decode(latents).sample, "unet": noise_pred}


def _copy_folder(files, tmp_path: Path) -> Path:
    """A writable copy of a tiny model's diffusers folder."""
    return Path(shutil.copytree(files.folder, tmp_path / "model"))


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert expected_sd.keys() == actual_sd.keys()
    different = [key for key in expected_sd if not torch.equal(expected_sd[key], actual_sd[key])]
    assert not different, f"weights differ: {different[:5]}"


def _assert_same_outputs(expected: dict, actual: dict) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=f"{name} differs")


# --- the same model from every format -----------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_folder_safetensors_and_ckpt_load_the_built_model(request, v2):
    files = _files(request, v2)
    reference = build_tiny_sd(seed=files.seed, v2=v2)
    expected = _outputs(reference)
    assert expected["text"].abs().mean() > 0.1 and expected["unet"].abs().mean() > 0.1  # not a degenerate model
    for form in FORMATS:
        loaded = _load(files, form)
        for part in ("unet", "vae", "text_encoder"):
            _assert_same_weights(getattr(reference, part), getattr(loaded, part))
        _assert_same_outputs(expected, _outputs(loaded))


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_loaded_models_are_frozen_in_eval_mode(request, v2):
    models = _load(_files(request, v2), "safetensors", dtype=torch.bfloat16)
    for part in (models.unet, models.vae, models.text_encoder):
        assert not part.training
        assert all(not parameter.requires_grad for parameter in part.parameters())
        assert {parameter.dtype for parameter in part.parameters()} == {torch.bfloat16}


def test_single_file_state_dict_is_in_ldm_layout(tiny_sd_v1_files, tiny_sd_v2_files):
    sd1 = load_file(tiny_sd_v1_files.safetensors)
    sd2 = torch.load(tiny_sd_v2_files.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for state_dict in (sd1, sd2):
        assert "model.diffusion_model.input_blocks.0.0.weight" in state_dict
        assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv in LDM
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)


def test_sd1_checkpoint_without_text_model_level_loads(tiny_sd_v1_files, tmp_path):
    """Some old SD1 checkpoints name the text encoder `cond_stage_model.transformer.embeddings...`."""
    prefix = "cond_stage_model.transformer."
    current = load_file(tiny_sd_v1_files.safetensors)
    state_dict = {key.replace(prefix + "text_model.", prefix): value for key, value in current.items()}
    assert not any(key.startswith(prefix + "text_model.") for key in state_dict)
    path = tmp_path / "old_sd1.safetensors"
    save_file(state_dict, path)
    loaded = load_stable_diffusion(path, model_config=tiny_config_dir())
    _assert_same_weights(build_tiny_sd(seed=tiny_sd_v1_files.seed).text_encoder, loaded.text_encoder)


def test_folder_tokenizer_matches_the_offline_one(tiny_sd_v1_files, tiny_sd_v2_files):
    for files, pad_id in ((tiny_sd_v1_files, 49407), (tiny_sd_v2_files, 0)):
        from_folder = _load(files, "folder").tokenizer
        offline = _load(files, "safetensors").tokenizer
        text = "a photo of sks dog"
        assert from_folder(text, padding="max_length").input_ids == offline(text, padding="max_length").input_ids
        assert from_folder.pad_token_id == offline.pad_token_id == pad_id


def test_folder_without_tokenizer_gets_the_offline_one(tiny_sd_v2_files, tmp_path):
    folder = _copy_folder(tiny_sd_v2_files, tmp_path)
    shutil.rmtree(folder / "tokenizer")
    tokenizer = load_stable_diffusion(folder, v2=True).tokenizer
    assert tokenizer("sks", padding="max_length").input_ids == [49406, 48136, 49407] + [0] * 74


# --- flags ---------------------------------------------------------------------------------------


def test_model_version_and_prediction_type_follow_the_flags(tiny_sd_v1_files, tiny_sd_v2_files):
    sd1 = _load(tiny_sd_v1_files, "folder")
    sd2 = _load(tiny_sd_v2_files, "folder")
    sd2_v = _load(tiny_sd_v2_files, "safetensors", v_parameterization=True)
    assert (sd1.model_version, sd2.model_version, sd2_v.model_version) == ("sd_v1", "sd_v2", "sd_v2_v")
    assert sd1.noise_scheduler.config.prediction_type == "epsilon"
    assert sd2.noise_scheduler.config.prediction_type == "epsilon"
    assert sd2_v.noise_scheduler.config.prediction_type == "v_prediction"
    assert sd2_v.v2 and sd2_v.v_parameterization
    sd1_v = _load(tiny_sd_v1_files, "folder", v_parameterization=True)
    assert sd1_v.model_version == "sd_v1_v"  # what sd-scripts writes for v-prediction without --v2


def test_noise_schedule_is_sds(tiny_sd_v1_files):
    config = _load(tiny_sd_v1_files, "safetensors").noise_scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, "scaled_linear")
    assert (config.beta_start, config.beta_end, config.clip_sample) == (0.00085, 0.012, False)


def test_v_parameterization_without_v2_warns(tiny_sd_v1_files, caplog):
    with caplog.at_level(logging.WARNING, logger="library.families.sd.models"):
        models = _load(tiny_sd_v1_files, "folder", v_parameterization=True)
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    assert "--v_parameterization without --v2" in caplog.text


@pytest.mark.parametrize("form", FORMATS)
def test_sd2_model_without_v2_asks_for_v2(tiny_sd_v2_files, form):
    path = getattr(tiny_sd_v2_files, form)
    with pytest.raises(UserInputError, match=f"{path.name}.*pass --v2"):
        load_stable_diffusion(path, model_config=tiny_config_dir(v2=True))


@pytest.mark.parametrize("form", FORMATS)
def test_sd1_model_with_v2_asks_to_remove_it(tiny_sd_v1_files, form):
    path = getattr(tiny_sd_v1_files, form)
    with pytest.raises(UserInputError, match=f"{path.name}.*remove --v2"):
        load_stable_diffusion(path, v2=True, model_config=tiny_config_dir(v2=True))


# --- text encoder folders in both transformers layouts ------------------------------------------


def test_old_layout_text_encoder_folder_loads_the_same_weights(tiny_sd_v1_files, tmp_path):
    folder = _copy_folder(tiny_sd_v1_files, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    flat = load_file(weights)
    assert not any(key.startswith("text_model.") for key in flat)  # transformers >= 5.6 writes flat keys
    save_file({f"text_model.{key}": tensor for key, tensor in flat.items()}, weights)
    reference = build_tiny_sd(seed=tiny_sd_v1_files.seed)
    _assert_same_weights(reference.text_encoder, load_stable_diffusion(folder).text_encoder)


@pytest.mark.parametrize("prefix", ["", "text_model."], ids=["flat", "old-layout"])
def test_text_encoder_folder_missing_a_weight_is_refused(tiny_sd_v1_files, tmp_path, prefix):
    folder = _copy_folder(tiny_sd_v1_files, tmp_path)
    weights = folder / "text_encoder" / "model.safetensors"
    state_dict = {prefix + key: tensor for key, tensor in load_file(weights).items()}
    del state_dict[prefix + "encoder.layers.1.mlp.fc1.weight"]
    save_file(state_dict, weights)
    with pytest.raises(UserInputError, match=r"text_encoder.*encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_stable_diffusion(folder)


def test_unet_folder_missing_a_weight_is_refused(tiny_sd_v1_files, tmp_path):
    folder = _copy_folder(tiny_sd_v1_files, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["mid_block.attentions.0.proj_out.weight"]
    save_file(state_dict, weights)
    with pytest.raises(UserInputError, match=r"unet.*mid_block\.attentions\.0\.proj_out\.weight"):
        load_stable_diffusion(folder)


# --- single files that do not fit ---------------------------------------------------------------


def test_single_file_missing_a_weight_is_refused(tiny_sd_v1_files, tmp_path):
    state_dict = load_file(tiny_sd_v1_files.safetensors)
    del state_dict["model.diffusion_model.output_blocks.2.0.skip_connection.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state_dict, path)
    expected = r"incomplete\.safetensors.*up_blocks\.0\.resnets\.2\.conv_shortcut\.weight"
    with pytest.raises(UserInputError, match=expected):
        load_stable_diffusion(path, model_config=tiny_config_dir())


def test_single_file_of_another_architecture_names_file_and_key(tiny_sd_v1_files):
    with pytest.raises(UserInputError, match=r"model\.safetensors.*time_embedding\.linear_1\.weight.*model_config"):
        load_stable_diffusion(tiny_sd_v1_files.safetensors)  # the default config is full-size SD1


def test_file_without_text_encoder_is_refused(tiny_sd_v1_files, tmp_path):
    state_dict = load_file(tiny_sd_v1_files.safetensors)
    path = tmp_path / "unet_only.safetensors"
    save_file({key: value for key, value in state_dict.items() if key.startswith("model.")}, path)
    with pytest.raises(UserInputError, match="unet_only.safetensors.*no SD1 or SD2 text encoder"):
        load_stable_diffusion(path, model_config=tiny_config_dir())


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls `_mark_executed`, which must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark_executed, (str(self.marker),))


def _mark_executed(marker: str) -> None:
    Path(marker).write_text("the checkpoint ran code")


def test_pickle_that_runs_code_is_refused_and_not_executed(tiny_sd_v1_files, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "malicious.ckpt"
    state_dict = load_file(tiny_sd_v1_files.safetensors)
    torch.save({"state_dict": state_dict, "callback": _RunsCodeWhenUnpickled(marker)}, path)
    expected = r"malicious\.ckpt was refused and not executed.*_mark_executed.*safetensors"
    with pytest.raises(UserInputError, match=expected):
        load_stable_diffusion(path, model_config=tiny_config_dir())
    assert not marker.exists()


def test_missing_path_is_refused():
    with pytest.raises(UserInputError, match="does/not/exist.safetensors does not exist"):
        load_stable_diffusion("does/not/exist.safetensors")


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "model.bin.zip"
    path.write_bytes(b"PK")
    with pytest.raises(UserInputError, match=r"model\.bin\.zip.*'\.zip'.*\.safetensors"):
        load_stable_diffusion(path)


@pytest.mark.parametrize("name", ["damaged.ckpt", "damaged.safetensors"])
def test_damaged_file_is_refused_with_its_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserInputError, match=f"{name} could not be read"):
        load_stable_diffusion(path)


def test_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="unet/config.json"):
        load_stable_diffusion(tmp_path)


def test_model_config_folder_must_have_the_component_configs(tiny_sd_v1_files, tmp_path):
    with pytest.raises(UserInputError, match="model_config.*text_encoder/config.json"):
        load_stable_diffusion(tiny_sd_v1_files.safetensors, model_config=tmp_path)


# --- --vae --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae() -> AutoencoderKL:
    """A VAE with other weights than the tiny model's, so that replacing it is visible."""
    return build_tiny_sd(seed=7).vae


def _vae_outputs(vae: AutoencoderKL) -> torch.Tensor:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return vae.decode(vae.encode(image).latent_dist.mean).sample


@pytest.mark.parametrize(
    "layout, prefix, suffix",
    [
        ("ldm", "first_stage_model.", ".safetensors"),
        ("ldm", "", ".safetensors"),
        ("ldm", "", ".ckpt"),
        ("ldm", "first_stage_model.", ".pt"),
        ("diffusers", "", ".safetensors"),
    ],
)
def test_vae_file_replaces_the_models_vae(tiny_sd_v1_files, tmp_path, other_vae, layout, prefix, suffix):
    if layout == "ldm":
        state_dict = ldm_layout.vae_to_ldm(other_vae.state_dict(), other_vae.config, prefix=prefix)
    else:
        state_dict = dict(other_vae.state_dict())
    path = tmp_path / f"vae{suffix}"
    write_state_dict({key: value.clone() for key, value in state_dict.items()}, path)
    for form in ("folder", "safetensors"):
        models = _load(tiny_sd_v1_files, form, vae=str(path))
        _assert_same_weights(other_vae, models.vae)
        torch.testing.assert_close(_vae_outputs(models.vae), _vae_outputs(other_vae), rtol=0, atol=1e-6)


def test_vae_folder_replaces_the_models_vae(tiny_sd_v1_files, tmp_path, other_vae):
    other_vae.save_pretrained(tmp_path / "vae_folder")
    models = _load(tiny_sd_v1_files, "safetensors", vae=str(tmp_path / "vae_folder"))
    _assert_same_weights(other_vae, models.vae)


def test_missing_vae_path_is_refused(tiny_sd_v1_files):
    with pytest.raises(UserInputError, match="--vae path no_such_vae.safetensors does not exist"):
        _load(tiny_sd_v1_files, "folder", vae="no_such_vae.safetensors")


def test_incomplete_vae_file_is_refused(tiny_sd_v1_files, tmp_path, other_vae):
    state_dict = ldm_layout.vae_to_ldm(other_vae.state_dict(), other_vae.config, prefix="")
    del state_dict["decoder.up.0.block.1.conv2.weight"]
    path = tmp_path / "vae.safetensors"
    write_state_dict({key: value.clone() for key, value in state_dict.items()}, path)
    expected = r"VAE in .*vae\.safetensors.*decoder\.up_blocks\.3\.resnets\.1\.conv2\.weight"
    with pytest.raises(UserInputError, match=expected):
        _load(tiny_sd_v1_files, "folder", vae=str(path))


# --- architecture configs and the LDM layout ----------------------------------------------------


def _meta_models(config_dir: Path) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The architecture of a config folder without allocating its weights."""
    with torch.device("meta"):
        return (
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae")),
            CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder")),
        )


def _millions(model: torch.nn.Module) -> float:
    return round(sum(parameter.numel() for parameter in model.parameters()) / 1e6, 2)


@pytest.mark.parametrize(
    "name, unet_m, vae_m, text_m",
    [("sd_v1", 859.52, 83.65, 123.06), ("sd_v2", 865.91, 83.65, 340.39)],
)
def test_full_size_configs_have_sds_parameter_counts(name, unet_m, vae_m, text_m):
    unet, vae, text_encoder = _meta_models(MODEL_CONFIGS_DIR / name)
    assert (_millions(unet), _millions(vae), _millions(text_encoder)) == (unet_m, vae_m, text_m)


@pytest.mark.parametrize("name", ["sd_v1", "sd_v2", "tiny_sd_v1", "tiny_sd_v2"])
def test_ldm_layout_round_trips_through_diffusers_converters(name):
    """Our diffusers -> LDM names, fed to diffusers' LDM -> diffusers conversion, give every key back."""
    unet, vae, _ = _meta_models(MODEL_CONFIGS_DIR / name)
    for model, to_ldm, from_ldm in (
        (unet, ldm_layout.unet_to_ldm, convert_ldm_unet_checkpoint),
        (vae, ldm_layout.vae_to_ldm, convert_ldm_vae_checkpoint),
    ):
        original = model.state_dict()
        back = from_ldm(to_ldm(original, model.config), dict(model.config))
        assert back.keys() == original.keys()
        assert all(back[key].shape == original[key].shape for key in original)


def test_sd1_ldm_names_are_the_ones_checkpoints_use():
    unet, vae, _ = _meta_models(MODEL_CONFIGS_DIR / "sd_v1")
    names = set(ldm_layout.unet_to_ldm(unet.state_dict(), unet.config))
    names |= set(ldm_layout.vae_to_ldm(vae.state_dict(), vae.config))
    for known in (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.time_embed.2.bias",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    ):
        assert known in names, known


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_tiny_unet_has_every_lora_target_kind(v2):
    models = build_tiny_sd(v2=v2)
    unet = models.unet
    kinds = {type(module) for module in unet.modules()}
    assert {Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D, Attention} <= kinds
    for part in (unet.down_blocks, [unet.mid_block], unet.up_blocks):
        assert any(isinstance(module, Transformer2DModel) for block in part for module in block.modules())
    proj_in = unet.down_blocks[0].attentions[0].proj_in
    assert isinstance(proj_in, torch.nn.Linear if v2 else torch.nn.Conv2d)
    assert sum(parameter.numel() for parameter in unet.parameters()) < 2_000_000
    assert models.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_tiny_weights_depend_only_on_the_seed():
    torch.manual_seed(123)
    global_state = torch.random.get_rng_state()
    first = build_tiny_sd(seed=3)
    assert torch.equal(global_state, torch.random.get_rng_state())
    torch.manual_seed(456)
    _assert_same_weights(first.unet, build_tiny_sd(seed=3).unet)
    assert not torch.equal(first.unet.conv_in.weight, build_tiny_sd(seed=4).unet.conv_in.weight)
    norm = first.unet.down_blocks[0].resnets[0].norm1
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))  # norms are perturbed too
    assert not torch.allclose(norm.bias, torch.zeros_like(norm.bias))


def test_writing_to_an_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"model\.onnx.*'\.onnx'"):
        save_single_file(build_tiny_sd(), tmp_path / "model.onnx")


def test_saved_folder_is_a_diffusers_pipeline(tiny_sd_v1_files):
    index = json.loads((tiny_sd_v1_files.folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert ldm_state_dict(build_tiny_sd()).keys() == load_file(tiny_sd_v1_files.safetensors).keys()
