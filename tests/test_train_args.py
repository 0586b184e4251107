"""The command line and --config_file: sd-scripts' flags and precedence, CAT's flags, checked at parse time."""

import dataclasses
import logging
import math
from pathlib import Path

import pytest

from library.cli.checks import parse_key_values, parse_literal_args
from library.cli.config_file import GUI_KEYS
from library.cli.flags import build_parser
from library.cli.train_args import parse_args
from library.cli.unsupported import INERT_WITHOUT, NOT_IMPLEMENTED
from library.errors import UserInputError

BASE = ["--pretrained_model_name_or_path", "model.safetensors", "--train_data_dir", "data",
        "--output_dir", "out", "--resolution", "512", "--cat_trigger", "sks"]


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    """A config file in tmp_path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def without_file(config):
    """The configuration with its source file forgotten, to compare a file run with a flag run."""
    return dataclasses.replace(config, config_file=None)


# --- flags into dataclasses ---------------------------------------------------------------------


def test_defaults_are_sd_scripts_defaults():
    config = parse_args(BASE)
    assert config.optimizer.learning_rate == 2e-6
    assert config.optimizer.optimizer_type == "AdamW"
    assert config.optimizer.max_grad_norm == 1.0
    assert config.run.max_train_steps == 1600
    assert config.run.mixed_precision == "no"
    assert config.scheduler.lr_scheduler == "constant"
    assert config.network.alpha == 1.0 and config.network.dim is None
    assert config.data.caption_extension == ".caption"
    assert config.data.max_data_loader_n_workers == 8
    assert config.loss.huber_c == 0.1 and config.loss.huber_schedule == "snr"
    assert config.noise.multires_noise_discount == 0.3
    assert config.save.save_model_as == "safetensors"
    assert config.sample.sampler == "ddim"
    assert config.cat == dataclasses.replace(config.cat, weight=1.0, caption="strip", mode="sequential")


def test_flags_land_in_their_dataclasses():
    config = parse_args(BASE + [
        "--v2", "--v_parameterization", "--network_dim", "16", "--network_alpha", "8", "--learning_rate", "1e-4",
        "--unet_lr", "2e-4", "--text_encoder_lr", "5e-5", "--train_batch_size", "2", "--seed", "42",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--cat_weight", "0.5",
        "--cat_trigger", "sks", "my dog",
        "--cat_caption", "class", "--cat_class_word", "dog", "--cat_mode", "batched", "--min_snr_gamma", "5",
        "--resolution", "512,768", "--output_name", "lora", "--save_every_n_steps", "100", "--metadata_title", "T",
        "--metadata_trigger_phrase", "sks dog", "--model_config", "configs/models/sd_v2", "--noise_offset", "0.05",
    ])
    assert config.model.v2 and config.model.v_parameterization
    assert config.model.model_config == "configs/models/sd_v2"
    assert (config.network.dim, config.network.alpha) == (16, 8.0)
    assert (config.optimizer.learning_rate, config.optimizer.unet_lr, config.optimizer.text_encoder_lr) == (
        1e-4, 2e-4, 5e-5)
    assert config.data.train_batch_size == 2 and config.data.resolution == (512, 768)
    assert (config.run.seed, config.run.mixed_precision, config.run.gradient_checkpointing) == (42, "bf16", True)
    assert config.cat.weight == 0.5
    assert config.cat.triggers == ("sks", "my dog")
    assert (config.cat.caption, config.cat.class_word, config.cat.mode) == ("class", "dog", "batched")
    assert config.loss.min_snr_gamma == 5.0
    assert config.noise.noise_offset == 0.05
    assert (config.save.output_name, config.save.save_every_n_steps) == ("lora", 100)
    assert (config.metadata.title, config.metadata.trigger_phrase) == ("T", "sks dog")


def test_configuration_is_frozen():
    config = parse_args(BASE + ["--network_args", "conv_dim=4"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run.max_train_steps = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.network.args["conv_dim"] = "8"  # type: ignore[index]


def test_old_optimizer_switches_resolve_to_a_name():
    assert parse_args(BASE + ["--use_8bit_adam"]).optimizer.optimizer_type == "AdamW8bit"
    assert parse_args(BASE + ["--use_lion_optimizer"]).optimizer.optimizer_type == "Lion"
    assert parse_args(BASE + ["--optimizer_type", "Prodigy"]).optimizer.optimizer_type == "Prodigy"


def test_base_weight_multipliers_default_to_one_per_file():
    config = parse_args(BASE + ["--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "0.5"])
    assert config.network.base_weights == ("a.safetensors", "b.safetensors")
    assert config.network.base_weights_multiplier == (0.5, 1.0)


def test_old_caption_extention_spelling_still_works():
    assert parse_args(BASE + ["--caption_extention", ".txt"]).data.caption_extension == ".txt"


# --- the type=bool and type=int traps -------------------------------------------------------------


def test_cat_weight_is_a_float():
    assert parse_args(BASE + ["--cat_weight", "0.5"]).cat.weight == 0.5


def test_boolean_flags_take_no_value():
    with pytest.raises(UserInputError, match="unrecognized arguments: False"):
        parse_args(BASE + ["--gradient_checkpointing", "False"])


def test_toml_booleans_for_store_true_flags(tmp_path):
    on = write(tmp_path, "gradient_checkpointing = true\nflip_aug = false\n", "on.toml")
    config = parse_args(BASE + ["--config_file", str(on)])
    assert config.run.gradient_checkpointing is True
    assert config.data.flip_aug is False


def test_string_false_for_a_flag_is_refused(tmp_path):
    path = write(tmp_path, 'gradient_checkpointing = "false"\n')
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    message = str(err.value)
    assert str(path) in message and 'gradient_checkpointing = "false"' in message and "true or false" in message


def test_gui_writes_one_for_a_flag(tmp_path):
    path = write(tmp_path, "persistent_data_loader_workers = 1\n")
    assert parse_args(BASE + ["--config_file", str(path)]).data.persistent_data_loader_workers is True


def test_persistent_workers_need_workers(tmp_path, caplog):
    path = write(tmp_path, "persistent_data_loader_workers = 1\nmax_data_loader_n_workers = 0\n")
    with caplog.at_level(logging.WARNING):
        config = parse_args(BASE + ["--config_file", str(path)])
    assert config.data.persistent_data_loader_workers is False  # torch would refuse the pair
    assert any("no workers to keep" in r.getMessage() for r in caplog.records)


# --- --config_file --------------------------------------------------------------------------------


FILE_WITH_TABLES = """
[model]
pretrained_model_name_or_path = "model.safetensors"
v2 = true

