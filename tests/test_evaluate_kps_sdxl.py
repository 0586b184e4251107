"""`evaluate_kps.py` on the tiny SDXL with an SDXL LoRA trained by `sdxl_train_network_cat.py`: the family
comes from the checkpoint, LoRAs of the other family are refused before sampling."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import evaluate_kps
import networks.lora_cat as lora_cat
import sdxl_train_network_cat
from library.config.training_script import SD_SCRIPT, SDXL_SCRIPT
from library.errors import UserInputError
from library.evaluation.kps_metrics import SIMILARITY_FLOOR
from library.families import detect
from library.families.sdxl.models import load_sdxl
from library.testing.tiny_clip import TINY_CLIP_CONFIG, save_tiny_open_clip
from library.testing.tiny_sd import (
    build_tiny_sd,
    save_diffusers_folder,
    save_single_file,
    tiny_config_dir,
)
from library.testing.tiny_sdxl import (
    TINY_SDXL_CONFIG,
    build_tiny_sdxl,
    save_sdxl_diffusers_folder,
    save_sdxl_single_file,
    sgm_state_dict,
)

CAPTIONS = ["a photo of sks teapot", "sks teapot on a table"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny SDXL and SD as single files, two captioned images, an SDXL LoRA trained on them (text encoders
    included), a random SD LoRA, tiny CLIP weights."""
    root = tmp_path_factory.mktemp("kps_sdxl")
    save_sdxl_single_file(build_tiny_sdxl(seed=0), root / "tiny_sdxl.safetensors")
    folder = root / "train" / "1_sks teapot"
    folder.mkdir(parents=True)
    for index, (caption, color) in enumerate(zip(CAPTIONS, ("red", "blue"))):
        Image.new("RGB", (64, 64), color).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption + "\n")
    # A large learning rate: three steps must change the images enough to show in 8-bit pixels.
    assert sdxl_train_network_cat.main([
        "--pretrained_model_name_or_path", str(root / "tiny_sdxl.safetensors"), "--model_config", str(TINY_SDXL_CONFIG),
        "--train_data_dir", str(root / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(root), "--output_name", "sdxl_cat", "--network_dim", "4", "--learning_rate", "5e-2",
        "--max_train_steps", "3", "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0",
    ]) == 0
    sd = build_tiny_sd(seed=0)
    save_single_file(sd, root / "tiny_sd.safetensors")
    network = lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet)
    network.save_weights(root / "sd_lora.safetensors", torch.float32, {})
    save_tiny_open_clip(root / "clip.safetensors")
    return root


def _argv(workspace, out, *extra, lora=None, model="tiny_sdxl.safetensors", config=TINY_SDXL_CONFIG):
    return [
        "--pretrained_model_name_or_path", str(workspace / model), "--model_config", str(config),
        "--lora", str(lora or workspace / "sdxl_cat.safetensors"), "--trigger", "sks",
        "--train_data_dir", str(workspace / "train"), "--clip_model", str(TINY_CLIP_CONFIG),
        "--clip_pretrained", str(workspace / "clip.safetensors"), "--sample_steps", "3", "--seed", "3",
        "--device", "cpu", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def run(workspace):
    """One evaluation of the trained SDXL LoRA (2 prompts, 1 seed), recording what reached the SDXL pipeline."""
    calls, original = [], StableDiffusionXLPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        calls.append(kwargs)
        return original(pipe, *args, **kwargs)

    out = workspace / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionXLPipeline, "__call__", recording_call)
        assert evaluate_kps.main(_argv(workspace, out)) == 0
    return out, json.loads((out / "results.json").read_text()), calls


def test_the_sdxl_pipeline_samples_at_the_native_size_from_the_trainer_s_embeddings(workspace, run):
    _, results, calls = run
    models = load_sdxl(workspace / "tiny_sdxl.safetensors", model_config=TINY_SDXL_CONFIG)
    assert (results["settings"]["width"], results["settings"]["height"]) == models.native_resolution
    assert len(calls) == 8, "2 rows x 2 prompts x (y_T, y); the identity images are the y_T ones"
    assert all((kwargs["width"], kwargs["height"]) == models.native_resolution for kwargs in calls)
    # The base row's first image: the first caption, encoded by the family's own prompt_kwargs.
    with torch.no_grad():
        expected = models.prompt_kwargs(CAPTIONS[0], "")
    assert expected.keys() <= calls[0].keys()
    assert all(torch.equal(calls[0][name], expected[name]) for name in expected)
    # The LoRA row's (call 4): both text encoders' LoRA layers reached the pipeline through load_lora_weights.
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        assert not torch.allclose(calls[4][name], calls[0][name], atol=1e-4), name


