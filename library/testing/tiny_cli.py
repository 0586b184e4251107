"""The tiny SD 1.x command line most CLI tests start from: a workspace (the tiny checkpoint and the
demo dataset with regularisation images) and the flags of a short CAT run on it. A test adds its own
flags after these; argparse lets a later flag override an earlier one (`--learning_rate 1e-2`)."""

from __future__ import annotations

from pathlib import Path

from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir


def write_tiny_sd_workspace(root: Path) -> Path:
    """`root/tiny.safetensors` (seed 0) and `root/data/{train,reg}` (4 concept images with 2 repeats, 2 reg)."""
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data", with_reg=True)
    return root


def tiny_sd_argv(root: Path, out: Path, *extra: str) -> list[str]:
    """A 4-step CAT run (trigger sks, rank 4, batch 2, seed 3) on the workspace, writing `out/cat.safetensors`."""
    return [
        "--pretrained_model_name_or_path", str(root / "tiny.safetensors"),
        "--model_config", str(tiny_config_dir(False)),
        "--train_data_dir", str(root / "data" / "train"), "--reg_data_dir", str(root / "data" / "reg"),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "cat",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "4",
        "--train_batch_size", "2", "--seed", "3", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0",
        *extra,
    ]
