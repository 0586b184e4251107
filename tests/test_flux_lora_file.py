"""Our FLUX.1 LoRA files load in diffusers (`FluxPipeline.load_lora_weights`, its kohya converter) and
give our transformer's output. diffusers' converter splits a single block's fused `linear1` at FLUX.1's
real width (3 x 3072 + 12288), so the transformer here is FLUX.1-wide (hidden 3072) with one block of
each kind; the text encoders are tiny."""

import pytest
import torch

import networks.lora_cat as lora_cat
from library.families.family import ImageGeometry
from library.testing.tiny_flux import build_flux_wide


@pytest.fixture(scope="module")
def models():
    return build_flux_wide(seed=0)


@torch.no_grad()
def test_diffusers_reproduces_our_flux_lora(models, tmp_path):
    network = lora_cat.create_network(1.0, 4, 2, models.vae, models.network_text_encoder, models.unet)
    network.apply_to(models.network_text_encoder, models.unet)
    generator = torch.Generator().manual_seed(2)
    for lora in network.all_loras:
        lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.02)
    file = tmp_path / "flux_lora.safetensors"
    network.save_weights(file, None, {})
    ids = models.tokenize(["a photo of sks teapot"])
    latents = torch.randn(models.latent_shape(1, 64, 64), generator=generator)
    t, conditioning = torch.tensor([600.0]), models.image_conditioning([ImageGeometry((64, 64), (0, 0), (64, 64))])

    def predict():
        denoiser = models.denoiser()
        return denoiser.predict(latents, t, denoiser.encode(ids), **conditioning)

    ours = predict()
    network.restore()
    base = predict()
    pipe = models.pipeline()
    pipe.load_lora_weights(str(file))
    theirs = predict()
    assert (ours - base).abs().max() > 1e-4, "the LoRA changes the prediction, or the test proves nothing"
    assert (ours - theirs).abs().max() < 1e-4
    text_layers = [name for name, _ in models.clip_l.named_modules() if "lora" in name]
    assert text_layers, "diffusers attached the CLIP-L (lora_te1) layers too"