def test_files_written_and_scores_within_their_ranges(run):
    out, results, _ = run
    assert (out / "results.md").read_text().count("\n") == 4, "header, separator, base model, one LoRA"
    size = results["settings"]["width"]
    with Image.open(out / "grid_sdxl_cat.png") as grid:
        assert grid.size == (3 * size, 14 + 2 * size), "3 columns, a label row, one row per prompt"
    assert results["images_generated"] == 8 and len(list((out / "images").glob("*.png"))) == 8
    assert set(results["scores"]) == {"base model", "sdxl_cat"}
    for scores in results["scores"].values():
        assert all(scores[name]["count"] == 2 for name in ("PS", "IS", "KPS"))
        assert SIMILARITY_FLOOR <= scores["PS"]["value"] <= 1 and SIMILARITY_FLOOR <= scores["IS"]["value"] <= 1
        assert 0 <= scores["KPS"]["value"] <= 1 - SIMILARITY_FLOOR


def _pixels(results, adapter):
    """{(role, prompt, seed): pixels} of one row's images."""
    return {(i["role"], i["prompt"], i["seed"]): np.asarray(Image.open(i["path"]), dtype=np.int16)
            for i in results["images"] if i["adapter"] == adapter}


def test_the_lora_changes_every_image_of_its_row(run):
    _, results, _ = run
    base, lora = _pixels(results, "base model"), _pixels(results, "sdxl_cat")
    assert base.keys() == lora.keys() and len(base) == 6
    assert all(np.abs(base[key] - lora[key]).mean() > 1 for key in base), "diffusers loaded the LoRA"


def test_clip_skip_is_not_used_by_sdxl_and_splits_no_cache(workspace, run):
    out, results, _ = run
    assert results["conditioning"]["sdxl_cat"] == {
        "clip_skip": None, "max_token_length": 75, "from": {"clip_skip": "not used by SDXL", "max_token_length": "default"},
    }
    assert evaluate_kps.main(_argv(workspace, out, "--clip_skip", "2")) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["images_generated"] == 0 and again["images_reused"] == 8
    assert again["scores"] == results["scores"]


def _fails_early(argv, match):
    with pytest.raises(UserInputError, match=match):
        evaluate_kps.evaluate(evaluate_kps.parse_args(argv))


def test_an_sd_lora_on_sdxl_is_refused_before_sampling(workspace, tmp_path):
    out = tmp_path / "out"
    _fails_early(_argv(workspace, out, lora=workspace / "sd_lora.safetensors"),
                 r"sd_lora\.safetensors is for Stable Diffusion 1\.x/2\.x \(it has layers such as lora_.*\), but the "
                 "base model is SDXL")
    assert not (out / "images").exists(), "nothing was generated"


def test_an_sdxl_lora_on_sd_is_refused_before_sampling(workspace, tmp_path):
    out = tmp_path / "out"
    argv = _argv(workspace, out, model="tiny_sd.safetensors", config=tiny_config_dir(False))
    _fails_early(argv, r"sdxl_cat\.safetensors is for SDXL \(it has layers such as lora_te1_.*\), but the base model "
                       r"is Stable Diffusion 1\.x/2\.x")
    assert not (out / "images").exists()


def test_v2_with_an_sdxl_model_is_refused(workspace, tmp_path):
    _fails_early(_argv(workspace, tmp_path / "out", "--v2"), "--v2 selects Stable Diffusion 2.x, but the model .* is SDXL")


# --- the family told by the checkpoint ---------------------------------------------------------------

def test_the_family_is_told_by_a_file_s_key_names_alone(workspace, monkeypatch):
    def no_full_read(*args, **kwargs):
        raise AssertionError("a safetensors checkpoint's header holds its key names")

    monkeypatch.setattr(detect, "read_state_dict", no_full_read)
    assert detect.detect_family(workspace / "tiny_sdxl.safetensors") == SDXL_SCRIPT
    assert detect.detect_family(workspace / "tiny_sd.safetensors") == SD_SCRIPT


def test_the_family_of_a_folder_and_of_a_pickled_checkpoint(tmp_path, monkeypatch):
    sdxl = build_tiny_sdxl(seed=0)
    assert detect.detect_family(save_sdxl_diffusers_folder(sdxl, tmp_path / "sdxl_folder")) == SDXL_SCRIPT
    assert detect.detect_family(save_diffusers_folder(build_tiny_sd(seed=0), tmp_path / "sd_folder")) == SD_SCRIPT
    with monkeypatch.context() as patch:  # a zip-format pickle is memory-mapped, not read whole
        patch.setattr(detect, "read_state_dict", lambda *args, **kwargs: pytest.fail("read whole"))
        assert detect.detect_family(save_sdxl_single_file(sdxl, tmp_path / "sdxl.ckpt")) == SDXL_SCRIPT
    # An old-format pickle cannot be memory-mapped: it is read whole instead.
    torch.save({"state_dict": sgm_state_dict(sdxl)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert detect.detect_family(tmp_path / "old.ckpt") == SDXL_SCRIPT


def test_a_damaged_checkpoint_is_named_by_the_checkpoint_reader(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="broken.safetensors could not be read as safetensors"):
        detect.detect_family(tmp_path / "broken.safetensors")
    with pytest.raises(UserInputError, match="nowhere.safetensors does not exist"):
        detect.detect_family(tmp_path / "nowhere.safetensors")
