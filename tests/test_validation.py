"""Validation (--validation_split and friends): the split, sd-scripts' fixed timesteps, what a round
computes and logs, that it changes nothing in training, resume, and bad input."""

from pathlib import Path

import pytest
import torch

import library.training.trainer as trainer
import library.training.validation as validation
import train_network_cat
from library.cat.objective import base_prediction, preservation_loss
from library.data.buckets import BucketSettings
from library.data.folder_dataset import ImageItem, Subset, SubsetOptions
from library.data.caption_transforms import CaptionOptions
from library.data.training_data import DatasetSpec
from library.data.validation_split import split_for_validation
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from networks.lora_cat.file_format import read_lora_file


def _subset(name: str, count: int, is_reg: bool = False, options: SubsetOptions = SubsetOptions()) -> Subset:
    items = tuple(ImageItem(Path(f"/{name}/{i:02d}.png"), f"sks {i}", "sks", is_reg, options=options) for i in range(count))
    return Subset(Path(f"/{name}"), 3, "sks", is_reg, items, options=options)


def _spec(*subsets: Subset, split: float, seed: int | None = None) -> DatasetSpec:
    return DatasetSpec(subsets, 1, BucketSettings((64, 64)), split, seed)


def test_split_holds_out_the_rest_of_ceil_and_never_splits_regularisation():
    augmented = SubsetOptions(CaptionOptions(shuffle=True, dropout_rate=0.5, tag_dropout_rate=0.2,
                                             dropout_every_n_epochs=2, prefix="p, ", token_warmup_step=5),
                              True, True, True, face_crop_aug_range=(2.0, 4.0))
    concept, reg = _subset("a", 10, options=augmented), _subset("r", 4, is_reg=True)
    (train,), (held,) = split_for_validation([_spec(concept, reg, split=0.35)], run_seed=1)
    kept, regs = train.subsets
    assert len(kept.items) == 7 and regs == reg  # ceil(10 * 0.65) train; sd-scripts would hold out round(3.5) = 4
    (held_subset,) = held.subsets
    assert len(held_subset.items) == 3 and held_subset.repeats == 1
    assert {i.path for i in kept.items}.isdisjoint(i.path for i in held_subset.items)
    assert {i.path for i in kept.items} | {i.path for i in held_subset.items} == {i.path for i in concept.items}
    # Both parts keep the subset's order; the held-out images are seen as written.
    assert list(kept.items) == [i for i in concept.items if i in kept.items]
    for options in (held_subset.options, *(i.options for i in held_subset.items)):
        assert not (options.flip_aug or options.color_aug or options.random_crop or options.captions.shuffle)
        assert options.captions.dropout_rate == options.captions.tag_dropout_rate == 0
        assert options.captions.dropout_every_n_epochs == 0 and options.captions.prefix == "p, "
        assert options.captions.token_warmup_step == 0 and options.face_crop_aug_range is None
    assert kept.options == augmented and kept.repeats == 3


def test_split_depends_on_the_validation_seed_else_the_run_seed():
    def held(spec, run_seed):
        return {i.path for i in split_for_validation([spec], run_seed)[1][0].subsets[0].items}

    subset = _subset("a", 20)
    assert held(_spec(subset, split=0.25), 1) == held(_spec(subset, split=0.25), 1)
    assert held(_spec(subset, split=0.25), 1) != held(_spec(subset, split=0.25), 2)
    assert held(_spec(subset, split=0.25, seed=9), 1) == held(_spec(subset, split=0.25, seed=9), 2)
    assert split_for_validation([_spec(subset, split=0.0)], 1) == ([_spec(subset, split=0.0)], [])
    assert split_for_validation([_spec(_subset("b", 1), split=0.5)], 1)[1] == []  # ceil(0.5) = 1 image trains


