"""`train_network_cat.py` end to end on the tiny model: files, names, metadata, diffusers, bad input."""

import base64
import copy
import dataclasses

import pytest
import torch
from PIL import Image

import library.training.trainer as trainer
import networks.lora_cat as lora_cat
import train_network_cat
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from networks.lora_cat.file_format import read_lora_file
from library.families.sd.models import load_stable_diffusion
from library.testing.tiny_sd import tiny_config_dir



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_tiny_sd_workspace(tmp_path_factory.mktemp("cli"))


_argv = tiny_sd_argv


def test_files_names_and_metadata(workspace, tmp_path):
    out = tmp_path / "out"
    argv = _argv(workspace, out, "--save_every_n_steps", "1", "--save_last_n_steps", "2", "--cat_weight", "0.5",
                 "--max_train_steps", "5")
    assert train_network_cat.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    # sd-scripts' rule: saving step N removes step N-3 (older than the last 2 steps); the last step is saved too.
    assert names == [f"cat-step0000000{i}.safetensors" for i in (3, 4, 5)] + ["cat.safetensors"]
    tensors, metadata = read_lora_file(out / "cat.safetensors")
    assert metadata["ss_cat_weight"] == "0.5" and metadata["ss_cat_trigger"] == '["sks"]'
    assert metadata["ss_cat_caption"] == "strip" and metadata["ss_cat_mode"] in ("batched", "sequential")
    assert metadata["modelspec.trigger_phrase"] == "sks"
    assert metadata["ss_steps"] == "5" and metadata["ss_seed"] == "3"
    assert metadata["ss_network_module"] == "networks.lora_cat" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_num_reg_images"] == "2" and len(metadata["sshs_model_hash"]) == 64
    assert any(k.startswith("lora_te_text_model_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_up" in k), "training moved the adapters"


def test_diffusers_loads_the_trained_lora(workspace, tmp_path):
    out = tmp_path / "out"
    assert train_network_cat.main(_argv(workspace, out)) == 0
    path = out / "cat.safetensors"
    sd = load_stable_diffusion(workspace / "tiny.safetensors", model_config=tiny_config_dir(False))
    theirs = copy.deepcopy(sd)
    network, _ = lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet)
    network.load_weights(path)
    pipe = theirs.pipeline()
    pipe.load_lora_weights(str(path))
    ids = sd.tokenizer(["a photo of sks teapot"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sd.unet(latents, torch.tensor([300]), sd.text_encoder(ids).last_hidden_state).sample
        got = pipe.unet(latents, torch.tensor([300]), pipe.text_encoder(ids).last_hidden_state).sample
        with network.adapters_off():
            base = sd.unet(latents, torch.tensor([300]), sd.text_encoder(ids).last_hidden_state).sample
    assert (ours - base).abs().max() > 1e-6
    assert (ours - got).abs().max() < 1e-4


class _CountingDenoiser:
    """The trainer's denoiser, counting U-Net calls and the samples each one saw."""

    def __init__(self, denoiser):
        self.denoiser, self.sizes = denoiser, []

    def encode(self, input_ids):
        return self.denoiser.encode(input_ids)

    def predict(self, noisy_latents, timesteps, text_states):
        self.sizes.append(noisy_latents.shape[0])
        return self.denoiser.predict(noisy_latents, timesteps, text_states)


def test_cat_weight_zero_is_plain_lora_training(workspace, tmp_path, monkeypatch):
    """Every step of a --cat_weight 0 run (trigger given, mode sequential) is one U-Net call on the batch,
    no reference pass, the adapters never switched, and the gradients of the plain loss, written out here."""
    from library.cat import objective
    from networks.lora_cat.network import LoRANetwork

    real_step, real_reference, real_switch = trainer.cat_step, objective.base_prediction, LoRANetwork.set_multiplier
    references, switches, steps = [], [], []
    monkeypatch.setattr(objective, "base_prediction", lambda *args: references.append(args) or real_reference(*args))
    monkeypatch.setattr(LoRANetwork, "set_multiplier", lambda self, m: switches.append(m) or real_switch(self, m))

    def checked_step(denoiser, network, batch, alpha, mode, loss_fn, backward):
        assert all(p.grad is None for p in network.parameters()), "no accumulation: each step starts without gradients"
        counting = _CountingDenoiser(denoiser)
        switches.clear()
        losses = real_step(counting, network, batch, alpha, mode, loss_fn, backward)
        trained = {name: p.grad.clone() for name, p in network.named_parameters()}
        network.zero_grad(set_to_none=True)
        # Plain LoRA: the prediction on the training caption, its per-sample loss, weighted, averaged.
        prediction = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids))
        backward((loss_fn(prediction, batch.target) * batch.weights).mean(), True)
        for name, p in network.named_parameters():
            assert torch.equal(trained[name], p.grad), name
        steps.append((counting.sizes, list(switches), losses.cat.item()))
        return losses

    monkeypatch.setattr(trainer, "cat_step", checked_step)
    argv = _argv(workspace, tmp_path / "out", "--cat_weight", "0", "--cat_mode", "sequential")
    assert train_network_cat.main(argv) == 0
    assert steps == [([2], [], 0.0)] * 4, "per step one U-Net call on the batch of 2, no multiplier switch"
    assert references == []


