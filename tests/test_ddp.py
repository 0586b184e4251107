"""Data parallel on CPU (torchrun, gloo): gradients are synchronised once per optimizer step, in both
CAT modes, and every process ends with the same adapter weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir

PROBE = Path(__file__).parent / "scripts" / "ddp_probe.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


def _probe(workspace, out, *extra) -> list[dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", str(PROBE),
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "ddp",
        "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "3", "--train_batch_size", "1",
        "--cat_trigger", "sks", "--seed", "1", "--max_data_loader_n_workers", "0", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    probes = [json.loads(path.read_text()) for path in sorted(Path(out).glob("probe-rank*.json"))]
    assert sorted(p["rank"] for p in probes) == [0, 1]
    return probes


@pytest.mark.parametrize("extra", [
    ("--cat_mode", "sequential"),
    ("--cat_mode", "batched"),
    ("--cat_weight", "0"),
    ("--cat_mode", "sequential", "--gradient_accumulation_steps", "2"),
], ids=["sequential", "batched", "plain", "sequential-accumulate"])
def test_one_gradient_sync_per_optimizer_step(workspace, tmp_path, extra):
    probes = _probe(workspace, tmp_path / "out", *extra)
    assert [p["allreduce"] for p in probes] == [3, 3], "3 optimizer steps: 3 all-reduces, whatever the mode"
    assert probes[0]["checksum"] == probes[1]["checksum"], "the ranks' adapters diverged"
    assert (tmp_path / "out" / "ddp.safetensors").is_file()
