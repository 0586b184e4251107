"""Training options end to end on the tiny model, each with the effect it must have.

Every run is the real `train_network_cat.main` with a few spies on the trainer's seams (the CAT step,
the batch builder, the noise, the VAE encode, the optimizer step): every option gets an assertion that
fails if the trainer ignored it, most of them against one shared baseline run with the same seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import train_network_cat
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_cli import tiny_sd_argv
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.training import train_batch, trainer
from networks.lora_cat.file_format import read_lora_file

BATCH = 2
STEPS = 4
LR = 1e-3
# Captions without the class word, so that --cat_caption class ("sks" -> "teapot") differs from strip.
CLASS_CAPTIONS = {
    "a photo of sks": "a photo of teapot",
    "sks on a table": "teapot on a table",
    "a close-up of sks, studio light": "a close-up of teapot, studio light",
    "sks in a kitchen": "teapot in a kitchen",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    save_single_file(build_tiny_sd(seed=0, v2=True), root / "tiny_v2.safetensors")
    write_demo_dataset(root / "data", with_reg=True)
    concept = root / "class_data" / "2_sks teapot"
    concept.mkdir(parents=True)
    for index, caption in enumerate(CLASS_CAPTIONS):
        (concept / f"{index:03d}.png").write_bytes((root / "data" / "train" / "2_sks teapot" / f"{index:03d}.png").read_bytes())
        (concept / f"{index:03d}.txt").write_text(caption, encoding="utf-8")
    return root


def _argv(workspace, out, *extra):
    return tiny_sd_argv(workspace, out, "--learning_rate", str(LR), "--max_train_steps", str(STEPS),
                        "--train_batch_size", str(BATCH), *extra)


# --- the spies --------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """What one training run did, seen from the trainer's seams."""

    run: Any = None  # the trainer's Run: models, network, optimizer, config
    denoiser: Any = None  # the denoiser the loop handed to the CAT step
    micro: list = field(default_factory=list)  # per CAT step call: U-Net batch sizes, dtypes, text lengths, grad norm
    steps: list = field(default_factory=list)  # per optimizer step: learning rates, grad norm before and after clipping
    batches: list = field(default_factory=list)  # per DiffusionNoising.batch call: its inputs and the CATBatch
    noise: list = field(default_factory=list)  # per sample_noise call: the noise, and the same draw without each option
    vae_encodes: int = 0  # VAE encodes during the loop (not the latent cache's)
    block_calls: dict = field(default_factory=lambda: {"unet": 0, "text_encoder": 0})  # calls of one adapted attention, U-Net and text encoder
    tensors: dict = field(default_factory=dict)  # the final LoRA file
    metadata: dict = field(default_factory=dict)

    @property
    def predict_calls(self) -> int:
        return sum(len(m["sizes"]) for m in self.micro)


