"""Aspect-ratio buckets, with sd-scripts' rules (`--enable_bucket`, `--bucket_no_upscale`).

An image is placed in a bucket: a training resolution (width, height) whose sides are multiples of
`reso_steps` and whose area is at most resolution^2. It is resized (`resized`) so that it covers the
bucket, then cropped to it. Without buckets every image goes into the one bucket `resolution`.
Pure functions: no image is read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSettings:
    """sd-scripts' bucket options of one dataset."""

    resolution: tuple[int, int]  # (width, height); its area bounds every bucket's
    enable: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    reso_steps: int = 64
    no_upscale: bool = False


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the size it is resized to before the crop, and the
    bucket's aspect-ratio error (bucket w/h minus image w/h); `original` is the image's own size."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    ar_error: float
    original: tuple[int, int] | None = None  # (width, height) of the file; None where unknown


def bucket_resolutions(resolution: tuple[int, int], min_size: int, max_size: int, steps: int) -> list[tuple[int, int]]:
    """The predefined buckets of sd-scripts' `make_bucket_resolutions`: the largest square within the
    area, and for each width from `min_size` to `max_size` in `steps`, the tallest height (a multiple
    of `steps`, at most `max_size`) within the area, and its transpose; sorted."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.update({(width, height), (height, width)})
    return sorted(resos)


def place_image(size: tuple[int, int], settings: BucketSettings, predefined: list[tuple[int, int]]) -> Placement:
    """The bucket for an image of `size` (width, height).

    Without `no_upscale`: the predefined bucket of the nearest aspect ratio (the first on a tie), the
    image scaled to cover it. With `no_upscale`: the image keeps its size (shrunk to the area if
    larger), and the bucket is that size rounded down to `reso_steps`.
    """
    width, height = size
    aspect = width / height
    if not settings.enable:
        bucket = settings.resolution
        resized = _cover(size, bucket)
    elif not settings.no_upscale:
        bucket = size if size in predefined else min(predefined, key=lambda r: abs(r[0] / r[1] - aspect))
        resized = _cover(size, bucket)
    else:
        resized = _shrink_to_area(size, settings.resolution[0] * settings.resolution[1], settings.reso_steps)
        steps = settings.reso_steps
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    # A side of 0 (bucket_no_upscale on an image smaller than a step) is reported by the caller.
    error = bucket[0] / bucket[1] - aspect if min(bucket) > 0 else float("inf")
    return Placement(bucket, resized, error, size)


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The image scaled (aspect kept) so that it just covers the bucket."""
    width, height = size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _shrink_to_area(size: tuple[int, int], max_area: int, steps: int) -> tuple[int, int]:
    """`no_upscale`: an image within the area keeps its size; a larger one is shrunk to the area,
    rounding whichever side keeps the aspect ratio closer (sd-scripts' rule)."""
    width, height = size
    if width * height <= max_area:
        return size
    aspect = width / height
    new_width = math.sqrt(max_area * aspect)
    new_height = max_area / new_width

    def to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    by_width = to_steps(new_width)
    by_height = to_steps(new_height)
    width_error = abs(by_width / max(to_steps(by_width / aspect), 1) - aspect)
    height_error = abs(to_steps(by_height * aspect) / max(by_height, 1) - aspect)
    if width_error < height_error:
        return by_width, int(by_width / aspect + 0.5)
    return int(by_height * aspect + 0.5), by_height


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], random_offset: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bucket inside the resized image: centred, or at the
    fractions `random_offset` of the free room (`random_crop`)."""
    room_x, room_y = max(resized[0] - bucket[0], 0), max(resized[1] - bucket[1], 0)
    if random_offset is None:
        left, top = room_x // 2, room_y // 2
    else:
        left, top = int(random_offset[0] * (room_x + 1)), int(random_offset[1] * (room_y + 1))
        left, top = min(left, room_x), min(top, room_y)
    return left, top, left + bucket[0], top + bucket[1]


def size_conditioning_crop(bucket: tuple[int, int], original: tuple[int, int], flipped: bool) -> tuple[int, int]:
    """(left, top) that SDXL is told as the crop of an image of size `original` trained at `bucket`,
    as sd-scripts computes it (its `get_crop_ltrb`, after Stability's preprocessing): the offset of
    the image scaled to fit inside the bucket, centred; mirrored for a flipped image. It describes
    the centred fit, not the pixels `random_crop` cut, in sd-scripts too."""
    bucket_ar, image_ar = bucket[0] / bucket[1], original[0] / original[1]
    if bucket_ar > image_ar:
        fitted = (bucket[1] * image_ar, bucket[1])
    else:
        fitted = (bucket[0], bucket[0] / image_ar)
    left, top = (bucket[0] - fitted[0]) // 2, (bucket[1] - fitted[1]) // 2
    if flipped:  # the right edge of the fit, seen from the mirrored image's left
        left = bucket[0] - (left + fitted[0])
    return int(left), int(top)


def check_bucket_settings(settings: BucketSettings, where: str, reso_multiple: int = 8) -> list[str]:
    """Problems with one dataset's bucket options, each a sentence naming `where` they came from;
    `reso_multiple` is what the model family needs bucket_reso_steps to be a multiple of (SDXL: 32)."""
    problems = []
    if settings.enable:
        if settings.reso_steps < reso_multiple or settings.reso_steps % reso_multiple:
            advice = ("64 for SD 1.x/2.x, as sd-scripts recommends" if reso_multiple == 8
                      else f"sd-scripts requires it for this model; e.g. {2 * reso_multiple}")
            problems.append(f"{where}: bucket_reso_steps = {settings.reso_steps} must be a positive multiple of "
                            f"{reso_multiple} ({advice})")
        if settings.min_reso > settings.max_reso:
            problems.append(f"{where}: min_bucket_reso = {settings.min_reso} is larger than max_bucket_reso = "
                            f"{settings.max_reso}; swap them")
        elif max(settings.resolution) > settings.max_reso or min(settings.resolution) < settings.min_reso:
            problems.append(f"{where}: resolution {settings.resolution} must lie within min_bucket_reso "
                            f"{settings.min_reso} and max_bucket_reso {settings.max_reso}")
    if any(side % 8 for side in settings.resolution):
        problems.append(f"{where}: resolution {settings.resolution} must be a multiple of 8 on both sides "
                        "(the VAE downsamples by 8)")
    return problems
