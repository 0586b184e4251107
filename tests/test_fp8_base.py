"""`--fp8_base` / `--fp8_base_unet` (library.training.fp8_weights): base weights stored in fp8 and
computed in the run's dtype, no full-precision weight copy kept for backward, the adapters' multiplier 0
still the (fp8) base model, and the flags end to end."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flux_train_network_cat
import networks.lora_cat as lora_cat
import train_network_cat
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_tiny_flux, save_bfl_files
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.training import trainer
from library.training.fp8_weights import FP8, store_in_fp8
from networks.lora_cat.file_format import read_lora_file


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(self.conv(x).mean(dim=(2, 3)))


def _reference(model: Small, fp8_weights: dict, x):
    """The same computation written out with the fp8-rounded weights upcast to x's dtype."""
    h = F.conv2d(x, fp8_weights["conv"].to(x.dtype), model.conv.bias.to(x.dtype), padding=1)
    return F.linear(h.mean(dim=(2, 3)), fp8_weights["linear"].to(x.dtype), model.linear.bias.to(x.dtype))


def test_weights_are_stored_in_fp8_and_computed_in_the_input_dtype():
    torch.manual_seed(0)
    model = Small().requires_grad_(False).to(torch.bfloat16)
    assert store_in_fp8(model) == 2
    assert model.conv.weight.dtype == FP8 and model.linear.weight.dtype == FP8 and model.linear.bias.dtype == torch.bfloat16
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = _reference(model, {"conv": model.conv.weight, "linear": model.linear.weight}, expected_x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, atol=1e-2, rtol=1e-2)


def test_no_full_precision_copy_of_a_weight_is_saved_for_backward():
    torch.manual_seed(0)
    model = Small().requires_grad_(False).to(torch.bfloat16)
    store_in_fp8(model)
    saved = []
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        model(x).float().sum().backward()
    weight_shapes = {tuple(model.conv.weight.shape), tuple(model.linear.weight.shape)}
    kept = [(dtype, shape) for dtype, shape in saved if shape in weight_shapes]
    assert kept and all(dtype == FP8 for dtype, _ in kept), kept


def test_adapters_off_is_the_fp8_base_model_and_the_adapters_train():
    sd = build_tiny_sd(seed=0)
    for part in (sd.unet, sd.text_encoder):
        part.to(torch.bfloat16)
        store_in_fp8(part)
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    ids = sd.tokenize(["a photo of sks teapot"])
    with torch.no_grad():
        denoiser = sd.denoiser()
        bare = denoiser.predict(latents, torch.tensor([500]), denoiser.encode(ids))
    network = lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet)
    network.prepare_grad_etc(sd.text_encoder, sd.unet)
    for lora in network.all_loras:
        nn.init.normal_(lora.lora_up.weight, std=0.05)
    with torch.no_grad(), network.adapters_off():
        off = denoiser.predict(latents, torch.tensor([500]), denoiser.encode(ids))
    assert torch.equal(off, bare)
    adapted = denoiser.predict(latents, torch.tensor([500]), denoiser.encode(ids))
    adapted.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in network.parameters())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    save_bfl_files(build_tiny_flux(seed=0), root)
    write_demo_dataset(root / "data")
    return root


def _argv(workspace, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(workspace / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", "--mixed_precision", "bf16", *extra,
    ]


def _weight_dtypes(monkeypatch) -> dict:
    """The dtypes of the models' Linear weights when training starts."""
    seen = {}
    loop = trainer.training_loop

    def recording(run):
        for name, model in (("unet", run.models.unet), *((f"te{i}", te) for i, te in enumerate(run.models.text_encoders))):
            seen[name] = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)}
        return loop(run)

    monkeypatch.setattr(trainer, "training_loop", recording)
    return seen


def test_fp8_base_trains_sd_with_cat(workspace, tmp_path, monkeypatch):
    seen = _weight_dtypes(monkeypatch)
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", "--fp8_base")) == 0
    assert seen == {"unet": {FP8}, "te0": {FP8}}
    tensors, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["ss_fp8_base"] == "True" and metadata["ss_fp8_base_unet"] == "False"
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_up" in k), "training moved the adapters"


def test_fp8_base_unet_keeps_flux_text_encoders_in_bf16(workspace, tmp_path, monkeypatch):
    seen = _weight_dtypes(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "--fp8_base_unet", "--model_prediction_type", "raw")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(workspace / "flux1-dev.safetensors")
    argv[argv.index("--model_config") + 1] = str(TINY_FLUX_CONFIG)
    argv += ["--clip_l", str(workspace / "clip_l.safetensors"), "--t5xxl", str(workspace / "t5xxl.safetensors"),
             "--ae", str(workspace / "ae.safetensors")]
    assert flux_train_network_cat.main(argv) == 0
    assert seen == {"unet": {FP8}, "te0": {torch.bfloat16}, "te1": {torch.bfloat16}}


def test_fp8_needs_mixed_precision(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(workspace, out, "--fp8_base")
    argv[argv.index("--mixed_precision") + 1] = "no"
    assert train_network_cat.main(argv) == 2
    assert "--fp8_base needs --mixed_precision bf16 or fp16" in capsys.readouterr().err