def _grad_norm(params) -> float:
    grads = [p.grad.float().reshape(-1) for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


class _RecordingDenoiser:
    """Passes every call on to the trainer's denoiser and notes what the U-Net and text encoder returned."""

    def __init__(self, denoiser, note):
        self._denoiser, self._note = denoiser, note

    def encode(self, input_ids):
        states = self._denoiser.encode(input_ids)
        self._note["text_lengths"].append(states.shape[1])
        return states

    def predict(self, noisy_latents, timesteps, text_states):
        prediction = self._denoiser.predict(noisy_latents, timesteps, text_states)
        self._note["sizes"].append(noisy_latents.shape[0])
        self._note["dtypes"].add(prediction.dtype)
        return prediction


def _install_spies(monkeypatch, rec: Recorded) -> None:
    real_loop, real_cat_step, real_build = trainer.training_loop, trainer.cat_step, train_batch.DiffusionNoising.batch
    real_noise, real_encode = train_batch.sample_noise, trainer.encode

    def training_loop(run):
        rec.run = run
        network = run.network
        optimizer = run.optimizer.optimizer  # under accelerate's wrapper

        def before_step(opt, args, kwargs):
            rec.steps.append({"lrs": [g["lr"] for g in opt.param_groups], "clipped_norm": _grad_norm(network.parameters()),
                              "norm": rec.micro[-1]["grad_norm"]})

        optimizer.register_step_pre_hook(before_step)
        _count_block_forwards(run.models, rec.block_calls)
        return real_loop(run)

    def cat_step(denoiser, network, batch, alpha, mode, loss_fn, backward):
        rec.denoiser = denoiser
        note = {"sizes": [], "dtypes": set(), "text_lengths": [], "mode": mode}
        losses = real_cat_step(_RecordingDenoiser(denoiser, note), network, batch, alpha, mode, loss_fn, backward)
        note["grad_norm"] = _grad_norm(network.parameters())  # accumulated so far in this optimizer step
        rec.micro.append(note)
        return losses

    def build_cat_batch(noising, latents, trigger_ids, free_ids, loss_weights, noise_args, loss_args, generator=None,
                        **options):
        batch, loss_fn = real_build(noising, latents, trigger_ids, free_ids, loss_weights, noise_args, loss_args, generator,
                                    **options)
        rec.batches.append({"latents": latents, "trigger_ids": trigger_ids, "free_ids": free_ids,
                            "schedule": noising.schedule, "batch": batch, "loss_fn": loss_fn,
                            "loss_mask": options.get("loss_mask")})
        return batch, loss_fn

    def sample_noise(latents, **kwargs):
        # The same draw again without each option (then the stream is put back where training left it).
        generator = kwargs["generator"]
        before = generator.get_state()
        noise = real_noise(latents, **kwargs)
        after = generator.get_state()
        record = {"noise": noise}
        for option in ("noise_offset", "multires_noise_iterations"):
            generator.set_state(before)
            record["without_" + option] = real_noise(latents, **{**kwargs, option: None})
        generator.set_state(after)
        rec.noise.append(record)
        return noise

    def encode(*args, **kwargs):
        rec.vae_encodes += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(trainer, "training_loop", training_loop)
    monkeypatch.setattr(trainer, "cat_step", cat_step)
    monkeypatch.setattr(train_batch.DiffusionNoising, "batch", build_cat_batch)
    monkeypatch.setattr(train_batch, "sample_noise", sample_noise)
    monkeypatch.setattr(trainer, "encode", encode)


def _count_block_forwards(models, counts: dict) -> None:
    """Count the calls of the attention in the first U-Net transformer block and the first text-encoder
    layer (both carry adapters): gradient checkpointing calls them again during backward. The attention
    inside the checkpointed block, since a block's own hooks may be skipped by the recomputation, and
    pre-hooks, since the recomputation stops as soon as it has what backward needs."""
    from diffusers.models.attention import BasicTransformerBlock

    attentions = {
        "unet": next(m for m in models.unet.modules() if isinstance(m, BasicTransformerBlock)).attn1,
        "text_encoder": next(m for m in models.text_encoder.modules() if type(m).__name__ == "CLIPEncoderLayer").self_attn,
    }
    for name, attention in attentions.items():
        attention.register_forward_pre_hook(lambda module, args, name=name: counts.__setitem__(name, counts[name] + 1))


def _train(monkeypatch, argv) -> Recorded:
    rec = Recorded()
    with monkeypatch.context() as patch:
        _install_spies(patch, rec)
        assert train_network_cat.main(argv) == 0
    rec.block_calls = dict(rec.block_calls)  # what training did; the checks may call the models again
    out = argv[argv.index("--output_dir") + 1]
    rec.tensors, rec.metadata = read_lora_file(f"{out}/cat.safetensors")
    return rec


@pytest.fixture(scope="module")
def baseline(workspace, tmp_path_factory):
    """One run without any of the options (CAT sequential, fp32, AdamW, constant lr, l2)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _train(monkeypatch, _argv(workspace, tmp_path_factory.mktemp("baseline")))


# --- what an option must change -------------------------------------------------------------------


def _differs(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)


def _lora_norms(tensors: dict) -> dict[str, float]:
    """|scale * up @ down| of every layer in a LoRA file (what --scale_weight_norms bounds)."""
    norms = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up, alpha = tensors[name + ".lora_up.weight"].float(), float(tensors[name + ".alpha"])
            norms[name] = float((up.flatten(1) @ down.float().flatten(1)).norm()) * alpha / down.shape[0]
    return norms


def _captions(rec: Recorded, key: str, candidates) -> list[str | None]:
    """Which of `candidates` each sample's token ids (`trigger_ids` or `free_ids`) are; None for none of them."""
    by_ids = {tuple(ids.tolist()): text for text, ids in zip(candidates, rec.run.models.tokenize(list(candidates)))}
    return [by_ids.get(tuple(ids.tolist())) for b in rec.batches for ids in b[key]]


def _optimizer(rec: Recorded):
    return rec.run.optimizer.optimizer


def check_bf16(rec, base):
    assert rec.run.models.unet.dtype == torch.bfloat16, "the frozen U-Net is held in bf16"
    assert all(m["dtypes"] == {torch.bfloat16} for m in rec.micro), "the U-Net predicted in bf16"
    assert all(m["dtypes"] == {torch.float32} for m in base.micro)
    assert all(t.dtype == torch.float32 for t in rec.tensors.values()), "without --full_bf16 the adapters stay float32"
    assert _differs(rec.tensors, base.tensors)


def check_full_bf16(rec, base):
    assert all(m["dtypes"] == {torch.bfloat16} for m in rec.micro)
    assert all(p.dtype == torch.bfloat16 for p in rec.run.network.parameters()), "--full_bf16: the adapters train in bf16"
    assert all(t.dtype == torch.bfloat16 for t in rec.tensors.values()), "and are saved as they trained"


def check_accumulate_clip_maxnorm(rec, base):
    # --gradient_accumulation_steps 2: two batches (CAT steps) per optimizer step.
    assert len(rec.steps) == STEPS and len(rec.micro) == 2 * STEPS
    assert len(base.steps) == STEPS and len(base.micro) == STEPS
    # --max_grad_norm 0.1 (the default is 1.0): every step's gradient was clipped to it.
    assert all(s["clipped_norm"] <= 0.1 * (1 + 1e-4) for s in rec.steps)
    assert any(s["norm"] > 0.1 * 1.01 for s in rec.steps), "gradients this small prove no clipping"
    assert any(s["clipped_norm"] > 0.1 * 1.01 for s in base.steps)
    # --scale_weight_norms 0.01: no layer of the LoRA is longer than that.
    assert max(_lora_norms(rec.tensors).values()) <= 0.01 * (1 + 1e-4)
    assert max(_lora_norms(base.tensors).values()) > 0.01 * 1.01, "norms this small prove no scaling"


def check_adamw8bit_cosine(rec, base):
    import bitsandbytes

    assert type(_optimizer(rec)) is bitsandbytes.optim.AdamW8bit
    # cosine with a warmup of 0.5 * 4 = 2 steps: the lr each step used (the schedule starts at 0).
    expected = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 0.5))]
    groups = len(rec.steps[0]["lrs"])
    assert [lr for s in rec.steps for lr in s["lrs"]] == pytest.approx([LR * f for f in expected for _ in range(groups)], abs=1e-12)
    assert all(lr == LR for s in base.steps for lr in s["lrs"])


