"""How long reading a dataset takes at start, with and without `--cache_info`.

    .venv/bin/python -m bench.dataset_scan [--images 400] [--size 768x512] [--rounds 3]

Writes `--images` PNG images of random noise (incompressible, so each is a full-size file) with
captions into a temporary `<repeats>_<class>` folder, then times `place_datasets` (every image's size
read and checked, then placed in its bucket) three ways in each round: without `cache_info` (each image
decoded at reduced scale, as every run does), with `cache_info` and no cache file (the same, plus
writing it), and with an up-to-date cache file (sizes from the file, no image opened). Prints the
median over the rounds of each, and its ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.buckets import BucketSettings
from library.data.caption_transforms import CaptionOptions
from library.data.folder_dataset import SubsetOptions, scan_folders
from library.data.info_cache import CACHE_FILE
from library.data.training_data import DatasetSpec, place_datasets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="dataset start-up time with and without --cache_info")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="768x512", help="WIDTHxHEIGHT of each image")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(f"a photo of sks, number {index}\n", encoding="utf-8")


def timed_scan(root: Path, cache_info: bool) -> float:
    started = time.perf_counter()
    options = SubsetOptions(CaptionOptions(), cache_info=cache_info)
    spec = DatasetSpec(tuple(scan_folders(root, ".txt", False, options)), 1,
                       BucketSettings((512, 512), True, 256, 1024, 64, False))
    place_datasets([spec])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    width, height = (int(side) for side in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        concept = root / "1_sks"
        write_images(concept, args.images, width, height)
        times: dict[str, list[float]] = {"no cache_info": [], "cache_info, writing the file": [],
                                         "cache_info, file up to date": []}
        timed_scan(root, False)  # warm-up: the page cache holds the images from here on, for every way
        for _ in range(args.rounds):
            (concept / CACHE_FILE).unlink(missing_ok=True)
            times["no cache_info"].append(timed_scan(root, False))
            times["cache_info, writing the file"].append(timed_scan(root, True))
            times["cache_info, file up to date"].append(timed_scan(root, True))
    print(f"{args.images} PNG images of {width}x{height}, median of {args.rounds} rounds (files in the page cache)")
    base = statistics.median(times["no cache_info"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32}{median:9.3f} s{median / base:8.2f}x")


if __name__ == "__main__":
    main()
