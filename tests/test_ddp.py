"""Data parallel on CPU (torchrun, gloo): gradients are synchronised once per optimizer step, in both
CAT modes, and every process ends with the same adapter weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_network_cat
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir

PROBE = Path(__file__).parent / "scripts" / "ddp_probe.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    return root


def _probe_argv(workspace, out, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)), "--train_data_dir", str(workspace / "data" / "train"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "ddp",
        "--network_dim", "4", "--learning_rate", "1e-3", "--max_train_steps", "3", "--train_batch_size", "1",
        "--cat_trigger", "sks", "--seed", "1", "--max_data_loader_n_workers", "0", *extra,
    ]


def _probe(workspace, out, *extra, first_step: bool = False) -> list[dict]:
    """With `first_step`, the probe also records (and alters) the first step's gradients."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(PROBE), *_probe_argv(workspace, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROBE_FIRST_STEP": "1" if first_step else "0"}
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
    probes = _probe(workspace, tmp_path / "out", *extra, first_step=True)
    assert [p["allreduce"] for p in probes] == [3, 3], "3 optimizer steps: 3 all-reduces, whatever the mode"
    assert probes[0]["checksum"] == probes[1]["checksum"], "the ranks' adapters diverged"
    assert probes[0]["seed"] == 1 and probes[1]["seed"] != 1, "each rank draws its own noise; rank 0 the run's"
    grads = [torch.load(tmp_path / "out" / f"grads-rank{rank}.pt") for rank in (0, 1)]
    local, averaged = [g["local"] for g in grads], [g["averaged"] for g in grads]
    assert averaged[0][0] is None and averaged[1][0] is None, "a parameter no rank used keeps no gradient"
    assert local[0][1] is None and torch.equal(averaged[0][1], local[1][1] / 2), "one rank's gradient, averaged with 0"
    assert not torch.equal(local[0][3], local[1][3]), "the ranks trained on different samples and noise"
    mean = (local[0][3] + local[1][3]) / 2  # an up-projection: a down one has no gradient at step 1
    assert all(torch.allclose(a[3], mean, rtol=0, atol=1e-7) for a in averaged), "the mean of the ranks' gradients"
    assert torch.equal(averaged[0][3], averaged[1][3])
    assert (tmp_path / "out" / "ddp.safetensors").is_file()


def test_drift_budget_gives_every_rank_the_same_alpha(workspace, tmp_path):
    """Each rank sees its own samples, so its CAT term differs; the budget follows their mean, so every
    rank trains with the same alpha (one more all-reduce per optimizer step). A budget of 1e-3 keeps the
    tiny run's relative error inside the clip, where the ranks' own terms would give different alphas."""
    probes = _probe(workspace, tmp_path / "out", "--cat_drift_budget", "1e-3", "--cat_budget_rate", "0.2")
    assert probes[0]["alpha"] == probes[1]["alpha"] != 1.0
    assert [p["allreduce"] for p in probes] == [6, 6]
    assert probes[0]["checksum"] == probes[1]["checksum"]


def test_resume_continues_every_ranks_own_noise(workspace, tmp_path, capsys):
    steps = ("--max_train_steps", "4")
    full = _probe(workspace, tmp_path / "full", *steps)
    _probe(workspace, tmp_path / "saving", *steps, "--save_state", "--save_every_n_steps", "2")
    state = tmp_path / "saving" / "ddp-step00000002-state"
    streams = torch.load(state / "rng.pt")["processes"]
    assert len(streams) == 2 and not torch.equal(streams[0]["generator"], streams[1]["generator"])
    resumed = _probe(workspace, tmp_path / "resumed", *steps, "--resume", str(state))
    assert [p["checksum"] for p in resumed] == [p["checksum"] for p in full]
    # The same state in a one-process run: refused, since each process continues its own stream.
    one = _probe_argv(workspace, tmp_path / "one", *steps, "--resume", str(state))
    assert train_network_cat.main(one) == 2
    assert "saved by a run of 2 process(es), this run has 1" in capsys.readouterr().err


def test_cat_prompts_train_in_step_on_every_rank(workspace, tmp_path):
    """--cat_prompts: each rank draws its prompts from its own stream and preserves them in the same
    backward pass as its batch, so the step still costs one all-reduce and the ranks stay equal."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na bowl of fruit\na mountain lake\n", encoding="utf-8")
    probes = _probe(workspace, tmp_path / "out", "--cat_prompts", str(prompts), "--cat_prompts_per_step", "2")
    assert [p["allreduce"] for p in probes] == [3, 3]
    assert probes[0]["checksum"] == probes[1]["checksum"]