def check_lion8bit_args(rec, base):
    import bitsandbytes

    assert type(_optimizer(rec)) is bitsandbytes.optim.Lion8bit
    settings = [(g["weight_decay"], tuple(g["betas"])) for g in _optimizer(rec).param_groups]
    assert settings and all(setting == (0.01, (0.95, 0.98)) for setting in settings), settings


def check_v2_v_zsnr_minsnr(rec, base):
    models = rec.run.models
    assert models.v2 and rec.metadata["ss_v2"] == "True" and rec.metadata["ss_base_model_version"] == "sd_v2_v"
    loaded = models.noise_scheduler.alphas_cumprod.double()
    # --zero_terminal_snr (Lin et al. 2023, Algorithm 1): sqrt(abar) shifted to end at 0, first value kept.
    root = loaded.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    zsnr = root**2
    for seen, noise in zip(rec.batches, rec.noise):
        x0, eps, batch = seen["latents"].double(), noise["noise"].double(), seen["batch"]
        t = batch.timesteps
        a, s = zsnr[t].sqrt().view(-1, 1, 1, 1), (1 - zsnr[t]).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(batch.noisy_latents.double(), a * x0 + s * eps, atol=1e-5, rtol=1e-5)
        # --v_parameterization: the target is v, not the noise.
        torch.testing.assert_close(batch.target.double(), a * eps - s * x0, atol=1e-5, rtol=1e-5)
        # --min_snr_gamma 5 (v: min(snr, 5) / (snr + 1)) times --scale_v_pred_loss_like_noise_pred
        # (snr / (snr + 1)), both on the SNR of the schedule as loaded (sd-scripts).
        snr = loaded[t] / (1 - loaded[t])
        min_snr, like_noise = snr.clamp(max=5) / (snr + 1), snr / (snr + 1)
        torch.testing.assert_close(batch.weights.double(), min_snr * like_noise, atol=1e-6, rtol=1e-5)
        assert (min_snr < 0.99).all() and (like_noise < 0.99).all(), "each factor changes the weights"