def test_sd_scripts_fixed_timesteps():
    assert validation.validation_timesteps(None, None, 1000) == [200, 400, 600, 800]
    assert validation.validation_timesteps(100, 900, 1000) == [260, 420, 580, 740]


# --- end to end on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_tiny_sd_workspace(tmp_path_factory.mktemp("validation"))
    return root


def _argv(workspace, out, *extra):
    return tiny_sd_argv(workspace, out, "--learning_rate", "1e-2", "--cat_weight", "1", *extra)


class _Recorded:
    def __init__(self):
        self.rounds, self.trained_paths, self.noised = [], [], []


def _record(monkeypatch) -> _Recorded:
    rec = _Recorded()
    real_run, real_train_on = validation.Validation.run, trainer._train_on

    def run(self, kind, step, epoch, bar):
        noising = self.noising

        class Spy:  # the noising the round uses, recording the timesteps it asks for
            num_train_timesteps = noising.num_train_timesteps

            def batch(self, *args, **kwargs):
                rec.noised.append((step, kwargs["timestep"]))
                return noising.batch(*args, **kwargs)

        self.noising = Spy()
        try:
            values = real_run(self, kind, step, epoch, bar)
        finally:
            self.noising = noising
        rec.rounds.append((kind, step, values))
        return values

    def train_on(run, denoiser, batch, *args):
        rec.trained_paths += [s.item.path for s in batch.samples]
        return real_train_on(run, denoiser, batch, *args)

    monkeypatch.setattr(validation.Validation, "run", run)
    monkeypatch.setattr(trainer, "_train_on", train_on)
    return rec


def test_validation_rounds_tags_timesteps_and_held_out_images(workspace, tmp_path, monkeypatch):
    rec = _record(monkeypatch)
    held_out = []
    real_prepare = validation.Validation._prepare
    monkeypatch.setattr(validation.Validation, "_prepare",
                        lambda self, batch: held_out.extend(s.item.path for s in batch.samples) or real_prepare(self, batch))
    argv = _argv(workspace, tmp_path / "out", "--validation_split", "0.5", "--validate_every_n_steps", "3",
                 "--max_train_steps", "4")
    assert train_network_cat.main(argv) == 0
    # 4 concept images, 2 held out (not the regularisation images); 2 x 2 repeats + 4 reg = 4 batches of 2 an epoch.
    assert len(held_out) == 2 and all("sks teapot" in str(p) for p in held_out)
    assert rec.trained_paths and set(held_out).isdisjoint(rec.trained_paths)
    assert [(kind, step) for kind, step, _ in rec.rounds] == [("step", 3), ("epoch", 4)]
    assert rec.noised == [(step, t) for step in (3, 4) for t in (200, 400, 600, 800)]  # one batch of 2
    for kind, _, values in rec.rounds:
        assert set(values) == {f"loss/validation/{kind}_average", f"loss/validation/{kind}_divergence",
                               "loss/validation/cat"}
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert rec.rounds[1][2]["loss/validation/cat"] > 0  # the adapter moved, so it drifts on held-out images
    _, metadata = read_lora_file(tmp_path / "out" / "cat.safetensors")
    assert metadata["ss_validation_split"] == "0.5" and metadata["ss_num_validation_images"] == "2"
    assert metadata["ss_validate_every_n_steps"] == "3" and metadata["ss_num_train_images"] == "4"


