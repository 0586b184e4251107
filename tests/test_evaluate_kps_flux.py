"""`evaluate_kps.py` with a FLUX.1 base model (BFL transformer file + --clip_l/--t5xxl/--ae): the family
comes from the checkpoint, the LoRA is loaded by diffusers' FluxPipeline, FLUX.1-dev is told its
guidance input. diffusers' kohya FLUX converter splits linear1 at FLUX.1's real width, so the
transformer is FLUX.1-wide (hidden 3072) with one block of each kind; the text encoders are tiny."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import evaluate_kps
import networks.lora_cat as lora_cat
from library.testing.tiny_clip import TINY_CLIP_CONFIG, save_tiny_open_clip
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_flux_wide, save_bfl_files
from library.testing.tiny_sd import build_tiny_sd

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """FLUX.1-wide model files, a FLUX LoRA (random, non-zero), an SD LoRA, a prompt file, tiny CLIP weights."""
    root = tmp_path_factory.mktemp("kps_flux")
    models = build_flux_wide(seed=0)
    models.transformer.to(torch.bfloat16)  # the file as released, bf16: 1 GB on disk instead of 2 (read back into float32)
    save_bfl_files(models, root)
    # The architecture folder: the tiny one with this transformer's config.
    shutil.copytree(TINY_FLUX_CONFIG, root / "config")
    models.transformer.save_config(root / "config" / "transformer")
    network = lora_cat.create_network(1.0, 4, 4, models.vae, models.network_text_encoder, models.unet)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(lora.lora_name)))
    network.save_weights(root / "flux_cat.safetensors", torch.float32, {})
    sd = build_tiny_sd(seed=0)
    lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet).save_weights(
        root / "sd_lora.safetensors", torch.float32, {})
    (root / "prompts.txt").write_text("a photo of sks teapot\n", encoding="utf-8")
    save_tiny_open_clip(root / "clip.safetensors")
    return root


def _argv(workspace, out, *extra, lora=None):
    return [
        "--pretrained_model_name_or_path", str(workspace / "flux1-dev.safetensors"), "--model_config", str(workspace / "config"),
        "--clip_l", str(workspace / "clip_l.safetensors"), "--t5xxl", str(workspace / "t5xxl.safetensors"),
        "--ae", str(workspace / "ae.safetensors"), "--t5xxl_max_token_length", "16",
        "--lora", str(lora or workspace / "flux_cat.safetensors"), "--trigger", "sks",
        "--prompt_file", str(workspace / "prompts.txt"), "--clip_model", str(TINY_CLIP_CONFIG),
        "--clip_pretrained", str(workspace / "clip.safetensors"), "--sample_steps", "2", "--seed", "3",
        "--width", "64", "--height", "64", "--device", "cpu", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def run(workspace):
    calls, original = [], FluxPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        calls.append(kwargs)
        return original(pipe, *args, **kwargs)

    out = workspace / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "__call__", recording_call)
        assert evaluate_kps.main(_argv(workspace, out)) == 0
    return out, json.loads((out / "results.json").read_text()), calls


def test_the_flux_pipeline_is_told_its_guidance_and_the_lora_changes_the_images(run):
    _, results, calls = run
    assert len(calls) == 4, "2 rows x 1 prompt x (y_T, y)"
    assert all(kwargs["guidance_scale"] == 3.5 for kwargs in calls), "FLUX.1-dev's guidance input, sd-scripts' 3.5"
    assert results["settings"]["guidance_scale"] == 3.5
    pixels = {(i["adapter"], i["role"]): np.asarray(Image.open(i["path"]), dtype=np.int16) for i in results["images"]}
    for role in ("with_trigger", "without_trigger"):
        assert np.abs(pixels[("base model", role)] - pixels[("flux_cat", role)]).mean() > 1, "diffusers loaded the LoRA"
    assert set(results["scores"]) == {"base model", "flux_cat"}


def test_a_lora_of_another_family_is_refused_before_sampling(workspace, tmp_path, capsys):
    assert evaluate_kps.main(_argv(workspace, tmp_path / "out", lora=workspace / "sd_lora.safetensors")) == 2
    assert "sd_lora.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()
