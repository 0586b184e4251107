"""The example TOMLs in configs/examples parse into the settings they describe."""

from pathlib import Path

import pytest

from library.cli.train_args import parse_args

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "configs" / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_parses(path):
    config = parse_args(["--config_file", str(path)])
    assert config.cat.enabled and config.cat.triggers == ("sks",)
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
    data = parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--dataset_config", str(copy)]).data
    (spec,) = load_dataset_config(copy, data)
    concept, reg = spec.subsets
    assert spec.buckets.enable and spec.buckets.resolution == (512, 512) and spec.batch_size == 2
    assert concept.repeats == 10 and concept.cat_triggers == ("sks",) and reg.is_reg
    assert concept.options.flip_aug and concept.options.captions.keep_tokens == 1


def test_there_is_an_example_dataset_config():
    assert DATASET_EXAMPLES