def test_a_round_computes_the_held_out_main_and_cat_terms(workspace, tmp_path, monkeypatch):
    """The round's numbers, recomputed here from its own batches: the adapted model's main loss on
    y_T and the squared difference to the base model (adapters off) on y, at each fixed timestep."""
    seen = []
    real_losses = validation.held_out_losses

    def checked(denoiser, network, batch, alpha, loss_fn):
        losses = real_losses(denoiser, network, batch, alpha, loss_fn)
        with torch.no_grad():
            adapted = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids))
            main = (loss_fn(adapted, batch.target) * batch.weights).mean()
            on_free = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.free_ids))
            cat = (preservation_loss(on_free, base_prediction(denoiser, network, batch)) * batch.weights).mean()
        assert not torch.is_grad_enabled()
        assert torch.equal(batch.timesteps, torch.full_like(batch.timesteps, batch.timesteps[0]))
        assert not torch.equal(batch.trigger_ids, batch.free_ids)
        seen.append((losses.main.item(), main.item(), losses.cat.item(), cat.item()))
        return losses

    monkeypatch.setattr(validation, "held_out_losses", checked)
    argv = _argv(workspace, tmp_path / "out", "--validation_split", "0.5", "--max_train_steps", "2")
    assert train_network_cat.main(argv) == 0
    assert len(seen) == 4
    for got_main, main, got_cat, cat in seen:
        assert got_main == pytest.approx(main, rel=1e-6) and got_cat == pytest.approx(cat, rel=1e-6, abs=1e-12)