def test_cat_changes_the_result(workspace, tmp_path):
    assert train_network_cat.main(_argv(workspace, tmp_path / "plain", "--cat_weight", "0")) == 0
    assert train_network_cat.main(_argv(workspace, tmp_path / "cat", "--cat_weight", "1")) == 0
    plain, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    cat, _ = read_lora_file(tmp_path / "cat" / "cat.safetensors")
    assert any(not torch.equal(plain[k], cat[k]) for k in plain)


def test_gui_style_config_file(workspace, tmp_path):
    out = tmp_path / "gui"
    config = tmp_path / "gui_config.toml"
    config.write_text(
        f"""
[model]
pretrained_model_name_or_path = "{workspace / 'tiny.safetensors'}"
model_config = "{tiny_config_dir(False)}"
[dataset]
train_data_dir = "{workspace / 'data' / 'train'}"
caption_extension = ".txt"
resolution = "64,64"
train_batch_size = 2
max_data_loader_n_workers = 0
enable_bucket = true
bucket_no_upscale = true
bucket_reso_steps = 64
min_bucket_reso = 32
max_bucket_reso = 2048
cache_latents = true
cache_latents_to_disk = true
flip_aug = false
[training]
output_dir = "{out}"
output_name = "gui"
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
learning_rate = 0.001
max_train_steps = 2
epoch = 1
stop_text_encoder_training = 0
cat_trigger = ["sks"]
""",
        encoding="utf-8",
    )
    assert train_network_cat.main(["--config_file", str(config)]) == 0
    assert (out / "gui.safetensors").is_file()


def test_interrupt_saves_a_file_that_says_so(workspace, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_step = trainer.cat_step

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "cat_step", interrupting_step)
    assert train_network_cat.main(_argv(workspace, tmp_path / "out")) == 130
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["cat-interrupted-step00000002.safetensors"]


