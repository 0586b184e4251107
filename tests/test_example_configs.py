"""The example TOMLs in configs/examples parse into the settings they describe: every key each file
sets is read from it and reaches the `TrainConfig` (or the dataset) with the value the file gives."""

import tomllib
from pathlib import Path

import pytest

from library.cli.arg_values import read_arg_values
from library.config.training_script import FLUX_SCRIPT, SD_SCRIPT, SDXL_SCRIPT
from library.cli.train_args import parse_args

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "configs" / "examples").glob("*.toml"))

# Each key of the training examples -> where it lands in the TrainConfig. A key added to an example
# needs a line here; the value compared is the one the file sets, converted as the flag converts it.
WHERE = {
    "pretrained_model_name_or_path": lambda c: c.model.pretrained_model_name_or_path,
    "clip_skip": lambda c: c.model.clip_skip,
    "no_half_vae": lambda c: c.model.no_half_vae,
    "mixed_precision": lambda c: c.run.mixed_precision,
    "sdpa": lambda c: c.model.sdpa,
    "train_data_dir": lambda c: c.data.train_data_dir,
    "caption_extension": lambda c: c.data.caption_extension,
    "resolution": lambda c: c.data.resolution,
    "train_batch_size": lambda c: c.data.train_batch_size,
    "enable_bucket": lambda c: c.data.enable_bucket,
    "min_bucket_reso": lambda c: c.data.min_bucket_reso,
    "max_bucket_reso": lambda c: c.data.max_bucket_reso,
    "bucket_reso_steps": lambda c: c.data.bucket_reso_steps,
    "cache_latents": lambda c: c.data.cache_latents,
    "max_data_loader_n_workers": lambda c: c.data.max_data_loader_n_workers,
    "network_module": lambda c: c.network.module,
    "network_dim": lambda c: c.network.dim,
    "network_alpha": lambda c: c.network.alpha,
    "network_args": lambda c: dict(c.network.args),
    "optimizer_type": lambda c: c.optimizer.optimizer_type,
    "optimizer_args": lambda c: dict(c.optimizer.optimizer_args),
    "learning_rate": lambda c: c.optimizer.learning_rate,
    "unet_lr": lambda c: c.optimizer.unet_lr,
    "text_encoder_lr": lambda c: c.optimizer.text_encoder_lr,
    "lr_scheduler": lambda c: c.scheduler.lr_scheduler,
    "lr_warmup_steps": lambda c: c.scheduler.lr_warmup_steps,
    "max_grad_norm": lambda c: c.optimizer.max_grad_norm,
    "max_train_steps": lambda c: c.run.max_train_steps,
    "seed": lambda c: c.run.seed,
    "gradient_checkpointing": lambda c: c.run.gradient_checkpointing,
    "min_snr_gamma": lambda c: c.loss.min_snr_gamma,
    "save_every_n_steps": lambda c: c.save.save_every_n_steps,
    "save_state": lambda c: c.save.save_state,
    "cat_weight": lambda c: c.cat.weight,
    "cat_trigger": lambda c: list(c.cat.triggers),
    "cat_caption": lambda c: c.cat.caption,
    "cat_mode": lambda c: c.cat.mode,
    "output_dir": lambda c: c.save.output_dir,
    "output_name": lambda c: c.save.output_name,
    "save_precision": lambda c: c.save.save_precision,
    "log_with": lambda c: c.log.log_with,
    "logging_dir": lambda c: c.log.logging_dir,
    "clip_l": lambda c: c.model.clip_l,
    "t5xxl": lambda c: c.model.t5xxl,
    "ae": lambda c: c.model.ae,
    "guidance_scale": lambda c: c.model.guidance_scale,
    "apply_t5_attn_mask": lambda c: c.model.apply_t5_attn_mask,
    "timestep_sampling": lambda c: c.flow.timestep_sampling,
    "discrete_flow_shift": lambda c: c.flow.discrete_flow_shift,
    "model_prediction_type": lambda c: c.flow.model_prediction_type,
    "cache_text_encoder_outputs": lambda c: c.data.cache_text_encoder_outputs,
    "network_train_unet_only": lambda c: c.network.train_unet_only,
}