[dataset]
train_data_dir = "data"
resolution = 512
train_batch_size = 2

[training]
output_dir = "out"
learning_rate = 1
network_dim = 8
network_args = ["conv_dim=4", "conv_alpha=1"]
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999"]
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
cat_trigger = ["sks"]
cat_weight = 0.5
"""

SAME_AS_FLAGS = [
    "--pretrained_model_name_or_path", "model.safetensors", "--v2", "--train_data_dir", "data", "--resolution", "512",
    "--train_batch_size", "2", "--output_dir", "out", "--learning_rate", "1", "--network_dim", "8",
    "--network_args", "conv_dim=4", "conv_alpha=1", "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999",
    "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1", "--cat_trigger", "sks", "--cat_weight", "0.5",
]


def test_file_with_tables_equals_the_same_flags(tmp_path):
    path = write(tmp_path, FILE_WITH_TABLES)
    from_file = parse_args(["--config_file", str(path)])
    assert from_file.config_file == path
    assert without_file(from_file) == parse_args(SAME_AS_FLAGS)
    assert isinstance(from_file.optimizer.learning_rate, float)  # TOML 1 is an int; the flag is a float
    assert from_file.data.resolution == (512, 512)  # TOML 512 for a text flag


def test_toml_is_appended(tmp_path):
    write(tmp_path, FILE_WITH_TABLES)
    config = parse_args(["--config_file", str(tmp_path / "run")])
    assert config.config_file == tmp_path / "run.toml"
    assert config.network.dim == 8


def test_command_line_overrides_file(tmp_path):
    path = write(tmp_path, FILE_WITH_TABLES)
    config = parse_args(["--config_file", str(path), "--network_dim", "32", "--cat_trigger", "ohwx"])
    assert config.network.dim == 32
    assert config.cat.triggers == ("ohwx",)
    assert config.data.train_batch_size == 2  # untouched keys still come from the file


def test_explicit_flag_equal_to_default_still_overrides_file(tmp_path):
    path = write(tmp_path, FILE_WITH_TABLES + "max_train_steps = 500\n")
    config = parse_args(["--config_file", str(path), "--learning_rate", "2e-6", "--max_train_steps", "1600"])
    assert config.optimizer.learning_rate == 2e-6
    assert config.run.max_train_steps == 1600


def test_file_overrides_defaults(tmp_path):
    path = write(tmp_path, FILE_WITH_TABLES)
    assert parse_args(["--config_file", str(path)]).scheduler.lr_scheduler == "cosine"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match=r"nothere\.toml.*does not exist"):
        parse_args(BASE + ["--config_file", str(tmp_path / "nothere")])


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, 'output_dir = "out"\nlearning_rate = 1e-4\noutput_name = my_lora\n')
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_windows_backslash_error_says_how_to_write_paths(tmp_path):
    path = write(tmp_path, 'vae = "D:\\train\\x1"\n')
    with pytest.raises(UserInputError, match="line 1.*Windows paths with / or in single quotes"):
        parse_args(BASE + ["--config_file", str(path)])
    path.write_text("vae = 'D:\\train\\x1'\n", encoding="utf-8")
    assert parse_args(BASE + ["--config_file", str(path)]).model.vae == "D:\\train\\x1"


def test_key_in_two_tables_names_both(tmp_path):
    path = write(tmp_path, "[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n")
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    assert "network_dim" in str(err.value) and "[a]" in str(err.value) and "[b]" in str(err.value)


def test_unknown_key_warns_with_its_name(tmp_path, caplog):
    path = write(tmp_path, "learning_rat = 1e-4\n")
    with caplog.at_level(logging.WARNING):
        parse_args(BASE + ["--config_file", str(path)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("learning_rat" in message and str(path) in message for message in warnings)


def test_gui_keys_do_not_warn(tmp_path, caplog):
    path = write(tmp_path, 'epoch = 10\nnoise_offset_type = "Original"\nstop_text_encoder_training = 0\n'
                           'lowvram = true\ndynamo_backend = "no"\nmax_token_length = 75\n')
    with caplog.at_level(logging.WARNING):
        config = parse_args(BASE + ["--config_file", str(path)])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {"epoch", "noise_offset_type", "stop_text_encoder_training"} <= set(GUI_KEYS)
    assert config.model.max_token_length is None  # the GUI's "75" is the default window


def test_top_level_loraplus_key_warns_how_to_use_it(tmp_path, caplog):
    path = write(tmp_path, "loraplus_lr_ratio = 16\n")
    with caplog.at_level(logging.WARNING):
        config = parse_args(BASE + ["--config_file", str(path)])
    assert any('network_args = ["loraplus_lr_ratio=16"]' in r.getMessage() for r in caplog.records)
    assert dict(config.network.args) == {}  # ignored, as sd-scripts ignores it


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('learning_rate = "abc"', 'learning_rate = "abc" is not a number'),
        ("max_train_steps = 1.5", "max_train_steps = 1.5 is not a whole number"),
        ('network_args = true', 'network_args = true is not a list of strings'),
        ('mixed_precision = "fp32"', 'mixed_precision = "fp32" is not one of "no", "fp16", "bf16"'),
        ("network_dim = true", "network_dim = true is not a whole number"),
        ("resolution = [512, 512]", "resolution = [512, 512] is not a string"),
        ('lr_warmup_steps = "1.5"', "lr_warmup_steps = \"1.5\" is not valid: '1.5' is neither a whole number"),
    ],
)
def test_wrong_type_names_file_key_value_and_type(tmp_path, line, expected):
    path = write(tmp_path, line + "\n")
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_values_of_the_right_kind_are_converted(tmp_path):
    path = write(tmp_path, 'network_dim = 8.0\nlearning_rate = "1e-4"\ntext_encoder_lr = 5e-5\n'
                           'output_name = 42\nmax_train_epochs = 10\nnetwork_args = "conv_dim=4"\n')
    config = parse_args(BASE + ["--config_file", str(path)])
    assert config.network.dim == 8 and isinstance(config.network.dim, int)
    assert config.optimizer.learning_rate == 1e-4
    assert config.optimizer.text_encoder_lr == 5e-5  # one number for a list flag, as sd-scripts accepts
    assert config.save.output_name == "42"
    assert config.run.max_train_epochs == 10
    assert dict(config.network.args) == {"conv_dim": "4"}, "one string for a list flag: one item"


def test_gui_text_encoder_lr_pair_uses_the_first(tmp_path, caplog):
    path = write(tmp_path, "text_encoder_lr = [5e-5, 5e-5]\n")
    with caplog.at_level(logging.WARNING):
        assert parse_args(BASE + ["--config_file", str(path)]).optimizer.text_encoder_lr == 5e-5
    assert not any("text_encoder_lr" in r.getMessage() for r in caplog.records)  # the same value twice is fine


def test_gui_shaped_file_parses_without_warnings(tmp_path, caplog):
    # The keys and value types kohya_ss GUI writes for an SD 1.5 LoRA (empty, false and 0 values dropped).
    path = write(tmp_path, """
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
epoch = 1
gradient_accumulation_steps = 1
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
learning_rate = 0.0001
logging_dir = "logs"
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
lr_warmup_steps = 0.1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_token_length = 75
max_train_steps = 800
min_bucket_reso = 256
mixed_precision = "fp16"
network_alpha = 1
network_args = []
network_dim = 8
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_type = "AdamW8bit"
output_dir = "out"
output_name = "my_lora"
pretrained_model_name_or_path = "model.safetensors"
prior_loss_weight = 1
resolution = "512,512"
sample_prompts = "out/sample/prompt.txt"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
text_encoder_lr = [5e-5, 5e-5]
train_batch_size = 1
train_data_dir = "data"
unet_lr = 0.0001
wandb_run_name = "my_lora"
""")
    with caplog.at_level(logging.WARNING):
        config = parse_args(["--config_file", str(path), "--cat_trigger", "sks"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert config.network.module == "networks.lora"
    assert config.scheduler.lr_warmup_steps == 0.1 and config.scheduler.warmup_steps(800) == 80
    assert config.data.resolution == (512, 512)
    assert config.optimizer.optimizer_type == "AdamW8bit"


def test_output_config_writes_the_flags_and_exits(tmp_path):
    target = tmp_path / "written"
    with pytest.raises(SystemExit) as exited:
        parse_args(BASE + ["--network_dim", "16", "--config_file", str(target), "--output_config"])
    assert exited.value.code == 0
    text = (tmp_path / "written.toml").read_text()
    assert "network_dim = 16" in text and 'cat_trigger = ["sks"]' in text
    assert "output_config" not in text and "learning_rate" not in text  # defaults are not written
    assert parse_args(["--config_file", str(target)]).network.dim == 16
    with pytest.raises(UserInputError, match="would overwrite"):
        parse_args(BASE + ["--config_file", str(target), "--output_config"])


# --- key=value arguments and the warmup -----------------------------------------------------------


def test_network_args_are_text_pairs():
    assert parse_key_values(["conv_dim=4", "down_lr_weight=1,1,1", "x=a=b"]) == {
        "conv_dim": "4", "down_lr_weight": "1,1,1", "x": "a=b"}
    config = parse_args(BASE + ["--network_args", "conv_dim=4", "conv_alpha=1"])
    assert dict(config.network.args) == {"conv_dim": "4", "conv_alpha": "1"}


def test_network_arg_without_equals_is_named():
    with pytest.raises(UserInputError, match="'conv_dim' is not key=value"):
        parse_args(BASE + ["--network_args", "conv_dim"])


def test_optimizer_args_are_python_literals():
    assert parse_literal_args(["weight_decay=0.01", "betas=0.9,0.999", "decouple=True", "relative_step=false",
                               "d_coef=2", "name=adam"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.999), "decouple": True, "relative_step": False, "d_coef": 2,
        "name": "adam"}
    config = parse_args(BASE + ["--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999"])
    assert dict(config.optimizer.optimizer_args) == {"weight_decay": 0.01, "betas": (0.9, 0.999)}


def test_optimizer_arg_without_equals_is_named():
    with pytest.raises(UserInputError, match="--optimizer_args weight_decay.*'weight_decay' is not key=value"):
        parse_args(BASE + ["--optimizer_args", "weight_decay"])


@pytest.mark.parametrize(("text", "value", "steps"), [("100", 100, 100), ("0.1", 0.1, 50), ("5%", 0.05, 25),
                                                       ("100.0", 100, 100), ("0", 0, 0)])
def test_lr_warmup_steps_is_a_count_or_a_ratio(text, value, steps):
    config = parse_args(BASE + ["--lr_scheduler", "cosine", "--lr_warmup_steps", text])
    assert config.scheduler.lr_warmup_steps == value
    assert type(config.scheduler.lr_warmup_steps) is type(value)
    assert config.scheduler.warmup_steps(500) == steps


@pytest.mark.parametrize("text", ["1.5", "-1", "abc", "nan"])
def test_lr_warmup_steps_refuses_other_text(text):
    with pytest.raises(UserInputError, match="--lr_warmup_steps"):
        parse_args(BASE + ["--lr_scheduler", "cosine", "--lr_warmup_steps", text])


# --- conflicts, each with its sentence ------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "sentence"),
    [
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
        (["--cat_weight", "-1"], "--cat_weight -1: the CAT weight must be a finite number >= 0"),
        (["--cat_weight", "nan"], "--cat_weight nan: the CAT weight must be a finite number >= 0"),
        (["--cat_weight", "inf"], "--cat_weight inf: the CAT weight must be a finite number >= 0"),
        (["--full_fp16", "--full_bf16", "--mixed_precision", "fp16"], "--full_fp16 and --full_bf16 exclude each other"),
        (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
        (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 needs --mixed_precision bf16"),
        (["--lr_warmup_steps", "100"], "--lr_warmup_steps 100 with --lr_scheduler constant, which has no warmup"),
        (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_warmup_steps", "0.1"], "custom --lr_scheduler_type"),
        (["--min_timestep", "500", "--max_timestep", "400"], "--min_timestep 500 is not below --max_timestep 400"),
        (["--min_timestep", "1000"], "the lowest timestep must be 0 to 999"),
        (["--save_model_as", "ckpt"], "--save_model_as ckpt: only safetensors is written"),
        (["--resume", "no_such_state_folder"], "--resume no_such_state_folder: that state folder does not exist"),
        (["--use_8bit_adam", "--optimizer_type", "Lion"], "each choose the optimizer"),
        (["--train_batch_size", "0"], "--train_batch_size 0: this must be 1 or more"),
        (["--resolution", "512x512"], "the resolution must be 'size' or 'width,height'"),
        (["--base_weights_multiplier", "0.5"], "1 multipliers for 0 --base_weights files"),
    ],
)
def test_conflicts_are_refused_with_a_sentence(extra, sentence):
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + extra)
    assert sentence in str(err.value)


def test_cat_needs_a_trigger_to_strip():
    argv = [arg for arg in BASE if arg != "--cat_trigger" and arg != "sks"]
    with pytest.raises(UserInputError, match="no --cat_trigger is given"):
        parse_args(argv)
    with pytest.raises(UserInputError, match="no --cat_trigger is given"):
        parse_args(argv + ["--cat_caption", "class"])
    assert parse_args(argv + ["--cat_caption", "empty"]).cat.triggers == ()
    assert parse_args(argv + ["--cat_weight", "0"]).cat.enabled is False


def test_cat_trigger_not_required_with_a_dataset_config():
    argv = ["--pretrained_model_name_or_path", "m", "--dataset_config", "d.toml", "--output_dir", "out"]
    # The per-subset trigger may come from the dataset config: the trainer checks each subset instead.
    config = parse_args(argv)
    assert config.cat.enabled and config.cat.triggers == () and config.data.dataset_config == "d.toml"


def test_conflict_from_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "cat_weight = -0.5\n")
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    assert f"cat_weight = -0.5 in {path}" in str(err.value)


def test_images_model_and_output_are_required():
    with pytest.raises(UserInputError, match="--train_data_dir .* or --dataset_config"):
        parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    with pytest.raises(UserInputError, match="--pretrained_model_name_or_path is required"):
        parse_args(["--train_data_dir", "d", "--output_dir", "o"])
    with pytest.raises(UserInputError, match="--train_data_dir needs --resolution"):
        parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o"])


def test_v_parameterization_without_v2_warns(caplog):
    with caplog.at_level(logging.WARNING):
        parse_args(BASE + ["--v_parameterization"])
    assert any("--v_parameterization without --v2" in r.getMessage() for r in caplog.records)


def test_argparse_mistakes_are_user_errors():
    with pytest.raises(UserInputError, match="--cat_caption: invalid choice"):
        parse_args(BASE + ["--cat_caption", "remove"])
    with pytest.raises(UserInputError, match="--network_dim: invalid int value"):
        parse_args(BASE + ["--network_dim", "8.5"])


# --- accepted but not implemented -----------------------------------------------------------------


def test_not_implemented_keys_are_flags():
    dests = set(vars(build_parser().parse_args([])))
    assert {flag.removeprefix("--") for flag in NOT_IMPLEMENTED} <= dests


def test_not_implemented_flags_are_refused_together():
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--async_upload", "--huggingface_repo_id", "me/lora",
                           "--save_state_to_huggingface"])
    message = str(err.value)
    for flag in ("--async_upload", "--huggingface_repo_id", "--save_state_to_huggingface"):
        assert flag + " (" in message
    assert "are accepted but not implemented yet" in message
    assert message.count(". ") == 0  # one sentence


def test_not_implemented_from_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "async_upload = true\n")
    with pytest.raises(UserInputError) as err:
        parse_args(BASE + ["--config_file", str(path)])
    assert "--async_upload (" in str(err.value) and str(path) in str(err.value)


def test_dataset_flags_that_landed_parse():
    config = parse_args(BASE + ["--enable_bucket", "--flip_aug", "--color_aug", "--random_crop", "--caption_prefix", "a",
                                "--caption_suffix", "b", "--caption_tag_dropout_rate", "0.1", "--cache_latents_to_disk",
                                "--caption_dropout_every_n_epochs", "3", "--keep_tokens_separator", "|||"])
    data = config.data
    assert data.enable_bucket and data.flip_aug and data.color_aug and data.random_crop and data.cache_latents_to_disk
    assert (data.caption_prefix, data.caption_suffix, data.caption_tag_dropout_rate) == ("a", "b", 0.1)
    assert (data.caption_dropout_every_n_epochs, data.keep_tokens_separator) == (3, "|||")


def test_implemented_values_and_inert_flags_pass():
    config = parse_args(BASE + ["--log_with", "tensorboard", "--logging_dir", "logs", "--sample_prompts", "prompts.txt",
                                "--sample_every_n_steps", "0", "--max_token_length", "75", "--max_bucket_reso", "2048"])
    assert config.log.log_with == "tensorboard"
    assert config.sample.prompts == "prompts.txt" and config.sample.every_n_steps is None
    sampling = parse_args(BASE + ["--sample_prompts", "prompts.txt", "--sample_every_n_steps", "100"])
    assert sampling.sample.every_n_steps == 100 and not sampling.sample.cat_compare


def test_every_not_implemented_flag_is_refused_when_set(tmp_path):
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for flag in NOT_IMPLEMENTED:
        dest = flag.removeprefix("--")
        value = {"max_token_length": ["150"], "resume": [str(tmp_path)]}.get(dest)
        if value is None:
            default = defaults[dest]
            value = [] if default is False else ["7"] if default is None or isinstance(default, (int, float)) else ["x"]
        # A flag that does nothing without another (INERT_WITHOUT) is given with it.
        extra = ["--sample_at_first"] if dest == "sample_prompts" else [f"--{e}" for e in INERT_WITHOUT.get(dest, ())[:1]]
        with pytest.raises(UserInputError) as err:
            parse_args(BASE + [flag, *value, *extra])
        assert f"{flag} (" in str(err.value), flag


def test_float_flags_keep_float_values():
    config = parse_args(BASE + ["--network_alpha", "0.5", "--huber_c", "0.25", "--prior_loss_weight", "0.75"])
    assert (config.network.alpha, config.loss.huber_c, config.loss.prior_loss_weight) == (0.5, 0.25, 0.75)
    assert not math.isnan(config.cat.weight)


@pytest.mark.parametrize("flags, message", [
    (["--caption_tag_dropout_rate", "1.5"], "--caption_tag_dropout_rate 1.5: a rate must be between 0 and 1"),
    (["--keep_tokens", "-1"], "--keep_tokens -1: this must be 0 or more"),
    (["--bucket_reso_steps", "0"], "--bucket_reso_steps 0: bucket sizes are pixels"),
])
def test_bad_dataset_flags_are_named(flags, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(BASE + flags)


def test_folder_flags_beside_a_dataset_config_are_named_as_unused(caplog):
    parse_args(BASE + ["--dataset_config", "d.toml", "--reg_data_dir", "reg"])
    assert "--reg_data_dir reg" in caplog.text and "not used" in caplog.text


def test_start_step_flags_reach_the_run_config():
    config = parse_args(BASE + ["--initial_step", "100", "--initial_epoch", "2", "--skip_until_initial_step"])
    assert (config.run.initial_step, config.run.initial_epoch, config.run.skip_until_initial_step) == (100, 2, True)
