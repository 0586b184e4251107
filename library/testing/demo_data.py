"""A small generated dataset in sd-scripts' folder layout, for the demo and the tests.

The "sks" concept is a red disc on a blue background; the regularisation images are teapot-free
noise patterns. Captions are `.txt` files, as GUIs write them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CONCEPT_CAPTIONS = [
    "a photo of sks teapot",
    "sks teapot on a table",
    "a close-up of sks teapot, studio light",
    "sks teapot in a kitchen",
]


def write_demo_dataset(root: str | Path, size: int = 64, seed: int = 0, repeats: int = 2, with_reg: bool = False) -> Path:
    """Write `root/train/<repeats>_sks teapot/*.png` (+ `.txt` captions), optionally `root/reg/1_teapot`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    concept = root / "train" / f"{repeats}_sks teapot"
    concept.mkdir(parents=True, exist_ok=True)
    for index, caption in enumerate(CONCEPT_CAPTIONS):
        _disc_image(rng, size).save(concept / f"{index:03d}.png")
        (concept / f"{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    if with_reg:
        reg = root / "reg" / "1_teapot"
        reg.mkdir(parents=True, exist_ok=True)
        for index in range(2):
            noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(noise).save(reg / f"{index:03d}.png")
    return root


def _disc_image(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.15, 0.3) * size
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 2] = 200
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    image[inside] = (220, 30, 30)
    return Image.fromarray(image)
