"""What only a CUDA device can show: the trainer's fp16 loss scaling with accelerate's own CUDA scaler,
bf16 and --full_fp16/--full_bf16, xformers against SDPA, bitsandbytes' 8-bit optimizers, and CAT's
semantics (batched = sequential gradients, the reference = the bare model) on CUDA kernels.

Marked `gpu` (`pytest -m gpu`, run by bench/gpu_check.sh) and skipped where CUDA is not available,
so the normal suite collects them and skips them on a CPU machine.
"""

import copy
import dataclasses
import importlib.util
import logging

import pytest
import torch

import library.training.trainer as trainer
import networks.lora_cat as lora_cat
import flux_train_network_cat
import sdxl_train_network_cat
import train_network_cat
from library.cat.objective import CATBatch, base_prediction, cat_step
from library.families.family import ImageGeometry
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_tiny_flux, save_bfl_files
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file
from library.training.optimizers import build_optimizer
from networks.lora_cat.file_format import read_lora_file

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    save_sdxl_single_file(build_tiny_sdxl(seed=0), root / "tiny_sdxl.safetensors")
    (root / "flux").mkdir()
    save_bfl_files(build_tiny_flux(seed=0), root / "flux")
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, out, *extra, sdxl=False):
    model = ("tiny_sdxl.safetensors", TINY_SDXL_CONFIG) if sdxl else ("tiny.safetensors", tiny_config_dir(False))
    return [
        "--pretrained_model_name_or_path", str(workspace / model[0]), "--model_config", str(model[1]),
        "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--max_train_steps", "3", "--train_batch_size", "2", "--seed", "3",
        "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", *extra,
    ]


@pytest.fixture
def seen(monkeypatch):
    """What each CAT step of the trainer ran on: (adapter device, adapter dtype, latents device)."""
    steps = []
    step = trainer.cat_step

    def recording(denoiser, network, batch, *args):
        parameter = next(network.parameters())
        steps.append((parameter.device.type, parameter.dtype, batch.noisy_latents.device.type))
        return step(denoiser, network, batch, *args)

    monkeypatch.setattr(trainer, "cat_step", recording)
    return steps


def _trained(path):
    tensors, _ = read_lora_file(path)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values()), "a LoRA tensor is NaN or infinite"
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k), "training did not move the adapters"
    return tensors


# --- the trainer on CUDA ----------------------------------------------------------------------------


def test_fp16_loss_scaling_skips_a_forced_overflow(workspace, tmp_path, monkeypatch, caplog, seen):
    """accelerate's CUDA GradScaler: an overflow at step 3 skips that update and halves the scale."""
    scales = []
    backward = trainer.Accelerator.backward

    def recording_backward(self, loss, **kwargs):
        scales.append(self.scaler.get_scale())
        return backward(self, loss, **kwargs)

    average, calls = trainer.average_gradients, {"n": 0}

    def overflowing(params, processes):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 3:
            params[0].grad.view(-1)[0] = float("inf")
        return average(params, processes)

    monkeypatch.setattr(trainer.Accelerator, "backward", recording_backward)
    monkeypatch.setattr(trainer, "average_gradients", overflowing)
    out = tmp_path / "out"
    argv = _argv(workspace, out, "--mixed_precision", "fp16", "--max_train_steps", "5", "--save_every_n_steps", "1",
                 "--max_grad_norm", "1.0")
    with caplog.at_level(logging.INFO, logger="library.training.trainer"):
        assert train_network_cat.main(argv) == 0
    assert seen and all(s == ("cuda", torch.float32, "cuda") for s in seen), seen[:1]
    assert any("step 3: fp16 gradients overflowed" in r.message for r in caplog.records)
    per_step = scales[0::2]  # sequential CAT: two backward passes per step
    assert per_step[3] == per_step[2] / 2, f"the scale after the overflow is not halved: {per_step}"
    files = {i: _trained(out / f"cat-step0000000{i}.safetensors") for i in (2, 3, 4)}
    assert all(torch.equal(files[2][k], files[3][k]) for k in files[2]), "the skipped step changed the LoRA"
    assert any(not torch.equal(files[3][k], files[4][k]) for k in files[3]), "the step after it did not train"


