"""CAT's semantics, checked the same way on every model family through the `ModelFamily` seam:
the reference is the base model with every adapter off (a separately built copy gives it bitwise),
all three predictions share z_t, t and the image conditioning, no gradient reaches the base
weights, and batched and sequential mode give the same gradients."""

import copy

import pytest
import torch

import networks.lora_cat as lora_cat
from library.cat.objective import CATBatch, base_prediction, cat_step
from library.families.family import ImageGeometry
from library.testing.tiny_flux import build_tiny_flux
from library.testing.tiny_sd import build_tiny_sd
from library.testing.tiny_sdxl import build_tiny_sdxl

FAMILIES = {"sd1": lambda: build_tiny_sd(seed=0), "sdxl": lambda: build_tiny_sdxl(seed=0),
            "flux": lambda: build_tiny_flux(seed=0)}
# FLUX.1's T5 is adapted only when asked (sd-scripts' train_t5xxl); here every text encoder is.
NETWORK_ARGS = {"flux": {"train_t5xxl": "True"}}
# Two training images of different sizes and crops: SDXL is told each one's numbers.
GEOMETRY = [ImageGeometry((96, 64), (16, 0), (64, 64)), ImageGeometry((64, 80), (0, 8), (64, 64))]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    models = FAMILIES[request.param]()
    pristine = copy.deepcopy(models)
    network = lora_cat.create_network(1.0, 4, 4.0, models.vae, models.network_text_encoder, models.unet,
                                      **NETWORK_ARGS.get(request.param, {}))
    network.apply_to(models.network_text_encoder, models.unet)
    network.prepare_grad_etc(models.network_text_encoder, models.unet)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a LoRA some steps into training: up weights non-zero
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.05)
    return models, pristine, network


def _batch(models) -> CATBatch:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(models.latent_shape(2, 64, 64), generator=generator)
    return CATBatch(
        noisy_latents=latents, timesteps=torch.tensor([100, 900]), target=torch.randn(latents.shape, generator=generator),
        trigger_ids=models.tokenize(["a photo of sks teapot", "sks, on a table"]),
        free_ids=models.tokenize(["a photo of teapot", "on a table"]),
        weights=torch.tensor([1.0, 0.5]), conditioning=models.image_conditioning(GEOMETRY),
    )


def _mse(prediction, target):
    return (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))


def _gradients(models, network, batch, mode):
    network.zero_grad(set_to_none=True)
    cat_step(models.denoiser(), network, batch, 1.5, mode, _mse, lambda loss, last: loss.backward())
    return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}


def test_reference_is_the_separately_built_base_model_under_the_same_conditioning(family):
    models, pristine, network = family
    network.set_multiplier(0.7)
    batch = _batch(models)
    reference = base_prediction(models.denoiser(), network, batch)
    base = pristine.denoiser()
    with torch.no_grad():
        expected = base.predict(batch.noisy_latents, batch.timesteps, base.encode(batch.free_ids), **batch.conditioning)
        adapted = models.denoiser().predict(batch.noisy_latents, batch.timesteps,
                                            models.denoiser().encode(batch.free_ids), **batch.conditioning)
    assert torch.equal(reference, expected) and not reference.requires_grad
    assert not torch.allclose(adapted, expected), "adapters on must differ, or the test proves nothing"
    assert network.multiplier == 0.7


def test_the_image_conditioning_reaches_the_prediction(family):
    models, pristine, _ = family
    batch = _batch(models)
    base = pristine.denoiser()
    other = {name: value * 2 for name, value in batch.conditioning.items()}
    with torch.no_grad():
        told = base.predict(batch.noisy_latents, batch.timesteps, base.encode(batch.free_ids), **batch.conditioning)
        told_other = base.predict(batch.noisy_latents, batch.timesteps, base.encode(batch.free_ids), **other)
    if batch.conditioning:  # SDXL's size/crop numbers, FLUX.1-dev's guidance: they change the prediction
        assert not torch.allclose(told, told_other)
    else:
        assert torch.equal(told, base.predict(batch.noisy_latents, batch.timesteps, base.encode(batch.free_ids)))


def test_batched_and_sequential_give_the_same_gradients_and_none_reach_the_base(family):
    models, _, network = family
    batch = _batch(models)
    batched, sequential = _gradients(models, network, batch, "batched"), _gradients(models, network, batch, "sequential")
    assert batched.keys() == sequential.keys()
    # SDXL reads TE1's penultimate layer, so the adapters of its last layer get no gradient (as in sd-scripts).
    unused = _unused_text_encoder_layer(models)
    expected = {f"{lora.lora_name}.{part}.weight" for lora in network.all_loras for part in ("lora_down", "lora_up")
                if not (unused and lora.lora_name.startswith(unused))}
    assert set(batched) == expected
    for name in batched:
        torch.testing.assert_close(batched[name], sequential[name], atol=1e-5, rtol=1e-4)
    base = [p for model in (models.unet, models.vae, *models.text_encoders) for p in model.parameters()]
    assert all(p.grad is None for p in base)


def _unused_text_encoder_layer(models) -> str | None:
    """The name prefix of TE1's last layer for SDXL (its output is not used), None for SD and FLUX.1
    (whose CLIP-L gives its pooled output, after the last layer)."""
    if not hasattr(models, "text_encoder_2"):
        return None
    last = models.text_encoders[0].config.num_hidden_layers - 1
    return f"lora_te1_text_model_encoder_layers_{last}_"


def test_every_text_encoder_is_adapted(family):
    models, _, network = family
    for index, text_encoder in enumerate(models.text_encoders):
        adapted = {id(lora.org_module[0]) for lora in network.text_encoder_loras}
        layers = [m for m in text_encoder.modules() if isinstance(m, torch.nn.Linear)]
        assert any(id(layer) in adapted for layer in layers), f"text encoder {index + 1} has no adapter"