def test_validating_changes_nothing_in_training_and_rounds_are_reproducible(workspace, tmp_path, monkeypatch):
    rec = _record(monkeypatch)
    common = ("--validation_split", "0.5", "--max_train_steps", "6", "--network_dropout", "0.2", "--flip_aug")
    quiet = _argv(workspace, tmp_path / "quiet", *common, "--validate_every_n_epochs", "100")
    busy = _argv(workspace, tmp_path / "busy", *common, "--validate_every_n_steps", "1")
    again = _argv(workspace, tmp_path / "again", *common, "--validate_every_n_steps", "1")
    for argv in (quiet, busy, again):
        assert train_network_cat.main(argv) == 0
    quiet_lora, _ = read_lora_file(tmp_path / "quiet" / "cat.safetensors")
    busy_lora, _ = read_lora_file(tmp_path / "busy" / "cat.safetensors")
    assert all(torch.equal(quiet_lora[k], busy_lora[k]) for k in quiet_lora)
    busy_rounds, again_rounds = rec.rounds[:-len(rec.rounds) // 2], rec.rounds[-len(rec.rounds) // 2:]
    assert [r[:2] for r in busy_rounds] == [("step", 1), ("step", 2), ("step", 3), ("step", 4), ("epoch", 4),
                                            ("step", 5), ("step", 6), ("epoch", 6)]
    assert busy_rounds == again_rounds  # the same noise, timesteps, images and captions each run
    averages = [values["loss/validation/step_average"] for kind, _, values in busy_rounds if kind == "step"]
    assert len(set(averages)) == len(averages)  # each round moved only because the adapter did


def test_resume_with_validation_is_exact(workspace, tmp_path):
    steps = ("--validation_split", "0.5", "--max_train_steps", "6", "--validate_every_n_steps", "2")
    assert train_network_cat.main(_argv(workspace, tmp_path / "full", *steps)) == 0
    assert train_network_cat.main(_argv(workspace, tmp_path / "saving", *steps, "--save_state",
                                        "--save_every_n_steps", "3")) == 0
    state = tmp_path / "saving" / "cat-step00000003-state"
    assert train_network_cat.main(_argv(workspace, tmp_path / "resumed", *steps, "--resume", str(state))) == 0
    full, _ = read_lora_file(tmp_path / "full" / "cat.safetensors")
    resumed, _ = read_lora_file(tmp_path / "resumed" / "cat.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_plain_lora_validation_logs_no_cat_term(workspace, tmp_path, monkeypatch):
    rec = _record(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "--validation_split", "0.5", "--max_train_steps", "2", "--cat_weight", "0")
    assert train_network_cat.main(argv) == 0
    ((kind, _, values),) = rec.rounds
    assert kind == "epoch" and "loss/validation/cat" not in values and "loss/validation/epoch_average" in values


def test_validation_from_the_dataset_config(workspace, tmp_path, monkeypatch):
    rec = _record(monkeypatch)
    config = tmp_path / "data.toml"
    concept = (workspace / "data" / "train" / "2_sks teapot").as_posix()
    config.write_text(f'[general]\nvalidation_split = 0.5\n[[datasets]]\nresolution = 64\nvalidation_seed = 5\n'
                      f'[[datasets.subsets]]\nimage_dir = "{concept}"\nnum_repeats = 2\n', encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", "--dataset_config", str(config), "--max_train_steps", "2")
    assert train_network_cat.main(argv) == 0
    assert [kind for kind, _, _ in rec.rounds] == ["epoch"]


@pytest.mark.parametrize("extra, expected", [
    (("--validation_split", "1.0"), "--validation_split"),
    (("--validation_split", "-0.1"), "below 1"),
    (("--validate_every_n_steps", "0"), "--validate_every_n_steps"),
    (("--max_validation_steps", "0"), "--max_validation_steps"),
])
def test_bad_validation_flags(workspace, tmp_path, capsys, extra, expected):
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", *extra)) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("table, line, expected", [
    ("[[datasets.subsets]]", "validation_split = 0.2", "validation_split is a dataset's setting"),
    ("[general]", "validation_split = 1.5", "validation_split = 1.5 should be at least 0 and below 1"),
    ("[[datasets]]", 'validation_seed = "x"', "validation_seed = 'x' should be an integer"),
])
def test_bad_validation_keys_in_the_dataset_config(workspace, tmp_path, capsys, table, line, expected):
    concept = (workspace / "data" / "train" / "2_sks teapot").as_posix()
    sections = {"[general]": "", "[[datasets]]": "resolution = 64\n", "[[datasets.subsets]]": f'image_dir = "{concept}"\n'}
    sections[table] += line + "\n"
    config = tmp_path / "data.toml"
    config.write_text("".join(f"{name}\n{body}" for name, body in sections.items()), encoding="utf-8")
    assert train_network_cat.main(_argv(workspace, tmp_path / "out", "--dataset_config", str(config))) == 2
    assert expected in capsys.readouterr().err


def test_validate_flags_without_a_split_warn(workspace, tmp_path, monkeypatch, caplog):
    rec = _record(monkeypatch)
    argv = _argv(workspace, tmp_path / "out", "--validate_every_n_steps", "1", "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    assert rec.rounds == [] or all(values is None for _, _, values in rec.rounds)
    assert "no images are held out" in caplog.text


def test_held_out_main_term_is_masked_as_training_is(workspace, tmp_path, monkeypatch):
    """--alpha_mask: a held-out image's alpha weights its validation main term, as in sd-scripts."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "data" / "2_sks teapot"
    folder.mkdir(parents=True)
    for index in range(4):
        pixels = np.zeros((64, 64, 4), dtype=np.uint8)
        pixels[..., 0], pixels[:, 32:, 3] = 40 * index, 255  # the left half transparent
        Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of sks teapot", encoding="utf-8")
    masks = []
    real_batch = validation.Validation._losses

    def losses(self):
        noising = self.noising

        class Spy:
            num_train_timesteps = noising.num_train_timesteps

            def batch(self, *args, **kwargs):
                masks.append(kwargs["loss_mask"])
                return noising.batch(*args, **kwargs)

        self.noising = Spy()
        try:
            return real_batch(self)
        finally:
            self.noising = noising

    monkeypatch.setattr(validation.Validation, "_losses", losses)
    argv = _argv(workspace, tmp_path / "out", "--train_data_dir", str(tmp_path / "data"), "--reg_data_dir", "",
                 "--alpha_mask", "--validation_split", "0.5", "--max_train_steps", "1")
    assert train_network_cat.main(argv) == 0
    assert len(masks) == 4
    for mask in masks:
        assert mask.shape == (2, 64, 64)
        assert torch.equal(mask[:, :, :32], torch.zeros(2, 64, 32)) and torch.equal(mask[:, :, 32:], torch.ones(2, 64, 32))