def check_noise_variants_huber(rec, base):
    for seen, noise in zip(rec.batches, rec.noise):
        # --noise_offset 0.1 and --multires_noise_iterations 3 each change the noise.
        assert not torch.allclose(noise["noise"], noise["without_noise_offset"])
        assert not torch.allclose(noise["noise"], noise["without_multires_noise_iterations"])
        # --ip_noise_gamma 0.1: z_t carries gamma * N(0, 1) more noise than the target (Ning et al. 2023).
        batch, x0 = seen["batch"], seen["latents"]
        abar = seen["schedule"].train.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
        extra = (batch.noisy_latents - abar.sqrt() * x0) / (1 - abar).sqrt() - noise["noise"]
        assert 0.08 < float(extra.std()) < 0.12
        assert torch.equal(batch.target, noise["noise"])
        # --loss_type huber --huber_schedule exponential: c = exp(-a t), a = -ln(huber_c) / 1000 (huber_c 0.1).
        diff = torch.linspace(-2, 2, batch.target.numel()).view_as(batch.target)
        c = torch.exp(math.log(0.1) / 1000 * batch.timesteps.float()).view(-1, 1, 1, 1)
        expected = (2 * c * ((diff**2 + c**2).sqrt() - c)).flatten(1).mean(1)
        got = seen["loss_fn"](batch.target + diff, batch.target)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(n["noise"], n["without_noise_offset"]) for n in base.noise)


def check_clipskip_batched_checkpointing(rec, base):
    # --clip_skip 2: the text states are the second-to-last layer's, through the final layer norm.
    ids = rec.batches[0]["trigger_ids"]
    text_encoder = rec.run.models.text_encoder
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        expected = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden[-2])
        states = rec.denoiser.encode(ids)
        assert torch.equal(states, expected)
        assert not torch.allclose(states, text_encoder(ids).last_hidden_state)
    # --cat_mode batched: the reference on B samples, then both adapted passes in one call on 2B.
    assert all(m["mode"] == "batched" and m["sizes"] == [BATCH, 2 * BATCH] for m in rec.micro)
    assert all(m["sizes"] == [BATCH] * 3 for m in base.micro)
    # --gradient_checkpointing: the back-propagated pass runs the blocks again during backward.
    back_propagated = len(rec.micro)  # one per step in batched mode
    assert rec.block_calls == {"unet": rec.predict_calls + back_propagated, "text_encoder": 2 * len(rec.micro) + back_propagated}
    assert base.block_calls == {"unet": base.predict_calls, "text_encoder": 3 * len(base.micro)}
    # --cache_latents: the VAE encodes once before training, never in the loop.
    assert rec.vae_encodes == 0 and rec.run.latent_cache is not None
    assert base.vae_encodes == len(base.micro)


def check_class_caption_locon_loraplus(rec, base):
    # --cat_caption class: the trigger becomes the folder's class word; regularisation captions are kept.
    candidates = [*CLASS_CAPTIONS, *CLASS_CAPTIONS.values(), "teapot"]
    pairs = list(zip(_captions(rec, "trigger_ids", candidates), _captions(rec, "free_ids", candidates)))
    assert {caption for caption, _ in pairs} & set(CLASS_CAPTIONS), "the concept images were trained on"
    assert all(caption is not None and free == CLASS_CAPTIONS.get(caption, caption) for caption, free in pairs), pairs
    # --network_args conv_dim=2 conv_alpha=1: LoCon layers on the 3x3 convolutions.
    conv = {k: v for k, v in rec.tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[2:] == (3, 3)}
    assert conv and all(v.shape[0] == 2 and float(rec.tensors[k.replace("lora_down.weight", "alpha")]) == 1.0
                        for k, v in conv.items())
    assert not any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in base.tensors.values())
    # loraplus_lr_ratio=4 (LoRA+, Hayou et al. 2024): every up-projection learns 4x faster than its down.
    lr_of = {id(p): g["lr"] for g in _optimizer(rec).param_groups for p in g["params"]}
    for lora in rec.run.network.all_loras:
        assert lr_of[id(lora.lora_up.weight)] == pytest.approx(4 * lr_of[id(lora.lora_down.weight)]), lora.lora_name
    base_lr_of = {id(p): g["lr"] for g in _optimizer(base).param_groups for p in g["params"]}
    assert all(base_lr_of[id(l.lora_up.weight)] == base_lr_of[id(l.lora_down.weight)] for l in base.run.network.all_loras)


