"""CAT semantics on the tiny SD model: reference = base model with every adapter off, same z_t and t,
no gradients through it; batched == sequential; alpha 0 == plain LoRA with no extra pass."""

import copy

import pytest
import torch

import networks.lora_cat as lora_cat
from library.cat.objective import CATBatch, base_prediction, cat_step, preservation_loss
from library.cli.train_args import parse_args
from library.families.sd.denoiser import SDDenoiser
from library.families.sd.models import load
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.training.trainer import setup


class CountingDenoiser(SDDenoiser):
    """SDDenoiser that counts U-Net calls and the samples they saw."""

    def __init__(self, unet, text_encoder):
        super().__init__(unet, text_encoder)
        self.predict_calls = []

    def predict(self, noisy_latents, timesteps, text_states):
        self.predict_calls.append(noisy_latents.shape[0])
        return super().predict(noisy_latents, timesteps, text_states)


def _mse(prediction, target):
    return (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))


def _setup(seed=0, trained=True):
    sd = build_tiny_sd(seed=seed)
    pristine = copy.deepcopy(sd)
    network = lora_cat.create_network(1.0, 4, 4.0, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet)
    network.prepare_grad_etc(sd.text_encoder, sd.unet)
    if trained:  # a LoRA some steps into training: up weights non-zero
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for lora in network.all_loras:
                lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.05)
    return sd, pristine, network