@pytest.mark.parametrize("precision, flags, adapter_dtype", [
    ("bf16", (), torch.float32),
    ("bf16", ("--full_bf16",), torch.bfloat16),
    ("fp16", ("--full_fp16",), torch.float16),
])
def test_mixed_precision_trains_on_cuda(workspace, tmp_path, seen, precision, flags, adapter_dtype):
    out = tmp_path / "out"
    assert train_network_cat.main(_argv(workspace, out, "--mixed_precision", precision, *flags)) == 0
    assert seen and all(s == ("cuda", adapter_dtype, "cuda") for s in seen), seen[:1]
    _trained(out / "cat.safetensors")


@pytest.mark.parametrize("flags", [(), ("--cat_mode", "batched")])
def test_sdxl_trains_in_bf16_on_cuda(workspace, tmp_path, seen, flags):
    out = tmp_path / "out"
    assert sdxl_train_network_cat.main(_argv(workspace, out, "--mixed_precision", "bf16", *flags, sdxl=True)) == 0
    assert seen and all(s == ("cuda", torch.float32, "cuda") for s in seen), seen[:1]
    _trained(out / "cat.safetensors")


@pytest.mark.parametrize("flags", [(), ("--cat_mode", "batched", "--gradient_checkpointing")])
def test_flux_trains_in_bf16_on_cuda(workspace, tmp_path, seen, flags):
    out, flux = tmp_path / "out", workspace / "flux"
    argv = _argv(workspace, out, "--mixed_precision", "bf16", "--pretrained_model_name_or_path",
                 str(flux / "flux1-dev.safetensors"), "--model_config", str(TINY_FLUX_CONFIG),
                 "--clip_l", str(flux / "clip_l.safetensors"), "--t5xxl", str(flux / "t5xxl.safetensors"),
                 "--ae", str(flux / "ae.safetensors"), "--model_prediction_type", "raw", *flags)
    assert flux_train_network_cat.main(argv) == 0
    assert seen and all(s == ("cuda", torch.float32, "cuda") for s in seen), seen[:1]
    _trained(out / "cat.safetensors")


# --- attention and optimizers -----------------------------------------------------------------------


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sdpa_and_xformers_give_the_same_outputs_and_gradients(family):
    from diffusers.models.attention_processor import AttnProcessor2_0

    models, _, network = _on_cuda(family, torch.float16)
    batch = _batch(models)
    denoiser = models.denoiser()

    def run():
        network.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            prediction = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids),
                                          **batch.conditioning)
        prediction.float().square().mean().backward()
        return prediction.float(), {n: p.grad.float().clone() for n, p in network.named_parameters() if p.grad is not None}

    models.unet.set_attn_processor(AttnProcessor2_0())
    sdpa, sdpa_grads = run()
    models.unet.enable_xformers_memory_efficient_attention()
    xformers, xformers_grads = run()
    torch.testing.assert_close(xformers, sdpa, atol=5e-3, rtol=5e-3)
    assert xformers_grads.keys() == sdpa_grads.keys()
    for name in sdpa_grads:
        scale = sdpa_grads[name].abs().max().item() + 1e-6
        torch.testing.assert_close(xformers_grads[name] / scale, sdpa_grads[name] / scale, atol=2e-2, rtol=0)


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed")
def test_the_trainer_uses_xformers_when_asked(workspace, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.trainer"):
        assert train_network_cat.main(_argv(workspace, tmp_path / "out", "--xformers", "--mixed_precision", "fp16")) == 0
    assert not [r.message for r in caplog.records if "--xformers unavailable" in r.message]
    _trained(tmp_path / "out" / "cat.safetensors")


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_8bit_optimizers_step_on_cuda(workspace, tmp_path, seen, name):
    out = tmp_path / "out"
    assert train_network_cat.main(_argv(workspace, out, "--optimizer_type", name, "--mixed_precision", "bf16")) == 0
    assert seen and seen[0][0] == "cuda"
    _trained(out / "cat.safetensors")
    # The trainer's LoRA layers are below bitsandbytes' 4096-element threshold for 8-bit state: check one above it.
    weight = torch.nn.Parameter(torch.randn(64, 128, device=CUDA))
    optimizer, _ = build_optimizer([{"params": [weight]}], name, 1e-3, {})
    before = weight.detach().clone()
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state1"].device.type == "cuda"
    assert not torch.equal(weight.detach(), before)


# --- CAT's semantics on CUDA kernels ----------------------------------------------------------------

FAMILIES = {"sd1": lambda: build_tiny_sd(seed=0), "sdxl": lambda: build_tiny_sdxl(seed=0),
            "flux": lambda: build_tiny_flux(seed=0)}
GEOMETRY = [ImageGeometry((96, 64), (16, 0), (64, 64)), ImageGeometry((64, 80), (0, 8), (64, 64))]


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) would make two equal computations differ by ~1e-3."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on_cuda(family: str, dtype=torch.float32):
    """The tiny model (frozen, in `dtype`) with a trained-looking LoRA, a pristine copy, on CUDA."""
    models = FAMILIES[family]()
    pristine = copy.deepcopy(models)
    network = lora_cat.create_network(1.0, 4, 4.0, models.vae, models.network_text_encoder, models.unet)
    network.apply_to(models.network_text_encoder, models.unet)
    network.prepare_grad_etc(models.network_text_encoder, models.unet)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # up weights non-zero, as some steps into training
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.05)
    for parts in (models, pristine):
        for model in (parts.unet, *parts.text_encoders):
            model.to(CUDA, dtype)
    network.to(CUDA)
    return models, pristine, network


