"""The example TOMLs in configs/examples parse into the settings they describe."""

from pathlib import Path

import pytest

from library.train_args import parse_args

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