def check_empty_xformers(rec, base, caplog):
    # --cat_caption empty: the preservation term is computed on the unconditional prompt.
    assert set(_captions(rec, "free_ids", [""])) == {""} and "" not in _captions(base, "free_ids", [""])
    # --xformers: xformers attention where it is installed, else a warning that says it fell back.
    processors = {type(p).__name__ for p in rec.run.models.unet.attn_processors.values()}
    assert processors == {"XFormersAttnProcessor"} or "--xformers unavailable" in caplog.text
    # --min_timestep 100 --max_timestep 900 (the baseline, same seed, drew outside that range).
    timesteps = torch.cat([b["batch"].timesteps for b in rec.batches])
    assert ((timesteps >= 100) & (timesteps < 900)).all()
    base_timesteps = torch.cat([b["batch"].timesteps for b in base.batches])
    assert not ((base_timesteps >= 100) & (base_timesteps < 900)).all()


def check_max_token_length(rec, base):
    # --max_token_length 225: three 77-token windows per caption, joined into 227 text states.
    assert all(tuple(b["trigger_ids"].shape[1:]) == (3, 77) for b in rec.batches)
    assert all(set(m["text_lengths"]) == {227} for m in rec.micro)
    assert all(set(m["text_lengths"]) == {77} for m in base.micro)
    assert all(m["sizes"] == [BATCH, 2 * BATCH] for m in rec.micro)  # --cat_mode batched


OPTIONS = {
    "bf16": (("--mixed_precision", "bf16"), check_bf16),
    "full_bf16": (("--mixed_precision", "bf16", "--full_bf16"), check_full_bf16),
    # The tiny model's gradient norms (~0.2) and LoRA norms (< 0.04) stay below a clip of 0.5 and a max
    # norm of 1.0, which would then never bind; these values do.
    "accumulate-clip-maxnorm": (("--gradient_accumulation_steps", "2", "--max_grad_norm", "0.1",
                                 "--scale_weight_norms", "0.01"), check_accumulate_clip_maxnorm),
    "adamw8bit-cosine": (("--optimizer_type", "AdamW8bit", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.5"),
                         check_adamw8bit_cosine),
    "lion8bit-args": (("--optimizer_type", "Lion8bit", "--optimizer_args", "weight_decay=0.01", "betas=0.95,0.98"),
                      check_lion8bit_args),
    "v2-v-zsnr-minsnr": (("--v2", "--v_parameterization", "--zero_terminal_snr", "--min_snr_gamma", "5",
                          "--scale_v_pred_loss_like_noise_pred"), check_v2_v_zsnr_minsnr),
    "noise-variants-huber": (("--noise_offset", "0.1", "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.1",
                              "--loss_type", "huber", "--huber_schedule", "exponential"), check_noise_variants_huber),
    "clipskip-batched-checkpointing": (("--clip_skip", "2", "--cat_mode", "batched", "--gradient_checkpointing",
                                        "--cache_latents"), check_clipskip_batched_checkpointing),
    "class-caption-locon-loraplus": (("--cat_caption", "class", "--network_args", "conv_dim=2", "conv_alpha=1",
                                      "loraplus_lr_ratio=4"), check_class_caption_locon_loraplus),
    "empty-xformers": (("--cat_caption", "empty", "--xformers", "--min_timestep", "100", "--max_timestep", "900"),
                       check_empty_xformers),
    "max_token_length": (("--max_token_length", "225", "--cat_mode", "batched"), check_max_token_length),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_training_option_has_its_effect(workspace, tmp_path, monkeypatch, caplog, baseline, name):
    extra, check = OPTIONS[name]
    argv = _argv(workspace, tmp_path / "out", *extra)
    if "--v2" in extra:
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(workspace / "tiny_v2.safetensors")
        argv[argv.index("--model_config") + 1] = str(tiny_config_dir(True))
    if name.startswith("class-caption"):
        argv[argv.index("--train_data_dir") + 1] = str(workspace / "class_data")
    caplog.set_level(logging.WARNING, logger="library.training.trainer")
    rec = _train(monkeypatch, argv)
    assert len(rec.steps) == STEPS
    assert all(torch.isfinite(t).all() for t in rec.tensors.values())
    assert any(t.abs().sum() > 0 for k, t in rec.tensors.items() if "lora_up" in k)
    if name == "empty-xformers":
        check(rec, baseline, caplog)
    else:
        check(rec, baseline)
