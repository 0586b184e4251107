"""Loss masks (`--masked_loss`, `--alpha_mask`): which pixels of a training image its loss learns from.

Two sources, as in sd-scripts:
- `conditioning_data_dir` (a dataset-config subset's key, read with `--masked_loss`): a folder with one
  mask image per training image, of the same stem (`img/001.png` -> `masks/001.png`, any image suffix);
  its red channel is the mask (white = learn, black = ignore); a greyscale image is its own red channel;
- `alpha_mask` (`--alpha_mask` or the subset key): the image's alpha channel (1 where opaque); an image
  without one weighs every pixel fully.

A mask is a (H, W) tensor in [0, 1] at the bucket's size, and follows the image's geometry exactly:
the same resize and `resize_interpolation` (`image_loading.fit_to_bucket`), crop (face crops too) and flip. A mask of another size than its image
is refused with buckets on (sd-scripts asserts the same); without buckets it is stretched to the
image's size first (sd-scripts stretches it to the training size). The loss applies it with
`library.training.losses.apply_loss_mask`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

from library.data.buckets import Placement
from library.data.folder_dataset import ImageItem, Subset
from library.data.image_loading import IMAGE_SUFFIXES, Augmentation, fit_to_bucket, image_size, inspect_image
from library.data.resampling import resize_image
from library.errors import UserInputError


def with_conditioning_masks(subset: Subset, folder: Path) -> Subset:
    """`subset` with each image's mask from `folder`; a missing folder, an image without a mask or a
    mask without an image is an error (sd-scripts refuses the last two as well)."""
    if not folder.is_dir():
        raise UserInputError(f"conditioning_data_dir {folder} is not a folder; give the folder of masks")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_stem.setdefault(path.stem, []).append(path)
    missing = [item.path.name for item in subset.items if item.path.stem not in by_stem]
    extra = sorted(set(by_stem) - {item.path.stem for item in subset.items})
    problems = []
    if missing:
        problems.append(f"conditioning_data_dir {folder} has no mask for {_some(missing)}; add a mask of the same "
                        "name (e.g. 001.png for 001.jpg) for every image")
    if extra:
        problems.append(f"conditioning_data_dir {folder} has masks for no image of {subset.folder}: "
                        f"{_some([by_stem[s][0].name for s in extra])}; remove them or add their images")
    if problems:
        raise UserInputError("; ".join(problems))
    # Several masks of one stem (a.png, a.webp): the first by name, as sd-scripts' sorted glob picks.
    items = tuple(replace(item, mask_path=by_stem[item.path.stem][0]) for item in subset.items)
    return replace(subset, items=items)


def mask_problems(subset: Subset, buckets: bool) -> list[str]:
    """Masks that cannot be read, and (with buckets) masks whose size differs from their image's."""
    problems = []
    for item in subset.items:
        if item.mask_path is None:
            continue
        size, problem = inspect_image(item.mask_path)
        if problem:
            problems.append(f"mask {problem}")
        elif buckets and size != image_size(item.path):
            width, height = image_size(item.path)
            problems.append(f"mask {item.mask_path} is {size[0]}x{size[1]} pixels but its image {item.path} is "
                            f"{width}x{height}; with enable_bucket a mask must have its image's size (as in "
                            "sd-scripts): resize the mask")
    return problems


def load_loss_mask(item: ImageItem, placement: Placement, augmentation: Augmentation) -> torch.Tensor | None:
    """The loss mask of `item` as trained at `placement` with `augmentation`, or None for an image
    without one."""
    interpolation = item.options.resize_interpolation
    if item.mask_path is not None:
        return conditioning_mask(item.mask_path, placement, augmentation, interpolation)
    if item.options.alpha_mask:
        return alpha_mask(item.path, placement.bucket, placement.resized, augmentation, interpolation)
    return None


def conditioning_mask(path: Path, placement: Placement, augmentation: Augmentation,
                      interpolation: str | None = None) -> torch.Tensor:
    """The red channel of the mask image `path`, stretched to its image's size if it differs, then
    resized (with the image's `interpolation`), cropped and flipped as the image."""
    original = placement.original or placement.resized
    return _fitted(path, "R", placement.bucket, placement.resized, augmentation, interpolation, original)


def alpha_mask(path: Path, bucket: tuple[int, int], resized: tuple[int, int], augmentation: Augmentation,
               interpolation: str | None = None) -> torch.Tensor:
    """The alpha channel of the image `path` (ones where it has none), resized (with the image's
    `interpolation`), cropped and flipped as the image."""
    return _fitted(path, "A", bucket, resized, augmentation, interpolation)


def batch_loss_mask(masks: list[torch.Tensor | None], bucket: tuple[int, int]) -> torch.Tensor | None:
    """(B, H, W) masks of one batch, None when no sample has one; a sample without a mask in a batch
    with some weighs every pixel fully (sd-scripts fills in ones the same way)."""
    if all(mask is None for mask in masks):
        return None
    ones = torch.ones(bucket[1], bucket[0])
    return torch.stack([ones if mask is None else mask for mask in masks])


def _fitted(path: Path, channel: str, bucket: tuple[int, int], resized: tuple[int, int], augmentation: Augmentation,
            interpolation: str | None, original: tuple[int, int] | None = None) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            # As the image is read: EXIF rotation applied. convert() gives opaque alpha to an image without one.
            plane = ImageOps.exif_transpose(image).convert("RGBA" if channel == "A" else "RGB").getchannel(channel)
    except (OSError, ValueError) as error:
        raise UserInputError(f"Mask {path} cannot be read ({error}); replace or remove it.") from None
    if original is not None and plane.size != original:
        plane = resize_image(plane, original, interpolation)
    plane = fit_to_bucket(plane, bucket, resized, augmentation.crop_offset, augmentation.face_crop, interpolation)
    mask = torch.frombuffer(bytearray(plane.tobytes()), dtype=torch.uint8).view(plane.height, plane.width)
    mask = mask.float() / 255.0
    return mask.flip(-1) if augmentation.flip else mask


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
