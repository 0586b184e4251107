"""sd-scripts' face-centred crops (`face_crop_aug_range`), pure functions: no image is read here.

An image named `<name>_<face x>_<face y>_<face width>_<face height>.<ext>` (the face's centre and
size, in pixels of the image) is, at each step, scaled so that the face's larger side is between
1/high and 1/low of the training resolution's shorter side (never enlarged, never smaller than the
resolution), then cropped to the resolution around the face: centred on it, moved a little at random
when the range is a range and the face is large, or anywhere that keeps the face in view with
`random_crop`. An image without a face position (fewer parts, or a face x of 0) is trained as
without the option. Only without buckets, as in sd-scripts (which ignores the option with buckets
or cached latents; here those combinations are refused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError


@dataclass(frozen=True)
class FacePosition:
    """Where the face is in the image file: its centre and size, in pixels."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class FaceCrop:
    """One step's face crop: the size the image is scaled to, and the box cut from the scaled image."""

    resized: tuple[int, int]  # (width, height)
    box: tuple[int, int, int, int]  # (left, top, right, bottom)


def face_position(path: Path) -> FacePosition | None:
    """The face position in the file name, sd-scripts' rule: the last four `_`-separated parts of the
    stem when there are at least five; None without them or with a face x of 0 or less."""
    parts = path.stem.split("_")
    if len(parts) < 5:
        return None
    try:
        x, y, width, height = (int(part) for part in parts[-4:])
    except ValueError:
        raise UserInputError(
            f"{path}: with face_crop_aug_range the last four '_' parts of a file name are the face's x, y, width "
            f"and height ('<name>_<x>_<y>_<w>_<h>'), and {'_'.join(parts[-4:])!r} are not all whole numbers; "
            "rename the file (fewer '_' parts for no face position) or remove face_crop_aug_range"
        ) from None
    if x <= 0:
        return None
    if max(width, height) <= 0:
        raise UserInputError(f"{path}: the face size in the file name is {width}x{height}; give the face's width "
                             "and height in pixels, or rename the file without a face position")
    return FacePosition(x, y, width, height)


def face_crop(size: tuple[int, int], face: FacePosition, target: tuple[int, int], aug_range: tuple[float, float],
              random_crop: bool, rng: random.Random) -> FaceCrop | None:
    """sd-scripts' `crop_target` for an image of `size` (width, height) cut to `target`, drawing from
    `rng`; None for an image already at the target size (trained as it is)."""
    width, height = size
    if size == target:
        return None
    face_size = max(face.width, face.height)
    shorter = min(target)
    fit = max(target[1] / height, target[0] / width)  # the scale that just covers the target
    min_scale = min(1.0, max(fit, shorter / (face_size * aug_range[1])))
    max_scale = min(1.0, max(min_scale, shorter / (face_size * aug_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    jitter = aug_range[0] != aug_range[1] and face_size > shorter // 10 and face_size >= 40
    # Rows first, then columns: the order of sd-scripts' draws.
    top = _start(target[1], resized[1], int(face.y * scale + 0.5), face_size, jitter, random_crop, rng)
    left = _start(target[0], resized[0], int(face.x * scale + 0.5), face_size, jitter, random_crop, rng)
    return FaceCrop(resized, (left, top, left + target[0], top + target[1]))


def _start(target: int, length: int, face_at: int, face_size: int, jitter: bool, random_crop: bool,
           rng: random.Random) -> int:
    """Where the crop starts on one axis: centred on the face; with `random_crop` shifted by a
    triangular draw over the face's distance to the farther edge; else, with `jitter`, by up to 1/20
    of the face size; kept inside the image."""
    start = face_at - target // 2
    if random_crop:
        reach = max(length - face_at, face_at)
        start += rng.randint(0, reach) + rng.randint(0, reach) - reach
    elif jitter:
        start += rng.randint(-face_size // 20, +face_size // 20)
    return max(0, min(start, length - target))


def face_crop_problem(path: Path, size: tuple[int, int], target: tuple[int, int]) -> str | None:
    """Why an image cannot be face-cropped to `target`, or None: sd-scripts never enlarges a face-cropped
    image, so one smaller than the resolution stops its training at that image."""
    face = face_position(path)
    if face is None or size == target or (size[0] >= target[0] and size[1] >= target[1]):
        return None
    return (f"{path}: face crops never enlarge an image, and this one is {size[0]}x{size[1]} pixels, smaller than "
            f"the resolution {target[0]}x{target[1]}; use a larger image, or rename it without a face position")