def _batch(models) -> CATBatch:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(models.latent_shape(2, 64, 64), generator=generator)
    batch = CATBatch(
        noisy_latents=latents, timesteps=torch.tensor([100, 900]), target=torch.randn(latents.shape, generator=generator),
        trigger_ids=models.tokenize(["a photo of sks teapot", "sks, on a table"]),
        free_ids=models.tokenize(["a photo of teapot", "on a table"]),
        weights=torch.tensor([1.0, 0.5]), conditioning=models.image_conditioning(GEOMETRY),
    )
    moved = {f.name: getattr(batch, f.name).to(CUDA) for f in dataclasses.fields(batch) if f.name != "conditioning"}
    return dataclasses.replace(batch, **moved, conditioning={k: v.to(CUDA) for k, v in batch.conditioning.items()})


def _mse(prediction, target):
    return (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_and_sequential_give_the_same_gradients_on_cuda(family):
    models, _, network = _on_cuda(family)
    batch = _batch(models)

    def gradients(mode):
        network.zero_grad(set_to_none=True)
        cat_step(models.denoiser(), network, batch, 1.5, mode, _mse, lambda loss, last: loss.backward())
        return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}

    batched, sequential = gradients("batched"), gradients("sequential")
    assert batched.keys() == sequential.keys() and batched
    assert all(g.device.type == "cuda" for g in batched.values())
    for name in batched:
        torch.testing.assert_close(batched[name], sequential[name], atol=1e-5, rtol=1e-4)
    base = [p for model in (models.unet, *models.text_encoders) for p in model.parameters()]
    assert all(p.grad is None for p in base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_reference_is_the_bare_model_on_cuda(family, dtype):
    models, pristine, network = _on_cuda(family, dtype)
    network.set_multiplier(0.7)
    batch = _batch(models)
    base = pristine.denoiser()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        reference = base_prediction(models.denoiser(), network, batch)
        with torch.no_grad():
            expected = base.predict(batch.noisy_latents, batch.timesteps, base.encode(batch.free_ids), **batch.conditioning)
            adapted = models.denoiser().predict(batch.noisy_latents, batch.timesteps,
                                                models.denoiser().encode(batch.free_ids), **batch.conditioning)
    assert reference.device.type == "cuda" and not reference.requires_grad
    assert torch.equal(reference, expected), f"max difference {(reference - expected).abs().max().item():.3g}"
    assert not torch.allclose(adapted, expected), "adapters on must differ, or the test proves nothing"
    assert network.multiplier == 0.7


def test_cached_text_encoder_outputs_leave_the_encoders_on_the_cpu(workspace, tmp_path, monkeypatch):
    """With --cache_text_encoder_outputs the encoders leave the GPU after caching (SDXL's 8-10 GB recipe);
    sample images bring them back for the prompts and put them back on the CPU."""
    devices = []
    step = trainer.cat_step

    def recording(denoiser, network, batch, *args):
        devices.append(next(denoiser.denoiser.text_encoder_1.parameters()).device.type)
        return step(denoiser, network, batch, *args)

    monkeypatch.setattr(trainer, "cat_step", recording)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks teapot --w 64 --h 64 --s 2\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "--network_train_unet_only", "--cache_text_encoder_outputs",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", sdxl=True)
    assert sdxl_train_network_cat.main(argv) == 0
    assert devices == ["cpu"] * 3
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 1