# Values the flags convert: the text of the file -> what the TrainConfig holds.
CONVERTED = {
    # A list gives one rate per text encoder (SDXL's TE1, TE2).
    "text_encoder_lr": lambda v: tuple(v) if isinstance(v, list) else v,
    "resolution": lambda v: tuple(int(x) for x in v.split(",")),
    "network_args": lambda v: dict(item.split("=", 1) for item in v),
    "optimizer_args": lambda v: {k: tuple(float(x) for x in t.split(",")) if "," in t else float(t)
                                 for k, t in (item.split("=", 1) for item in v)},
}


def _keys(path: Path) -> dict:
    """The file's keys, tables flattened (as sd-scripts reads them)."""
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    return {k: v for name, table in document.items() for k, v in (table.items() if isinstance(table, dict) else [(name, table)])}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_parses(path):
    keys = _keys(path)
    assert keys.keys() <= WHERE.keys(), f"keys this test does not check yet: {sorted(keys.keys() - WHERE.keys())}"
    assert read_arg_values(["--config_file", str(path)]).from_file == keys.keys(), "every key is read from the file"
    script = SDXL_SCRIPT if "sdxl" in path.stem else FLUX_SCRIPT if "flux" in path.stem else SD_SCRIPT
    config = parse_args(["--config_file", str(path)], script)
    for key, value in keys.items():
        assert WHERE[key](config) == CONVERTED.get(key, lambda v: v)(value), key
    # What those values mean together.
    assert config.cat.enabled and config.cat.triggers == ("sks",)
    if script is FLUX_SCRIPT:  # the GUI's FLUX module name; ours trains it
        assert config.network.module == "networks.lora_flux" and config.network.train_unet_only
    else:
        assert config.network.module == "networks.lora_cat" and config.network.args["conv_dim"] == "8"
    assert config.optimizer.optimizer_args["betas"] == (0.9, 0.999)
    assert config.scheduler.warmup_steps(600) == 30


def test_there_is_an_example():
    assert EXAMPLES


DATASET_EXAMPLES = sorted(EXAMPLES[0].parent.glob("datasets/*.toml")) if EXAMPLES else []


@pytest.mark.parametrize("path", DATASET_EXAMPLES, ids=[p.stem for p in DATASET_EXAMPLES])
def test_example_dataset_config_loads(path, tmp_path):
    """The example dataset TOML, beside folders of the names it gives, loads with every option it sets."""
    from PIL import Image

    from library.data.dataset_config import load_dataset_config

    copy = tmp_path / path.name
    copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    for folder in ("data/sks_teapot", "data/teapots"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "0.png")
    # caption_extension = ".txt": the .txt caption is read, not sd-scripts' default .caption one.
    (tmp_path / "data/sks_teapot/0.txt").write_text("sks teapot, red, on a table", encoding="utf-8")
    (tmp_path / "data/sks_teapot/0.caption").write_text("not this one", encoding="utf-8")
    data = parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--dataset_config", str(copy)]).data
    (spec,) = load_dataset_config(copy, data)
    concept, reg = spec.subsets
    buckets = spec.buckets
    assert spec.batch_size == 2 and buckets.resolution == (512, 512) and buckets.enable
    assert (buckets.min_reso, buckets.max_reso, buckets.reso_steps) == (256, 1024, 64)
    assert concept.folder == tmp_path / "data/sks_teapot" and reg.folder == tmp_path / "data/teapots"
    assert concept.repeats == 10 and concept.class_tokens == "sks teapot" and concept.cat_triggers == ("sks",)
    assert not concept.is_reg and reg.is_reg and reg.class_tokens == "teapot" and reg.repeats == 1
    assert [item.caption for item in concept.items] == ["sks teapot, red, on a table"]
    assert [item.caption for item in reg.items] == ["teapot"], "no caption file: the class tokens"
    for subset in (concept, reg):  # [general] reaches every subset
        captions = subset.options.captions
        assert subset.options.flip_aug and captions.shuffle and captions.keep_tokens == 1


def test_there_is_an_example_dataset_config():
    assert DATASET_EXAMPLES
