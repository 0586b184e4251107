"""The images of a run, placed in buckets, and the batches of each epoch.

A run has one or more datasets (sd-scripts' `[[datasets]]`; the folders of `--train_data_dir` and
`--reg_data_dir` are one dataset), each with its own batch size and buckets. Every image is read
once before training: a problem with any image is reported, all of them in one message, before
the first step.

An epoch, as in sd-scripts: each training image repeated by its subset's repeats, regularisation
images repeated up to the training-image count (per dataset); grouped by bucket; each bucket
shuffled and cut into batches (so a batch holds one bucket's size); all batches shuffled. The
shuffles are seeded by (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from library.data.buckets import BucketSettings, Placement, bucket_resolutions, place_image
from library.errors import UserInputError
from library.data.folder_dataset import ImageItem, Subset
from library.data.image_loading import inspect_image
from library.data.info_cache import cached_sizes, write_cache


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset as configured: its subsets, batch size and bucket options, and the share of its
    images held out for validation (`library.data.validation_split`)."""

    subsets: tuple[Subset, ...]
    batch_size: int
    buckets: BucketSettings
    validation_split: float = 0.0
    validation_seed: int | None = None  # None: the run's seed


@dataclass(frozen=True)
class Sample:
    """One image of one epoch: where it sits in the epoch, and the bucket it trains at."""

    position: int  # index over the epoch's batches, flattened; seeds this sample's randomness
    item: ImageItem
    placement: Placement


@dataclass
class Dataset:
    """A dataset with every image placed in its bucket."""

    spec: DatasetSpec
    placements: dict[Path, Placement]

    @property
    def subsets(self) -> tuple[Subset, ...]:
        return self.spec.subsets

    def epoch_items(self) -> list[ImageItem]:
        """Training images with repeats, then regularisation images repeated up to as many."""
        train = [item for s in self.subsets if not s.is_reg for item in s.items for _ in range(s.repeats)]
        reg_pool = [item for s in self.subsets if s.is_reg for item in s.items for _ in range(s.repeats)]
        if not reg_pool:
            return train
        return train + (reg_pool * math.ceil(len(train) / len(reg_pool)))[: len(train)]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket in one epoch (repeats included), buckets sorted."""
        counts = Counter(self.placements[item.path].bucket for item in self.epoch_items())
        return dict(sorted(counts.items()))

    def bucket_info(self) -> dict:
        """sd-scripts' `bucket_info`: the buckets in use with their counts, and the mean aspect-ratio
        error of the images (without repeats)."""
        buckets = {i: {"resolution": list(reso), "count": count} for i, (reso, count) in enumerate(self.bucket_counts().items())}
        errors = [abs(p.ar_error) for p in self.placements.values()]
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}

    @property
    def num_train_images(self) -> int:
        return sum(len(s.items) * s.repeats for s in self.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(len(s.items) * s.repeats for s in self.subsets if s.is_reg)  # with repeats, as sd-scripts counts


@dataclass
class TrainingData:
    """All datasets of a run; `validation`, the images held out of them (--validation_split), if any."""

    datasets: list[Dataset]
    validation: TrainingData | None = None

    @property
    def subsets(self) -> list[Subset]:
        return [s for d in self.datasets for s in d.subsets]

    def epoch_batches(self, epoch: int, seed: int) -> list[list[Sample]]:
        """The batches of one epoch, in training order."""
        rng = random.Random(seed * 100_003 + epoch)
        batches: list[list[tuple[ImageItem, Placement]]] = []
        for dataset in self.datasets:
            by_bucket: dict[tuple[int, int], list[ImageItem]] = {}
            for item in dataset.epoch_items():
                by_bucket.setdefault(dataset.placements[item.path].bucket, []).append(item)
            for bucket in sorted(by_bucket):
                items = by_bucket[bucket]
                rng.shuffle(items)
                size = dataset.spec.batch_size
                batches += [[(i, dataset.placements[i.path]) for i in items[s : s + size]] for s in range(0, len(items), size)]
        rng.shuffle(batches)
        samples, position = [], 0
        for batch in batches:
            samples.append([Sample(position + k, item, placement) for k, (item, placement) in enumerate(batch)])
            position += len(batch)
        return samples

    def batches_per_epoch(self) -> int:
        """The number of batches in every epoch (the same in each)."""
        return len(self.epoch_batches(1, 0))

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def bucket_table(self) -> str:
        """The buckets in use, printed at start as sd-scripts does."""
        lines = []
        for index, dataset in enumerate(self.datasets):
            info = dataset.bucket_info()
            lines.append(f"dataset {index}: batch size {dataset.spec.batch_size}, "
                         f"mean aspect-ratio error {info['mean_img_ar_error']:.4f}")
            lines += [f"  bucket {i}: {b['resolution'][0]}x{b['resolution'][1]}, {b['count']} images"
                      for i, b in info["buckets"].items()]
        return "\n".join(lines)


def place_datasets(specs: list[DatasetSpec], earlier: list[str] | None = None) -> TrainingData:
    """Read every image's size (checking that it can be trained on) and place it in its dataset's
    buckets; every problem, with the `earlier` ones found by the caller, is reported in one error."""
    problems: list[str] = list(earlier or [])
    cached = _cache_info_folders(specs)
    known = {path: size for folder in cached for path, size in cached_sizes(folder).items()}
    sizes: dict[Path, tuple[int, int]] = {}
    for path in sorted({item.path for spec in specs for s in spec.subsets for item in s.items}):
        size, problem = (known[path], None) if path in known else inspect_image(path)
        if problem:
            problems.append(problem)
        else:
            sizes[path] = size
    _raise_all(problems)  # placing needs every size
    for folder, items in cached.items():
        if {item.path for item in items} != {path for path in known if path.parent == folder}:
            write_cache(folder, items, sizes)
    datasets = []
    for index, spec in enumerate(specs):
        settings = spec.buckets
        predefined = bucket_resolutions(settings.resolution, settings.min_reso, settings.max_reso, settings.reso_steps)
        placements = {
            item.path: place_image(sizes[item.path], settings, predefined) for s in spec.subsets for item in s.items
        }
        problems += [
            f"{path}: with bucket_no_upscale its bucket would be {p.bucket[0]}x{p.bucket[1]} pixels (the image is "
            f"smaller than bucket_reso_steps {settings.reso_steps}); remove it or turn bucket_no_upscale off"
            for path, p in placements.items() if min(p.bucket) < 8
        ]
        datasets.append(Dataset(spec, placements))
    _raise_all(problems)
    return TrainingData(datasets)


def _cache_info_folders(specs: list[DatasetSpec]) -> dict[Path, list[ImageItem]]:
    """The image folders of the DreamBooth subsets with `cache_info` (sd-scripts has it for those only),
    with every image of each (a folder split by validation_split, or in two subsets, is whole here)."""
    folders: dict[Path, dict[Path, ImageItem]] = {}
    for spec in specs:
        for subset in spec.subsets:
            if subset.options.cache_info and subset.metadata_file is None:
                folders.setdefault(subset.folder, {}).update((item.path, item) for item in subset.items)
    return {folder: list(items.values()) for folder, items in folders.items()}


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise UserInputError(f"the training data has {len(problems)} problem(s), all listed here:\n  - "
                             + "\n  - ".join(problems))
