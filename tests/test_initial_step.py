"""--initial_step / --initial_epoch / --skip_until_initial_step: where the count and the data start."""

import pytest

import library.training.trainer as trainer
import train_network_cat
from library.config.train_config import RunArgs
from library.errors import UserInputError
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from library.training.initial_step import starting_progress
from library.training.train_state import Progress
from networks.lora_cat.file_format import read_lora_file


def _run_args(**values) -> RunArgs:
    base = dict(max_train_steps=20, max_train_epochs=None, seed=1, gradient_accumulation_steps=1,
                gradient_checkpointing=False, mixed_precision="no", full_fp16=False, full_bf16=False)
    return RunArgs(**{**base, **values})


FRESH = Progress(0, 1, 0, 1, 20)


@pytest.mark.parametrize("values, expected", [
    ({}, FRESH),
    ({"initial_step": 0}, Progress(0, 1, 0, 1, 20)),
    ({"initial_step": 6}, Progress(6, 2, 0, 1, 20)),  # 4 steps an epoch: in epoch 2, from its start
    ({"initial_step": 6, "skip_until_initial_step": True}, Progress(6, 2, 2, 1, 20)),
    ({"initial_step": 6, "skip_until_initial_step": True, "gradient_accumulation_steps": 2}, Progress(6, 2, 4, 1, 20)),
    ({"initial_epoch": 3}, Progress(8, 3, 0, 1, 20)),
    ({"initial_epoch": 3, "initial_step": 5}, Progress(5, 2, 0, 1, 20)),  # the step wins, as in sd-scripts
])
def test_starting_progress(values, expected):
    assert starting_progress(_run_args(**values), 4, FRESH) == expected


def test_starting_progress_replaces_a_resumed_count_and_refuses_an_empty_run():
    assert starting_progress(_run_args(initial_step=9), 4, Progress(3, 1, 3, 1, 20)) == Progress(9, 3, 0, 1, 20)
    with pytest.raises(UserInputError, match="--initial_step 20 leaves nothing to train"):
        starting_progress(_run_args(initial_step=20), 4, FRESH)
    with pytest.raises(UserInputError, match=r"--initial_epoch 6 \(= 20 steps done"):
        starting_progress(_run_args(initial_epoch=6), 4, FRESH)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_tiny_sd_workspace(tmp_path_factory.mktemp("initial"))  # 8 batches of 2 an epoch
    return root


def _argv(workspace, out, *extra):
    return tiny_sd_argv(workspace, out, "--max_train_steps", "11", "--save_every_n_steps", "1", *extra)


def _trained(monkeypatch) -> list:
    """(epoch, step, sample positions) of every batch trained on."""
    seen = []
    real = trainer._train_on

    def train_on(run, denoiser, batch, epoch, step, *rest):
        seen.append((epoch, step, [s.position for s in batch.samples]))
        return real(run, denoiser, batch, epoch, step, *rest)

    monkeypatch.setattr(trainer, "_train_on", train_on)
    return seen


def test_skip_until_initial_step_trains_the_batches_of_the_later_steps(workspace, tmp_path, monkeypatch):
    seen = _trained(monkeypatch)
    assert train_network_cat.main(_argv(workspace, tmp_path / "full")) == 0
    full = list(seen)
    seen.clear()
    argv = _argv(workspace, tmp_path / "late", "--initial_step", "9", "--skip_until_initial_step")
    assert train_network_cat.main(argv) == 0
    assert seen == full[9:]  # steps 10 and 11: epoch 2's second and third batches
    assert [(epoch, step) for epoch, step, _ in seen] == [(2, 9), (2, 10)]
    names = sorted(p.name for p in (tmp_path / "late").iterdir())
    assert names == ["cat-step00000010.safetensors", "cat-step00000011.safetensors", "cat.safetensors"]
    _, metadata = read_lora_file(tmp_path / "late" / "cat.safetensors")
    assert metadata["ss_steps"] == "11" and metadata["ss_epoch"] == "2"


def test_initial_epoch_starts_at_that_epochs_first_batch(workspace, tmp_path, monkeypatch):
    seen = _trained(monkeypatch)
    assert train_network_cat.main(_argv(workspace, tmp_path / "full")) == 0
    full = list(seen)
    seen.clear()
    assert train_network_cat.main(_argv(workspace, tmp_path / "late", "--initial_epoch", "2")) == 0
    assert seen == full[8:]  # 8 steps an epoch: epoch 2 from its first batch, steps 9 to 11
    seen.clear()
    # --initial_step without the skip: counted from step 9, starting at epoch 2's first batch.
    assert train_network_cat.main(_argv(workspace, tmp_path / "step", "--initial_step", "9")) == 0
    assert [(epoch, positions) for epoch, _, positions in seen] == [(e, p) for e, _, p in full[8:10]]
    assert [step for _, step, _ in seen] == [9, 10]


@pytest.mark.parametrize("extra, expected", [
    (("--initial_step", "11"), "leaves nothing to train"),
    (("--initial_step", "-1"), "--initial_step"),
    (("--initial_epoch", "0"), "--initial_epoch"),
])
def test_bad_initial_steps(workspace, tmp_path, capsys, extra, expected):
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", *extra)) == 2
    assert expected in capsys.readouterr().err
    assert not any((tmp_path / "out").glob("*.safetensors"))