def test_nan_loss_stops_and_keeps_earlier_files(workspace, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_step = trainer.cat_step

    def diverging_step(*args, **kwargs):
        calls["n"] += 1
        losses = real_step(*args, **kwargs)
        if calls["n"] == 3:
            return dataclasses.replace(losses, total=torch.tensor(float("nan")))
        return losses

    monkeypatch.setattr(trainer, "cat_step", diverging_step)
    out = tmp_path / "out"
    assert train_network_cat.main(_argv(workspace, out, "--save_every_n_steps", "1")) == 1
    assert "loss became nan" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cat-step00000001.safetensors", "cat-step00000002.safetensors"]


@pytest.mark.parametrize(
    "change, message",
    [
        (("--pretrained_model_name_or_path", "/nonexistent/model.safetensors"), "/nonexistent/model.safetensors"),
        (("--cat_trigger", "zzyzx"), "appears in none"),
        (("--cat_weight", "-1"), "--cat_weight"),
        (("--cat_weight", "nan"), "--cat_weight"),
        (("--network_module", "no_such.module"), "no_such.module"),
    ],
)
def test_bad_input_gets_a_sentence_and_keeps_files(workspace, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat.safetensors").write_bytes(b"an earlier LoRA")
    argv = _argv(workspace, out)
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += list(change)
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert (out / "cat.safetensors").read_bytes() == b"an earlier LoRA"


def test_conflicting_flags_and_unwritable_output(workspace, tmp_path, capsys):
    argv = _argv(workspace, tmp_path / "o", "--network_train_unet_only", "--network_train_text_encoder_only")
    assert train_network_cat.main(argv) == 2
    assert "--network_train_unet_only" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train_network_cat.main(_argv(workspace, blocker / "out")) == 2
    assert "--output_dir" in capsys.readouterr().err


def test_wrong_type_in_config_file_names_file_and_key(workspace, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[training]\nlearning_rate = "fast"\n', encoding="utf-8")
    assert train_network_cat.main(_argv(workspace, tmp_path / "o", "--config_file", str(config))) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "learning_rate" in err and "fast" in err


def test_resume_equals_uninterrupted(workspace, tmp_path):
    steps = ("--max_train_steps", "7", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--network_dropout", "0.1",
             "--shuffle_caption", "--keep_tokens", "1", "--caption_dropout_rate", "0.3")
    assert train_network_cat.main(_argv(workspace, tmp_path / "full", *steps)) == 0
    saving = _argv(workspace, tmp_path / "saving", *steps, "--save_state", "--save_every_n_steps", "3")
    assert train_network_cat.main(saving) == 0
    state = tmp_path / "saving" / "cat-step00000003-state"
    assert sorted(p.name for p in state.iterdir()) == [
        "lr_scheduler.pt", "network.safetensors", "optimizer.pt", "progress.json", "rng.pt"]
    resumed = _argv(workspace, tmp_path / "resumed", *steps, "--resume", str(state))
    assert train_network_cat.main(resumed) == 0
    full, _ = read_lora_file(tmp_path / "full" / "cat.safetensors")
    for run in ("saving", "resumed"):
        other, metadata = read_lora_file(tmp_path / run / "cat.safetensors")
        assert all(torch.equal(full[k], other[k]) for k in full), run
        assert metadata["ss_steps"] == "7"


def test_resume_state_that_does_not_fit_the_network(workspace, tmp_path, capsys):
    saving = _argv(workspace, tmp_path / "a", "--save_state", "--save_every_n_steps", "2")
    assert train_network_cat.main(saving) == 0
    argv = _argv(workspace, tmp_path / "b", "--resume", str(tmp_path / "a" / "cat-step00000002-state"), "--network_dim", "8")
    assert train_network_cat.main(argv) == 2
    assert "rank 4" in capsys.readouterr().err
    assert train_network_cat.main(_argv(workspace, tmp_path / "c", "--resume", str(tmp_path / "a"))) == 2
    assert "not a state folder" in capsys.readouterr().err


def test_unet_only_and_tensorboard_logging(workspace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    argv = _argv(workspace, tmp_path / "out", "--network_train_unet_only", "--log_with", "tensorboard",
                 "--logging_dir", str(logs))
    assert train_network_cat.main(argv) == 0
    tensors, _ = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert all(k.startswith("lora_unet_") for k in tensors)
    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/main", "loss/cat", "loss/total", "lr/unet"} <= tags
    assert len(events.Scalars("loss/total")) == 4


def test_network_weights_start_training_from_the_file(workspace, tmp_path):
    first = tmp_path / "first"
    assert train_network_cat.main(_argv(workspace, first)) == 0
    start, _ = read_lora_file(first / "cat.safetensors")
    # One step from the file, the text encoder's learning rate 0; --network_dim 8 is overridden by the file's 4.
    one_step = ("--max_train_steps", "1", "--text_encoder_lr", "0", "--network_dim", "8")
    argv = _argv(workspace, tmp_path / "continued", *one_step, "--network_weights", str(first / "cat.safetensors"),
                 "--dim_from_weights")
    assert train_network_cat.main(argv) == 0
    continued, _ = read_lora_file(tmp_path / "continued" / "cat.safetensors")
    assert train_network_cat.main(_argv(workspace, tmp_path / "fresh", *one_step[:4])) == 0
    fresh, _ = read_lora_file(tmp_path / "fresh" / "cat.safetensors")
    assert continued.keys() == start.keys() and all(continued[k].shape == start[k].shape for k in start)
    te = [k for k in start if k.startswith("lora_te_")]
    unet = [k for k in start if k.startswith("lora_unet_")]
    assert te and all(torch.equal(continued[k], start[k]) for k in te), "lr 0: exactly the file's weights"
    # One AdamW step moves each weight by at most the learning rate (plus weight decay): from the file.
    assert all((continued[k] - start[k]).abs().max() <= 1.01e-3 for k in unet)
    assert any(not torch.equal(continued[k], start[k]) for k in unet if "lora_up" in k), "the U-Net part trained"
    assert all(not torch.equal(continued[k], fresh[k]) for k in start if "lora_up" in k)
    assert all(fresh[k].abs().sum() == 0 for k in te if "lora_up" in k), "a fresh LoRA starts from zero"


def test_base_weights_are_merged_into_the_base_model(workspace, tmp_path, monkeypatch):
    from library.cat.objective import CATBatch, base_prediction

    assert train_network_cat.main(_argv(workspace, tmp_path / "first", "--learning_rate", "1e-2")) == 0
    lora = tmp_path / "first" / "cat.safetensors"
    runs = []
    real_loop = trainer.training_loop
    monkeypatch.setattr(trainer, "training_loop", lambda run: runs.append(run) or real_loop(run))
    argv = _argv(workspace, tmp_path / "continued", "--base_weights", str(lora), "--base_weights_multiplier", "0.5",
                 "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    (run,) = runs
    # The reference pass of that run (its own network off) against the bare model with the LoRA at 0.5.
    sd = load_stable_diffusion(workspace / "tiny.safetensors", model_config=tiny_config_dir(False))
    ids = sd.tokenizer(["a photo of teapot"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = CATBatch(noisy_latents=latents, timesteps=torch.tensor([300]), target=latents, trigger_ids=ids,
                     free_ids=ids, weights=torch.ones(1))
    reference = base_prediction(run.models.denoiser(), run.network, batch)
    network, _ = lora_cat.create_network_from_weights(0.5, lora, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet)
    network.load_weights(lora)
    expected = {}
    for multiplier in (0.0, 0.5, 1.0):
        network.set_multiplier(multiplier)
        with torch.no_grad():
            expected[multiplier] = sd.unet(latents, batch.timesteps, sd.text_encoder(ids).last_hidden_state).sample
    torch.testing.assert_close(reference, expected[0.5], atol=1e-5, rtol=1e-4)
    for other in (0.0, 1.0):
        assert (reference - expected[other]).abs().max() > 1e-3, f"the LoRA at {other} must differ, or this proves nothing"


def test_state_folders_are_pruned_like_files(workspace, tmp_path):
    out = tmp_path / "out"
    argv = _argv(workspace, out, "--save_state", "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                 "--max_train_steps", "5", "--save_state_on_train_end")
    assert train_network_cat.main(argv) == 0
    states = {p.name for p in out.iterdir() if p.is_dir()}
    assert states == {f"cat-step0000000{i}-state" for i in (3, 4, 5)} | {"cat-state"}


def test_result_does_not_depend_on_where_the_dataset_lives(workspace, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(workspace / "data", moved)
    assert train_network_cat.main(_argv(workspace, tmp_path / "a")) == 0
    argv = _argv(workspace, tmp_path / "b")
    argv[argv.index("--train_data_dir") + 1] = str(moved / "train")
    argv[argv.index("--reg_data_dir") + 1] = str(moved / "reg")
    assert train_network_cat.main(argv) == 0
    a, _ = read_lora_file(tmp_path / "a" / "cat.safetensors")
    b, _ = read_lora_file(tmp_path / "b" / "cat.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_windows_stay_inside_epochs(workspace, tmp_path):
    # 16 samples per epoch (8 training + 8 regularisation) in batches of 5: 4 batches, so with
    # accumulation 3 an epoch is 2 optimizer steps (3 batches + a short window of 1).
    argv = _argv(workspace, tmp_path / "out", "--train_batch_size", "5", "--gradient_accumulation_steps", "3",
                 "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--save_state")
    assert train_network_cat.main(argv) == 0
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["ss_steps"] == "4" and metadata["ss_max_train_steps"] == "4"
    _, first_epoch = read_lora_file(tmp_path / "out" / "cat-000001.safetensors")
    assert first_epoch["ss_steps"] == "2"
    resumed = _argv(workspace, tmp_path / "resumed", "--train_batch_size", "5", "--gradient_accumulation_steps", "3",
                    "--max_train_epochs", "2", "--resume", str(tmp_path / "out" / "cat-000001-state"))
    assert train_network_cat.main(resumed) == 0
    a, _ = read_lora_file(tmp_path / "out" / "cat.safetensors")
    b, _ = read_lora_file(tmp_path / "resumed" / "cat.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_caption_without_a_class_word_is_refused_at_start(tmp_path, workspace, capsys):
    data = tmp_path / "data" / "3_sks"
    data.mkdir(parents=True)
    for image in (workspace / "data" / "train" / "2_sks teapot").glob("*.png"):
        (data / image.name).write_bytes(image.read_bytes())
    argv = _argv(workspace, tmp_path / "out", "--cat_caption", "class")
    argv[argv.index("--train_data_dir") + 1] = str(tmp_path / "data")
    argv[argv.index("--reg_data_dir"): argv.index("--reg_data_dir") + 2] = []
    assert train_network_cat.main(argv) == 2
    assert "--cat_class_word" in capsys.readouterr().err


def test_mem_eff_attn_is_sdpa_and_wins_over_xformers(workspace, tmp_path, monkeypatch, caplog):
    # GUIs write mem_eff_attn = true: it trains, with PyTorch's SDPA (the default here), so the LoRA is the
    # default run's bit for bit; with --xformers too, sd-scripts' precedence leaves xformers off.
    enabled = []
    monkeypatch.setattr("diffusers.UNet2DConditionModel.enable_xformers_memory_efficient_attention",
                        lambda self, *args, **kwargs: enabled.append(True))
    assert train_network_cat.main(_argv(workspace, tmp_path / "sdpa")) == 0
    with caplog.at_level("INFO", logger="library.training.trainer"):
        assert train_network_cat.main(_argv(workspace, tmp_path / "mem", "--mem_eff_attn", "--xformers")) == 0
    assert not enabled and "--mem_eff_attn: PyTorch SDPA attention" in caplog.text
    sdpa, _ = read_lora_file(tmp_path / "sdpa" / "cat.safetensors")
    mem, _ = read_lora_file(tmp_path / "mem" / "cat.safetensors")
    assert sdpa.keys() == mem.keys() and all(torch.equal(sdpa[k], mem[k]) for k in sdpa)


def test_the_remaining_model_spec_metadata_flags(workspace, tmp_path, capsys):
    thumbnail = tmp_path / "thumb.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(thumbnail)
    argv = _argv(workspace, tmp_path / "out", "--metadata_usage_hint", "say sks teapot", "--metadata_thumbnail",
                 str(thumbnail), "--metadata_merged_from", "a, b", "--metadata_preprocessor", "none",
                 "--metadata_is_negative_embedding", "false", "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert (metadata["modelspec.usage_hint"], metadata["modelspec.merged_from"], metadata["modelspec.preprocessor"],
            metadata["modelspec.is_negative_embedding"]) == ("say sks teapot", "a, b", "none", "false")
    kind, data = metadata["modelspec.thumbnail"].split(",", 1)
    assert kind == "data:image/png;base64" and base64.b64decode(data) == thumbnail.read_bytes(), "as sd-scripts writes it"
    argv[argv.index("--metadata_thumbnail") + 1] = str(tmp_path / "missing.png")
    assert train_network_cat.main(argv) == 2
    assert "--metadata_thumbnail" in capsys.readouterr().err


def test_ddp_flags_and_refused_sd_scripts_flags(workspace, tmp_path, monkeypatch, capsys):
    handlers = []
    real_init = trainer.Accelerator.__init__

    def recording(self, *args, **kwargs):
        handlers.append(kwargs.get("kwargs_handlers"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Accelerator, "__init__", recording)
    argv = _argv(workspace, tmp_path / "out", "--ddp_timeout", "45", "--ddp_static_graph",
                 "--ddp_gradient_as_bucket_view", "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    (handler,) = handlers[0]
    assert handler.timeout.total_seconds() == 45 * 60, "--ddp_timeout: minutes, as sd-scripts passes it"
    refused = ("--torch_compile", "--deepspeed", "--fused_backward_pass", "--debug_dataset", "--cpu_offload_checkpointing")
    assert train_network_cat.main(_argv(workspace, tmp_path / "refused", *refused)) == 2
    error = capsys.readouterr().err
    assert all(f"{flag} (" in error for flag in refused) and "not implemented" in error
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").rglob("*.safetensors"))
