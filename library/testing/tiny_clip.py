"""A tiny open_clip model with seeded random weights, for tests and the README demo of `evaluate_kps.py`.

No CLIP weights can be downloaded on our machines; `configs/clip/tiny_open_clip.json` describes a
model of 1.6M parameters (mostly the token embedding) that open_clip builds and loads like any
other. Its image embedding averages the patch tokens (`pool_type: avg`): with random weights the
class token barely depends on the image, the average does. Its scores show the mechanics of the
evaluation, not image quality.

    .venv/bin/python -m library.testing.tiny_clip demo_output/tiny_open_clip.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

TINY_CLIP_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "clip" / "tiny_open_clip.json"


def save_tiny_open_clip(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny open_clip model (weights depend only on `seed`) and save its weights as safetensors."""
    open_clip.add_model_config(TINY_CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_CONFIG.stem)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage; each gets its own.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the tiny open_clip model's weights")
    parser.add_argument("path", help="where to write the .safetensors file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {save_tiny_open_clip(args.path, args.seed)} (config {TINY_CLIP_CONFIG})")
