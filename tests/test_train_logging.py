"""The logging flags end to end on the tiny SD 1.x model (wandb on SDXL and FLUX.1 too): `--log_with
wandb` / `all`, `--logging_dir` / `--log_prefix`, `--log_tracker_name`, `--log_tracker_config`, `--log_config`,
`--wandb_run_name`, `--wandb_api_key`, read back from the files wandb (offline) and TensorBoard wrote;
and the mistakes refused before any model is loaded."""

import importlib.util
import json
import re
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

import train_network_cat
from library.cli.train_args import parse_args
from library.errors import UserInputError
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from test_family_cli import FAMILIES, _argv as family_argv  # SDXL's and FLUX.1's tiny setups

LOSS_TAGS = {"loss/main", "loss/cat", "loss/total", "lr/textencoder", "lr/unet"}
STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data", with_reg=False)
    return root


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline and silent, every file it may write (settings, cache, netrc) under tmp_path."""
    real_home = Path.home()
    before = {path: path.exists() for path in (real_home / ".netrc", real_home / ".config" / "wandb")}
    home = tmp_path / "home"
    home.mkdir()
    settings = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "HOME": home,
                "WANDB_DIR": tmp_path / "wandb_default", "WANDB_CONFIG_DIR": tmp_path / "wandb_config",
                "WANDB_CACHE_DIR": tmp_path / "wandb_cache", "WANDB_DATA_DIR": tmp_path / "wandb_data",
                "NETRC": home / ".netrc"}
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    (tmp_path / "wandb_default").mkdir()
    yield tmp_path
    assert not (home / ".netrc").exists() and not (home / ".config" / "wandb").exists()
    assert {path: path.exists() for path in before} == before, "nothing written to the real home"


def _argv(workspace, tmp_path, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp_path / "out"),
        "--output_name", "cat", "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", str(STEPS),
        "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0",
        "--logging_dir", str(tmp_path / "logs"), *extra,
    ]


# --- reading what wandb wrote -----------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of a .wandb file (wandb's protobuf Records in LevelDB-log framing: 32 KiB blocks of
    chunks, each `crc32 (4) | length (2) | kind (1)`, kind 1 whole, 2..4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records once the run's exit record is there: wandb's service writes the file on its own
    schedule, so `finish()` may return before the file is complete."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_run(logs: Path) -> dict:
    """The one offline run under `logs`: its project, name, tags, notes, stored config and history by step."""
    (path,) = logs.glob("*/wandb/offline-run-*/run-*.wandb")  # in the run's folder: <prefix><time>/
    records = _finished_records(path)
    run: dict = {"config": {}, "history": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            run.update(project=info.project, name=info.display_name, tags=list(info.tags), notes=info.notes)
            updates = info.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            run["history"][record.history.step.num] = row
            continue
        else:
            continue
        run["config"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in updates})
    run["config"].pop("_wandb", None)
    return run


def _tensorboard_scalars(logs: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {path.parent for path in logs.rglob("events.out.tfevents.*") if path.parent.name == "network_train"}
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# --- end to end ---------------------------------------------------------------------------------------


def test_wandb_gets_the_losses_the_project_and_the_tracker_config(workspace, tmp_path, offline_wandb):
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text('[wandb]\nname = "from-the-file"\ntags = ["cat", "tiny"]\nnotes = "reached wandb"\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks teapot --w 64 --h 64 --s 1\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path, "--log_with", "wandb", "--log_tracker_name", "cat-project",
                 "--log_tracker_config", str(tracker_config), "--wandb_run_name", "replaced-by-the-file",
                 "--sample_prompts", str(prompts), "--sample_at_first")
    assert train_network_cat.main(argv) == 0
    run = _wandb_run(tmp_path / "logs")  # under --logging_dir, not WANDB_DIR, as sd-scripts puts it
    assert (run["project"], run["name"], run["tags"], run["notes"]) == ("cat-project", "from-the-file",
                                                                        ["cat", "tiny"], "reached wandb")
    assert sorted(run["history"]) == list(range(STEPS + 1))
    sample = run["history"].pop(0)  # sd-scripts sends the samples to wandb too, at the step they are made
    assert sample["sample_0/_type"] == "image-file" and sample["sample_0/caption"] == "a photo of sks teapot"
    (image,) = (tmp_path / "logs").glob("*/wandb/offline-run-*/files/" + sample["sample_0/path"])
    assert Image.open(image).size == (64, 64)
    for step, row in run["history"].items():
        assert LOSS_TAGS <= set(row) and row["loss/total"] > 0
        assert row["lr/unet"] == pytest.approx(1e-3)
        assert (row["global_step"], row["epoch"]) == (step, 1), "sd-scripts' wandb keys"
    assert run["config"] == {}, "no --log_config: no configuration"
    assert not list(offline_wandb.glob("wandb_default/wandb/offline-run-*"))


def test_sd_scripts_loss_tags_on_tensorboard(workspace, tmp_path):
    argv = _argv(workspace, tmp_path, "--log_with", "tensorboard", "--max_train_epochs", "2", "--scale_weight_norms", "0.01")
    assert train_network_cat.main(argv) == 0
    scalars = _tensorboard_scalars(tmp_path / "logs")
    total, average, epochs = scalars["loss/total"], scalars["loss/average"], scalars["loss/epoch_average"]
    assert scalars["loss/current"] == total, "the loss the step optimized"
    per_epoch = len(total) // 2
    assert sorted(total) == list(range(1, 2 * per_epoch + 1)) and per_epoch > 1
    for step in total:  # sd-scripts' LossRecorder: the mean over the last epoch's worth of steps
        window = [total[s] for s in range(max(1, step - per_epoch + 1), step + 1)]
        assert average[step] == pytest.approx(sum(window) / len(window), rel=1e-6)
    assert epochs == pytest.approx({1: average[per_epoch], 2: average[2 * per_epoch]}, rel=1e-6), "at the epoch"
    # --scale_weight_norms: how many layers it scaled and the norms after scaling, every step.
    assert sorted(scalars["max_norm/keys_scaled"]) == sorted(total) and max(scalars["max_norm/keys_scaled"].values()) > 0
    assert all(0 < value <= 0.01 * (1 + 1e-5) for value in scalars["max_norm/max_key_norm"].values())
    assert all(scalars["norm/avg_key_norm"][s] <= scalars["max_norm/max_key_norm"][s] for s in total)


def test_log_with_all_writes_tensorboard_too_and_the_config(workspace, tmp_path, offline_wandb, monkeypatch, caplog):
    import wandb

    keys = []
    monkeypatch.setattr(wandb, "login", lambda key: keys.append(key))
    argv = _argv(workspace, tmp_path, "--log_with", "all", "--log_config", "--wandb_run_name", "my-run",
                 "--wandb_api_key", "k" * 40, "--network_alpha", "2")
    assert train_network_cat.main(argv) == 0
    assert keys == ["k" * 40]
    assert "--wandb_api_key is on the command line, which wandb records" in caplog.text
    run = _wandb_run(tmp_path / "logs")
    assert (run["project"], run["name"]) == ("network_train", "my-run")  # sd-scripts' default project
    scalars = _tensorboard_scalars(tmp_path / "logs")
    assert LOSS_TAGS <= set(scalars)
    for tag in LOSS_TAGS:  # the same numbers in both trackers
        assert scalars[tag] == pytest.approx({step: row[tag] for step, row in run["history"].items()}), tag
    config = run["config"]
    assert (config["network_dim"], config["network_alpha"], config["cat_trigger"]) == (4, 2.0, "['sks']")
    assert config["log_with"] == "all" and config["max_train_steps"] == STEPS
    left_out = {"wandb_api_key", "pretrained_model_name_or_path", "train_data_dir", "output_dir", "logging_dir"}
    assert not left_out & set(config) and "k" * 40 not in json.dumps(config)
    assert list((tmp_path / "logs").glob("*/network_train/**/hparams.yml")), "TensorBoard got the config too"


@pytest.fixture(scope="module", params=["sdxl", "flux"])
def other_family(request, tmp_path_factory):
    """SDXL's and FLUX.1's tiny models and data (SD 1.x: the tests above), as tests/test_family_cli.py lays them."""
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    family.save(family.build(), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return family, root


def test_sdxl_and_flux_log_to_wandb_too(other_family, tmp_path, offline_wandb):
    family, root = other_family
    argv = family_argv(root, family, tmp_path / "out", "--log_with", "wandb", "--logging_dir", str(tmp_path / "logs"),
                       "--log_tracker_name", "family-project", "--log_config")
    assert family.main(argv) == 0
    run = _wandb_run(tmp_path / "logs")
    assert run["project"] == "family-project" and sorted(run["history"]) == [1, 2, 3]
    for row in run["history"].values():
        assert {"loss/main", "loss/cat", "loss/total"} <= set(row) and any(tag.startswith("lr/") for tag in row)
    assert run["config"]["max_train_steps"] == 3 and run["config"]["log_tracker_name"] == "family-project"
    assert "pretrained_model_name_or_path" not in run["config"]


def test_a_logging_dir_alone_logs_to_tensorboard_in_a_folder_per_run(workspace, tmp_path):
    argv = _argv(workspace, tmp_path, "--log_prefix", "cat-")  # --logging_dir, no --log_with: sd-scripts' TensorBoard
    assert train_network_cat.main(argv) == 0
    (run_folder,) = (tmp_path / "logs").iterdir()
    assert re.fullmatch(r"cat-\d{14}", run_folder.name), run_folder.name  # --log_prefix + the start time
    assert LOSS_TAGS <= set(_tensorboard_scalars(run_folder))


def test_a_bad_tracker_config_stops_before_any_model_is_loaded(workspace, tmp_path, capsys, monkeypatch):
    import library.cli.script_main as script_main

    monkeypatch.setattr(script_main, "train", lambda *args: pytest.fail("training started"))
    assert train_network_cat.main(_argv(workspace, tmp_path, "--log_with", "tensorboard",
                                        "--log_tracker_config", str(tmp_path / "missing.toml"))) == 2
    assert "missing.toml: the tracker config file does not exist" in capsys.readouterr().err


# --- parse time ---------------------------------------------------------------------------------------

BASE = ["--pretrained_model_name_or_path", "m.safetensors", "--train_data_dir", "data", "--resolution", "64",
        "--output_dir", "out", "--cat_trigger", "sks", "--logging_dir", "logs"]


def _tracker_file(tmp_path, text):
    path = tmp_path / "trackers.toml"
    path.write_text(text)
    return ["--log_tracker_config", str(path)]


def test_a_logging_dir_means_tensorboard_unless_log_with_says_otherwise():
    assert parse_args(BASE).log.log_with == "tensorboard"
    assert parse_args(BASE + ["--log_with", "wandb"]).log.log_with == "wandb"
    no_folder = [flag for flag in BASE if flag not in ("--logging_dir", "logs")]
    assert parse_args(no_folder).log.log_with is None


def test_the_run_name_unless_a_tracker_file_replaces_it(tmp_path):
    named = parse_args(BASE + ["--log_with", "wandb", "--wandb_run_name", "r"]).log
    assert named.tracker_init_kwargs == {"wandb": {"name": "r"}} and named.log_config is None
    from_file = parse_args(BASE + ["--log_with", "all", "--wandb_run_name", "r"]
                           + _tracker_file(tmp_path, '[wandb]\nentity = "team"\n[tensorboard]\nflush_secs = 5\n')).log
    assert from_file.tracker_init_kwargs == {"wandb": {"entity": "team"}, "tensorboard": {"flush_secs": 5}}


def test_log_config_leaves_out_keys_and_paths():
    config = parse_args(BASE + ["--log_config", "--wandb_api_key", "secret", "--vae", "v.safetensors",
                                "--network_args", "conv_dim=4"]).log.log_config
    assert not {"wandb_api_key", "vae", "pretrained_model_name_or_path", "train_data_dir", "output_dir",
                "logging_dir"} & set(config)
    assert config["network_args"] == "['conv_dim=4']" and config["resolution"] == "64" and config["log_config"] is True


@pytest.mark.parametrize("text, message", [
    ("[wandb\n", "is not valid TOML"),
    ('name = "run"\n', "name is not in a tracker's table"),
    ("[wandb]\nproject = \"p\"\n", "project in [wandb] is given by --log_tracker_name"),
    ("[wandb]\nnmae = \"p\"\n", "[wandb] has nmae, which wandb does not take"),
])
def test_bad_tracker_configs_are_refused(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_args(BASE + ["--log_with", "wandb"] + _tracker_file(tmp_path, text))


def test_a_missing_tracker_config_is_named(tmp_path):
    missing = r"--log_tracker_config .*nope.toml: the tracker config file does not exist"
    with pytest.raises(UserInputError, match=missing):
        parse_args(BASE + ["--log_with", "wandb", "--log_tracker_config", str(tmp_path / "nope.toml")])


def test_an_unused_table_is_warned_about(tmp_path, caplog):
    parse_args(BASE + ["--log_with", "tensorboard"] + _tracker_file(tmp_path, "[WandB]\nname = \"x\"\n"))
    assert "the table [WandB] is not used, since --log_with tensorboard starts tensorboard" in caplog.text


def test_tensorboard_needs_a_folder_and_wandb_its_package(monkeypatch):
    no_folder = [flag for flag in BASE if flag not in ("--logging_dir", "logs")]
    with pytest.raises(UserInputError, match="--log_with all needs --logging_dir"):
        parse_args(no_folder + ["--log_with", "all"])
    parse_args(no_folder + ["--log_with", "wandb"])  # wandb needs no folder
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "wandb" else find_spec(name, *rest))
    with pytest.raises(UserInputError, match="needs the wandb package, which is not installed.*pip install"):
        parse_args(BASE + ["--log_with", "wandb"])