def _batch(sd, same_captions=False):
    gen = torch.Generator().manual_seed(11)
    cfg = sd.unet.config
    tok = sd.tokenizer
    trigger = tok(["a photo of sks teapot", "sks, on a table"], padding="max_length", return_tensors="pt").input_ids
    free = trigger if same_captions else tok(["a photo of teapot", "on a table"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    return CATBatch(
        noisy_latents=latents,
        timesteps=torch.tensor([100, 900]),
        target=torch.randn(latents.shape, generator=gen),
        trigger_ids=trigger,
        free_ids=free,
        weights=torch.tensor([1.0, 0.5]),
    )


def _run(sd, network, batch, alpha, mode, denoiser=None):
    network.zero_grad(set_to_none=True)
    denoiser = denoiser or SDDenoiser(sd.unet, sd.text_encoder)
    losses = cat_step(denoiser, network, batch, alpha, mode, _mse, lambda loss, last: loss.backward())
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    return losses, grads


def test_reference_is_the_separately_loaded_base_model():
    sd, pristine, network = _setup()
    network.set_multiplier(0.7)
    batch = _batch(sd)
    reference = base_prediction(SDDenoiser(sd.unet, sd.text_encoder), network, batch)
    with torch.no_grad():
        expected = pristine.unet(batch.noisy_latents, batch.timesteps, pristine.text_encoder(batch.free_ids).last_hidden_state).sample
        adapted = sd.unet(batch.noisy_latents, batch.timesteps, sd.text_encoder(batch.free_ids).last_hidden_state).sample
    assert torch.equal(reference, expected)
    assert not torch.allclose(adapted, expected), "adapters on must differ, or the test proves nothing"
    assert not reference.requires_grad
    assert network.multiplier == 0.7 and all(l.multiplier == 0.7 for l in network.all_loras)


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "zero-init"])
def test_batched_and_sequential_give_the_same_gradients(trained):
    sd, _, network = _setup(trained=trained)
    batch = _batch(sd)
    batched_losses, batched = _run(sd, network, batch, 1.5, "batched")
    sequential_losses, sequential = _run(sd, network, batch, 1.5, "sequential")
    assert batched.keys() == sequential.keys() and len(batched) == 2 * len(network.all_loras)
    for name in batched:
        torch.testing.assert_close(batched[name], sequential[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched_losses.total, sequential_losses.total, atol=1e-6, rtol=1e-5)
    if trained:
        assert batched_losses.cat > 0


def test_alpha_zero_is_plain_lora_with_no_extra_pass():
    sd, _, network = _setup()
    batch = _batch(sd)
    counting = CountingDenoiser(sd.unet, sd.text_encoder)
    losses, grads = _run(sd, network, batch, 0.0, "batched", counting)
    assert counting.predict_calls == [2], "one U-Net call on the batch, no reference pass"
    network.zero_grad(set_to_none=True)
    plain = _mse(sd.unet(batch.noisy_latents, batch.timesteps, sd.text_encoder(batch.trigger_ids).last_hidden_state).sample, batch.target)
    (plain * batch.weights).mean().backward()
    for name, p in network.named_parameters():
        assert torch.equal(grads[name], p.grad), name
    assert losses.cat == 0 and losses.total == losses.main


def test_cat_term_is_the_squared_distance_to_the_base_on_the_free_caption():
    sd, pristine, network = _setup()
    batch = _batch(sd)
    losses, _ = _run(sd, network, batch, 2.0, "sequential")
    with torch.no_grad():
        base = pristine.unet(batch.noisy_latents, batch.timesteps, pristine.text_encoder(batch.free_ids).last_hidden_state).sample
        adapted = sd.unet(batch.noisy_latents, batch.timesteps, sd.text_encoder(batch.free_ids).last_hidden_state).sample
        on_trigger = sd.unet(batch.noisy_latents, batch.timesteps, sd.text_encoder(batch.trigger_ids).last_hidden_state).sample
    expected_cat = (preservation_loss(adapted, base) * batch.weights).mean()
    expected_main = (_mse(on_trigger, batch.target) * batch.weights).mean()
    torch.testing.assert_close(losses.cat, expected_cat, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses.main, expected_main, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses.total, expected_main + 2.0 * expected_cat, atol=1e-6, rtol=1e-5)


def test_trigger_free_caption_gives_pure_preservation():
    sd, _, network = _setup(trained=False)  # zero-initialised up: adapted == base
    losses, _ = _run(sd, network, _batch(sd, same_captions=True), 1.0, "batched")
    # Zero, up to the rounding of one U-Net call on 2B samples against one on B (thread-count dependent).
    assert losses.cat < 1e-10
    sd, _, network = _setup(trained=True)
    losses, grads = _run(sd, network, _batch(sd, same_captions=True), 1.0, "batched")
    assert losses.cat > 0


class RecordingDenoiser(SDDenoiser):
    """SDDenoiser that keeps every tensor it returns, before anyone can detach it."""

    def __init__(self, unet, text_encoder):
        super().__init__(unet, text_encoder)
        self.outputs = []

    def encode(self, input_ids):
        self.outputs.append(super().encode(input_ids))
        return self.outputs[-1]

    def predict(self, noisy_latents, timesteps, text_states):
        self.outputs.append(super().predict(noisy_latents, timesteps, text_states))
        return self.outputs[-1]


def _trainer_run(tmp_path, *extra):
    """The models and network exactly as `trainer.setup` prepares them for training (real loader, real
    `build_network`): nothing here touches requires_grad."""
    save_single_file(build_tiny_sd(seed=0), tmp_path / "tiny.safetensors")
    write_demo_dataset(tmp_path / "data")
    config = parse_args([
        "--pretrained_model_name_or_path", str(tmp_path / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(tmp_path / "data" / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(tmp_path / "out"), "--network_dim", "4", "--network_alpha", "4", "--cat_trigger", "sks",
        "--max_data_loader_n_workers", "0", "--seed", "0", *extra,
    ])
    return setup(config, load)


@pytest.mark.parametrize("extra", [(), ("--gradient_checkpointing",)], ids=["plain", "checkpointing"])
def test_no_gradient_reaches_the_base_weights(tmp_path, extra):
    run = _trainer_run(tmp_path, *extra)
    models, network = run.models, run.network
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a LoRA some steps into training: every adapter parameter gets a gradient
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.05)
    base = [(f"{part}.{name}", p) for part, model in (("unet", models.unet), ("text_encoder", models.text_encoder),
                                                        ("vae", models.vae)) for name, p in model.named_parameters()]
    own = {id(p) for p in network.parameters()}
    assert base and not any(id(p) in own for _, p in base), "the network holds no base parameter"
    for mode in ("batched", "sequential"):
        network.zero_grad(set_to_none=True)
        cat_step(models.denoiser(), network, _batch(models), 1.0, mode, _mse, lambda loss, last: loss.backward())
        assert [name for name, p in base if p.grad is not None] == [], mode
        assert [n for n, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == [], mode


def test_reference_pass_builds_no_graph_even_when_the_base_requires_grad():
    sd, _, network = _setup()
    sd.unet.requires_grad_(True)  # deliberately: only the no-grad guard can keep the graph away now
    sd.text_encoder.requires_grad_(True)
    recording = RecordingDenoiser(sd.unet, sd.text_encoder)
    reference = base_prediction(recording, network, _batch(sd))
    assert len(recording.outputs) == 2, "one text-encoder pass and one U-Net pass"
    for output in (*recording.outputs, reference):
        assert not output.requires_grad and output.grad_fn is None
    assert network.multiplier == 1.0


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_gradient_checkpointing_changes_no_gradient(mode):
    sd, _, network = _setup()
    batch = _batch(sd)
    sd.unet.train()
    _, plain = _run(sd, network, batch, 1.0, mode)
    sd.unet.enable_gradient_checkpointing()
    network.enable_gradient_checkpointing()
    _, checkpointed = _run(sd, network, batch, 1.0, mode)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)
