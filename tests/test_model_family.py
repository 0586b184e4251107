"""The model-family seam: SD 1.x/2.x offers every member of `ModelFamily`, and each member gives what
diffusers itself computes for the same model (embeddings, decoded image, latent sizes)."""

import inspect

import pytest
import torch

from library.families.family import ModelFamily
from library.testing.tiny_sd import build_tiny_sd
from networks.lora_cat.targets import text_encoder_targets, unet_targets


def _protocol_members() -> set[str]:
    own = set(vars(ModelFamily)) | set(inspect.get_annotations(ModelFamily))
    return {name for name in own if not name.startswith("_")}


@pytest.mark.parametrize("v2", [False, True])
def test_sd_offers_every_member_of_the_interface(v2):
    models = build_tiny_sd(seed=0, v2=v2)
    members = _protocol_members()
    assert {"unet", "vae", "noise_scheduler", "tokenize", "denoiser", "pipeline", "lora_layers"} <= members
    missing = sorted(name for name in members if not hasattr(models, name))
    assert not missing, f"StableDiffusionModels lacks {missing}"
    assert models.text_encoders == [models.text_encoder] and models.network_text_encoder is models.text_encoder
    assert models.model_version == ("sd_v2" if v2 else "sd_v1")


def test_latent_sizes_follow_the_vae_and_unet():
    models = build_tiny_sd(seed=0)
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    assert models.native_resolution == (models.unet.config.sample_size * factor,) * 2
    pixels = torch.zeros(1, 3, 64, 48)
    encoded = models.vae.encode(pixels).latent_dist.mean
    assert models.latent_shape(1, 48, 64) == tuple(encoded.shape)
    assert torch.equal(models.latents_from_vae(encoded), encoded * models.vae.config.scaling_factor)


def test_prompt_embeddings_are_the_pipelines_own():
    models = build_tiny_sd(seed=0)
    pipe = models.pipeline()
    ours = models.prompt_kwargs("a photo of sks teapot", "blurry")
    theirs, negative = pipe.encode_prompt("a photo of sks teapot", "cpu", 1, True, negative_prompt="blurry")
    assert torch.equal(ours["prompt_embeds"], theirs) and torch.equal(ours["negative_prompt_embeds"], negative)


def test_decoded_image_is_the_pipelines_own():
    models = build_tiny_sd(seed=0)
    pipe = models.pipeline()
    latents = torch.randn(1, *models.latent_shape(1, 64, 64)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        expected = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
        image = models.decode_image(latents)
    assert image.size == expected.size and image.tobytes() == expected.tobytes()


def test_lora_layers_are_the_adapters_targets_with_conv_blocks():
    models = build_tiny_sd(seed=0)
    layers = models.lora_layers()
    expected = unet_targets(models.unet, True) + text_encoder_targets(models.text_encoder)
    assert layers == {t.lora_name: t.module for t in expected}
    assert any(name.startswith("lora_unet_") for name in layers) and any(name.startswith("lora_te_") for name in layers)
