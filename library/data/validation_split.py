"""`--validation_split` / `validation_split`: images of a dataset held out of training to validate on.

As in sd-scripts, each dataset's split applies to each of its subsets: a subset's images are shuffled
by `validation_seed` (the run's seed when unset) and the first `ceil(n * (1 - split))` train; the
rest are held out. Regularisation subsets are never split. Two differences, both so that a held-out
image is never trained on and every validation round measures the same thing:
- the held-out images are exactly the ones not trained on (sd-scripts holds out `round(n * split)`
  from the end, which can overlap the training part by one image);
- they are validated once each (no repeats), as written: no flip, crop or colour augmentation, and
  their captions without shuffling, dropout or token warmup (prefix, suffix and wildcards still
  apply), and no face crop.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from library.data.folder_dataset import Subset, SubsetOptions
from library.data.training_data import DatasetSpec


def split_for_validation(specs: list[DatasetSpec], run_seed: int) -> tuple[list[DatasetSpec], list[DatasetSpec]]:
    """(the datasets to train on, the held-out datasets); a dataset without a split keeps all its images
    and has no held-out counterpart."""
    training, held_out = [], []
    for spec in specs:
        if not spec.validation_split:
            training.append(spec)
            continue
        seed = run_seed if spec.validation_seed is None else spec.validation_seed
        parts = [_split_subset(subset, spec.validation_split, seed) for subset in spec.subsets]
        training.append(replace(spec, subsets=tuple(train for train, _ in parts)))
        validation = tuple(held for _, held in parts if held is not None)
        if validation:
            held_out.append(replace(spec, subsets=validation))
    return training, held_out


def _split_subset(subset: Subset, split: float, seed: int) -> tuple[Subset, Subset | None]:
    if subset.is_reg:
        return subset, None
    items = sorted(subset.items, key=lambda item: str(item.path))
    random.Random(seed).shuffle(items)
    keep = math.ceil(len(items) * (1 - split))
    held_paths = {item.path for item in items[keep:]}
    # Both parts keep the subset's own order, so the training part is the subset less its held-out images.
    train = tuple(item for item in subset.items if item.path not in held_paths)
    held = [item for item in subset.items if item.path in held_paths]
    validation = None
    if held:
        options = as_written(subset.options)
        validation = replace(subset, repeats=1, options=options,
                             items=tuple(replace(item, options=options) for item in held))
    return replace(subset, items=train), validation


def as_written(options: SubsetOptions) -> SubsetOptions:
    """`options` without what changes an image or its caption from one step to the next at random."""
    captions = replace(options.captions, shuffle=False, dropout_rate=0.0, dropout_every_n_epochs=0,
                       tag_dropout_rate=0.0, token_warmup_step=0.0)
    return replace(options, captions=captions, flip_aug=False, color_aug=False, random_crop=False,
                   face_crop_aug_range=None)
