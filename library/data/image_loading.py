"""Reading training images: sizes and checks before training, pixels with augmentations during it.

Images are read as users see them: EXIF orientation applied, transparency flattened on white. A
training image is resized to cover its bucket (with `resize_interpolation`), cropped to it (centred,
or at a random place with `random_crop`; or around the face with `face_crop_aug_range`), optionally
flipped (`flip_aug`) and hue-shifted (`color_aug`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.buckets import crop_box
from library.data.face_crop import FaceCrop
from library.data.resampling import resize_image
from library.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 degrees: width and height swap
# sd-scripts' colour augmentation: a third of the samples get either a hue shift of up to 8 of
# OpenCV's 180 hue steps or a gamma between 0.95 and 1.05.
COLOR_AUG_RATE = 0.33
MAX_HUE_SHIFT = 8 / 180
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Augmentation:
    """The random choices for one sample: where to crop, whether to flip, the hue shift and gamma, the face crop."""

    crop_offset: tuple[float, float] | None = None  # fractions of the free room; None: centred
    flip: bool = False
    hue_shift: float = 0.0  # in turns of the colour wheel
    gamma: float = 1.0  # on values scaled to 0..1
    face_crop: FaceCrop | None = None  # face_crop_aug_range: replaces the resize and the crop at crop_offset


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
            return height, width
        return width, height


def inspect_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(displayed size, None) for an image that can be trained on, else (None, why not). The image is
    fully decoded (at reduced scale for JPEG, which is cheap) so truncated and corrupt files are found
    before training, not at their batch."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width < 8 or height < 8:
                return None, f"{path}: the image is {width}x{height} pixels, too small to train on; remove it"
            rotated = image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
            image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, f"{path}: the image cannot be read ({error}); replace or remove it"
    return ((height, width) if rotated else (width, height)), None


def load_image(
    path: Path, bucket: tuple[int, int], resized: tuple[int, int] | None = None,
    augmentation: Augmentation = Augmentation(), interpolation: str | None = None,
) -> torch.Tensor:
    """RGB image as a (3, H, W) tensor in [-1, 1] at the bucket's size (width, height): resized to
    `resized` (default: just covering the bucket) with `interpolation` (library.data.resampling),
    cropped, then flipped and hue-shifted as asked."""
    try:
        with Image.open(path) as image:
            image = fit_to_bucket(_flatten_alpha(ImageOps.exif_transpose(image)), bucket, resized,
                                  augmentation.crop_offset, augmentation.face_crop, interpolation)
            if augmentation.hue_shift:
                image = _shift_hue(image, augmentation.hue_shift)
            array = np.asarray(image, dtype=np.float32) / 255.0
            if augmentation.gamma != 1.0:
                array = array**augmentation.gamma
            array = array * 2.0 - 1.0
    except (OSError, ValueError) as error:
        raise UserInputError(f"Image {path} cannot be read ({error}); replace or remove it.") from None
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels.flip(-1) if augmentation.flip else pixels


def fit_to_bucket(
    image: Image.Image, bucket: tuple[int, int], resized: tuple[int, int] | None = None,
    crop_offset: tuple[float, float] | None = None, face_crop: FaceCrop | None = None,
    interpolation: str | None = None,
) -> Image.Image:
    """`image` resized to `resized` (default: just covering the bucket) and cropped to the bucket, or
    scaled and cut as `face_crop` says: the geometry of a training image, which its loss mask
    (library.data.loss_masks) follows exactly."""
    if face_crop is not None:
        resized, box = face_crop.resized, face_crop.box
    else:
        if resized is None:
            scale = max(bucket[0] / image.width, bucket[1] / image.height)
            resized = (max(bucket[0], round(image.width * scale)), max(bucket[1], round(image.height * scale)))
        box = crop_box(resized, bucket, crop_offset)
    if image.size != resized:
        image = resize_image(image, resized, interpolation)
    return image.crop(box)


def _flatten_alpha(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _shift_hue(image: Image.Image, turns: float) -> Image.Image:
    """The image with its hue rotated by `turns` of the colour wheel (saturation and value kept)."""
    shift = round(turns * 256)
    hue, saturation, value = image.convert("HSV").split()
    hue = hue.point(lambda h: (h + shift) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")
