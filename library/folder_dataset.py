"""Training images from sd-scripts' DreamBooth folders: `--train_data_dir` / `--reg_data_dir`.

Each holds sub-folders named `<repeats>_<class tokens>` (e.g. `10_sks teapot`). An image's caption is
the first line of `<stem><caption_extension>` beside it, or the folder's class tokens when there is
none. Regularisation images are repeated up to the number of training images and weighted by
`--prior_loss_weight`. Images are resized (shorter side) and centre-cropped to the resolution.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageItem:
    """One training image with its caption and where it came from."""

    path: Path
    caption: str
    class_tokens: str
    is_reg: bool
    cat_triggers: tuple[str, ...] = ()  # the subset's own triggers (dataset config); () = --cat_trigger
    cat_class_word: str | None = None


@dataclass(frozen=True)
class Subset:
    """One folder of images: a `<repeats>_<class tokens>` folder, or a dataset-config subset."""

    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    items: tuple[ImageItem, ...]
    cat_triggers: tuple[str, ...] = ()
    cat_class_word: str | None = None


def subset_from_folder(
    folder: Path, repeats: int, class_tokens: str, is_reg: bool, caption_extension: str,
    cat_triggers: tuple[str, ...] = (), cat_class_word: str | None = None,
) -> Subset:
    """A subset of every image in `folder` (dataset-config subsets); an empty or missing folder is an error."""
    if not folder.is_dir():
        raise UserInputError(f"image_dir {folder} is not a folder; check the path")
    items = tuple(
        ImageItem(i.path, i.caption, i.class_tokens, i.is_reg, cat_triggers, cat_class_word)
        for i in _items(folder, class_tokens, caption_extension, is_reg)
    )
    if not items:
        raise UserInputError(f"image_dir {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if repeats < 1:
        raise UserInputError(f"num_repeats = {repeats} for {folder} must be at least 1")
    return Subset(folder, repeats, class_tokens, is_reg, items, cat_triggers, cat_class_word)


def scan_folders(root: str | Path, caption_extension: str, is_reg: bool) -> list[Subset]:
    """All `<repeats>_<class tokens>` sub-folders of `root`, each problem reported in one error."""
    root = Path(root)
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not root.is_dir():
        raise UserInputError(f"{flag} {root} is not a folder; give the folder that holds '<repeats>_<class>' folders.")
    subsets, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = FOLDER_NAME.match(folder.name)
        if not match:
            problems.append(f"{folder}: the name does not start with '<repeats>_' (e.g. '10_sks teapot'); rename it")
            continue
        items = tuple(_items(folder, match.group(2).strip(), caption_extension, is_reg))
        if not items:
            problems.append(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
            continue
        subsets.append(Subset(folder, int(match.group(1)), match.group(2).strip(), is_reg, items))
    if not subsets and not problems:
        problems.append(f"{root}: no '<repeats>_<class tokens>' folders inside")
    if problems:
        raise UserInputError(f"{flag} {root} has problems:\n  - " + "\n  - ".join(problems))
    return subsets


def _items(folder: Path, class_tokens: str, caption_extension: str, is_reg: bool) -> list[ImageItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(caption_extension)
        caption = _first_line(caption_file) if caption_file.is_file() else ""
        items.append(ImageItem(path, caption or class_tokens, class_tokens, is_reg))
    return items


def _first_line(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def epoch_order(subsets: list[Subset], epoch: int, seed: int) -> list[ImageItem]:
    """The images of one epoch: each repeated by its folder's repeats, regularisation images up to
    the training-image count, shuffled by (seed, epoch) so a resumed run sees the same order."""
    train = [item for s in subsets if not s.is_reg for item in s.items for _ in range(s.repeats)]
    reg_pool = [item for s in subsets if s.is_reg for item in s.items for _ in range(s.repeats)]
    reg = []
    if reg_pool:
        reg = (reg_pool * math.ceil(len(train) / len(reg_pool)))[: len(train)]
    order = train + reg
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def load_image(path: Path, resolution: tuple[int, int]) -> torch.Tensor:
    """RGB image as a (3, H, W) tensor in [-1, 1]: EXIF-rotated, alpha flattened on white,
    shorter side resized to cover the resolution, centre-cropped."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image = _flatten_alpha(image)
            width, height = resolution
            scale = max(width / image.width, height / image.height)
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    except (OSError, ValueError) as error:
        raise UserInputError(f"Image {path} cannot be read ({error}); replace or remove it.") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _flatten_alpha(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
