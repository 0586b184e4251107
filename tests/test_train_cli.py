"""`train_network_cat.py` end to end on the tiny model: files, names, metadata, diffusers, bad input."""

import copy

import pytest
import torch

import library.training.trainer as trainer
import networks.lora_cat as lora_cat
import train_network_cat
from library.testing.demo_data import write_demo_dataset
from networks.lora_cat.file_format import read_lora_file
from library.families.sd.models import load_stable_diffusion
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data", with_reg=True)
    return root


def _argv(workspace, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(workspace / "data" / "train"), "--reg_data_dir", str(workspace / "data" / "reg"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "cat",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "4",
        "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0",
        *extra,
    ]


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


def test_cat_weight_zero_is_bitwise_cat_switched_off(workspace, tmp_path):
    with_trigger = tmp_path / "a"
    without = tmp_path / "b"
    assert train_network_cat.main(_argv(workspace, with_trigger, "--cat_weight", "0")) == 0
    argv = _argv(workspace, without, "--cat_weight", "0")
    argv = argv[: argv.index("--cat_trigger")] + argv[argv.index("--cat_trigger") + 2 :]
    assert train_network_cat.main(argv) == 0
    a, _ = read_lora_file(with_trigger / "cat.safetensors")
    b, _ = read_lora_file(without / "cat.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
            return type(losses)(losses.main, losses.cat, torch.tensor(float("nan")))
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


@pytest.mark.parametrize(
    "extra",
    [
        ("--mixed_precision", "bf16"),
        ("--mixed_precision", "bf16", "--full_bf16"),
        ("--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--scale_weight_norms", "1.0"),
        ("--optimizer_type", "AdamW8bit", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.5"),
        ("--optimizer_type", "Lion8bit", "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99"),
        ("--v2", "--v_parameterization", "--zero_terminal_snr", "--min_snr_gamma", "5",
         "--scale_v_pred_loss_like_noise_pred"),
        ("--noise_offset", "0.1", "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.1",
         "--loss_type", "huber", "--huber_schedule", "exponential"),
        ("--clip_skip", "2", "--cat_mode", "batched", "--gradient_checkpointing", "--cache_latents"),
        ("--cat_caption", "class", "--network_args", "conv_dim=2", "conv_alpha=1", "loraplus_lr_ratio=4"),
        ("--cat_caption", "empty", "--xformers", "--min_timestep", "100", "--max_timestep", "900"),
        ("--max_token_length", "225", "--cat_mode", "batched"),
    ],
    ids=["bf16", "full_bf16", "accumulate-clip-maxnorm", "adamw8bit-cosine", "lion8bit-args", "v2-v-zsnr-minsnr",
         "noise-variants-huber", "clipskip-batched-checkpointing", "class-caption-locon-loraplus", "empty-xformers",
         "max_token_length"],
)
def test_training_options_run_end_to_end(workspace, tmp_path, extra):
    argv = _argv(workspace, tmp_path / "out", *extra)
    if "--v2" in extra:
        v2 = tmp_path / "tiny_v2.safetensors"
        save_single_file(build_tiny_sd(seed=0, v2=True), v2)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(v2)
        argv[argv.index("--model_config") + 1] = str(tiny_config_dir(True))
    assert train_network_cat.main(argv) == 0
    tensors, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k)


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


def test_network_weights_and_base_weights(workspace, tmp_path):
    first = tmp_path / "first"
    assert train_network_cat.main(_argv(workspace, first)) == 0
    lora = str(first / "cat.safetensors")
    argv = _argv(workspace, tmp_path / "continued", "--network_weights", lora, "--dim_from_weights",
                 "--base_weights", lora, "--base_weights_multiplier", "0.5", "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    assert (tmp_path / "continued" / "cat.safetensors").is_file()


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
