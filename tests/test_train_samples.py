"""`train_network_cat.py` with sample images and the preservation signal, end to end on the tiny model."""

import re

import pytest
from PIL import Image

import train_network_cat
from library.testing.demo_data import write_demo_dataset
from networks.lora_cat.file_format import read_lora_file
from library.testing.tiny_sd import build_tiny_sd, save_single_file
from test_train_cli import _argv  # the same tiny workspace layout: tiny.safetensors, data/train, data/reg



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data", with_reg=True)
    (root / "prompts.txt").write_text(
        "# sample prompts\n"
        "a photo of sks teapot --w 64 --h 64 --s 2 --d 7 --ss euler_a\n"
        "\n"
        "(sks:1.2), a teapot on a table --n (lowres:1.3) --w 64 --h 72 --s 2 --l 5\n",  # weights, as sd-scripts reads them
        encoding="utf-8",
    )
    (root / "preservation.txt").write_text("# trigger-free\na photo of a teapot\na red car in the street\n",
                                           encoding="utf-8")
    return root


def _drift(logs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("preservation/drift")]


def test_samples_and_drift_leave_the_lora_bitwise_unchanged(workspace, tmp_path):
    # Dropout in the adapters draws from torch's global stream every step: a side trip that used it
    # (or left the adapters in eval mode) would change the result.
    plain = ("--cat_weight", "0", "--network_dropout", "0.1", "--network_args", "module_dropout=0.1")
    assert train_network_cat.main(_argv(workspace, tmp_path / "without", *plain)) == 0
    logs = tmp_path / "logs"
    argv = _argv(workspace, tmp_path / "with", *plain, "--sample_prompts", str(workspace / "prompts.txt"),
                 "--sample_every_n_steps", "2", "--sample_at_first", "--sample_cat_compare",
                 "--preservation_prompts", str(workspace / "preservation.txt"), "--preservation_every_n_steps", "1",
                 "--log_with", "tensorboard", "--logging_dir", str(logs))
    assert train_network_cat.main(argv) == 0

    without, _ = read_lora_file(tmp_path / "without" / "cat.safetensors")
    with_side_trips, _ = read_lora_file(tmp_path / "with" / "cat.safetensors")
    assert without.keys() == with_side_trips.keys()
    assert all(without[k].equal(with_side_trips[k]) for k in without)

    # sd-scripts' names: at first e000000, then every 2 steps; `_7` for the prompt with --d 7.
    names = sorted(p.name for p in (tmp_path / "with" / "sample").iterdir())
    pattern = re.compile(r"cat_(e000000|000002|000004)_(00|01)_\d{14}(_7)?\.png")
    assert len(names) == 6 and all(pattern.fullmatch(n) for n in names), names
    assert all(n.endswith("_7.png") == ("_00_" in n) for n in names)
    strips = {n.split("_")[2]: Image.open(tmp_path / "with" / "sample" / n) for n in names if "_000004_" in n}
    assert strips["00"].size == (3 * 64, 64) and strips["01"].size == (3 * 64, 72)
    assert "trigger-free prompt: a photo of teapot" in strips["00"].text["cat_compare"]
    assert "trigger-free prompt: a teapot on a table" in strips["01"].text["cat_compare"]

    # The drift: exactly 0 before training (the up-projections start at zero), then growing for plain LoRA.
    drift = _drift(logs)
    assert [step for step, _ in drift] == [0, 1, 2, 3, 4]
    values = [value for _, value in drift]
    assert values[0] == 0.0 and 0 < values[1] < values[-1]


def test_epoch_sampling_replaces_step_sampling(workspace, tmp_path):
    # 8 training + 8 regularisation images in batches of 8: 2 steps per epoch, 2 epochs. The last
    # epoch ends at the last step and is sampled too; without --output_name the names have no prefix.
    prompts = tmp_path / "one.txt"
    prompts.write_text("a photo of sks teapot --w 64 --h 64 --s 1\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "--train_batch_size", "8", "--max_train_epochs", "2",
                 "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1", "--sample_every_n_steps", "1",
                 "--sample_sampler", "dpm++ 2m")
    argv[argv.index("--output_name"): argv.index("--output_name") + 2] = []
    assert train_network_cat.main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert [n[:11] for n in names] == ["e000001_00_", "e000002_00_"], names


def test_a_bad_prompt_file_stops_the_run_before_training(workspace, tmp_path, capsys):
    prompts = tmp_path / "bad.txt"
    prompts.write_text("a photo of sks teapot\na teapot --steps 20\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = _argv(workspace, out, "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{prompts} line 2: unknown option --steps" in err and "--s" in err
    assert not any(out.rglob("*.safetensors"))


def test_sample_prompts_reach_the_model_with_their_weights(workspace, tmp_path, monkeypatch):
    from library.families.sd.family import StableDiffusionModels

    seen = []
    encode = StableDiffusionModels.prompt_kwargs

    def recording(self, prompt, negative, *args, **kwargs):
        seen.append((prompt, negative, kwargs.get("weighted")))
        return encode(self, prompt, negative, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionModels, "prompt_kwargs", recording)
    argv = _argv(workspace, tmp_path / "out", "--sample_prompts", str(workspace / "prompts.txt"), "--sample_at_first",
                 "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    assert ("(sks:1.2), a teapot on a table", "(lowres:1.3)", True) in seen


def test_a_prompt_file_without_a_schedule_is_not_read(workspace, tmp_path):
    # GUIs always write sample_prompts; sd-scripts ignores it without a schedule, and so do we.
    argv = _argv(workspace, tmp_path / "out", "--sample_prompts", str(tmp_path / "never_written.txt"),
                 "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    assert not (tmp_path / "out" / "sample").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--preservation_prompts", "{missing}", "--preservation_every_n_steps", "5"), "does not exist"),
        (("--preservation_prompts", "{empty}", "--preservation_every_n_steps", "5"), "holds no prompt"),
        (("--preservation_prompts", "{prompts}",), "no --preservation_every_n_steps"),
        (("--preservation_prompts", "{prompts}", "--preservation_every_n_steps", "0"),
         "--preservation_every_n_steps 0"),
        (("--preservation_every_n_steps", "5"), "without --preservation_prompts"),
    ],
)
def test_preservation_flags_are_checked_at_start(workspace, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n", encoding="utf-8")
    paths = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt",
             "prompts": workspace / "preservation.txt"}
    argv = _argv(workspace, tmp_path / "out", *(arg.format(**paths) for arg in extra))
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
