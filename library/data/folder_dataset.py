"""Training images and their captions, as sd-scripts finds them.

- DreamBooth folders (`--train_data_dir` / `--reg_data_dir`, or a dataset-config subset's
  `image_dir`): sub-folders named `<repeats>_<class tokens>` (e.g. `10_sks teapot`); an image's
  caption is the first line of `<stem><caption_extension>` beside it, or the class tokens when there
  is none.
- Fine-tune subsets (`metadata_file`): a JSON `{image: {"caption": ..., "tags": ...}}`; the caption
  is the caption, then ", " and the tags.

Each image carries its subset's options (caption transforms, augmentations) and CAT trigger.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from library.data.caption_transforms import CaptionOptions
from library.errors import UserInputError
from library.data.image_loading import IMAGE_SUFFIXES

FOLDER_NAME = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class SubsetOptions:
    """How a subset's images are captioned and augmented (sd-scripts' subset options)."""

    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False  # the image's alpha channel weights its loss (library.data.loss_masks)
    face_crop_aug_range: tuple[float, float] | None = None  # (low, high); library.data.face_crop
    resize_interpolation: str | None = None  # library.data.resampling's names; None: sd-scripts' default
    cache_info: bool = False  # image sizes kept in the folder's metadata_cache.json (library.data.info_cache)


@dataclass(frozen=True)
class ImageItem:
    """One training image with its caption and where it came from."""

    path: Path
    caption: str
    class_tokens: str
    is_reg: bool
    cat_triggers: tuple[str, ...] = ()  # the subset's own triggers (dataset config); () = --cat_trigger
    cat_class_word: str | None = None
    options: SubsetOptions = field(default_factory=SubsetOptions)
    mask_path: Path | None = None  # its mask in the subset's conditioning_data_dir (--masked_loss)


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
    options: SubsetOptions = field(default_factory=SubsetOptions)
    metadata_file: Path | None = None  # fine-tune subsets: captions come from this JSON

    @property
    def name(self) -> str:
        """The name sd-scripts files its tag frequency and folder counts under."""
        return self.metadata_file.name if self.metadata_file else self.folder.name


def subset_from_folder(
    folder: Path, repeats: int, class_tokens: str, is_reg: bool, caption_extension: str,
    cat_triggers: tuple[str, ...] = (), cat_class_word: str | None = None, options: SubsetOptions = SubsetOptions(),
) -> Subset:
    """A subset of every image in `folder` (dataset-config subsets); an empty or missing folder is an error."""
    if not folder.is_dir():
        raise UserInputError(f"image_dir {folder} is not a folder; check the path")
    items = tuple(_items(folder, class_tokens, caption_extension, is_reg, cat_triggers, cat_class_word, options))
    if not items:
        raise UserInputError(f"image_dir {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    if repeats < 1:
        raise UserInputError(f"num_repeats = {repeats} for {folder} must be at least 1")
    return Subset(folder, repeats, class_tokens, is_reg, items, cat_triggers, cat_class_word, options)


def subset_from_metadata(
    metadata_file: Path, image_dir: Path | None, repeats: int, cat_triggers: tuple[str, ...] = (),
    cat_class_word: str | None = None, options: SubsetOptions = SubsetOptions(),
) -> Subset:
    """A fine-tune subset: the images named in `metadata_file` (absolute paths, or names relative to
    `image_dir` with or without their extension), captioned by their caption and tags."""
    entries = _read_metadata(metadata_file)
    folder = image_dir or metadata_file.parent
    items, missing = [], []
    for key, entry in entries.items():
        path = _find_image(key, folder)
        if path is None:
            missing.append(key)
            continue
        items.append(ImageItem(path, _metadata_caption(entry), "", False, cat_triggers, cat_class_word, options))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserInputError(f"metadata_file {metadata_file}: no image found for {shown} in {folder}; "
                             "fix the keys or set image_dir to the folder that holds them")
    if not items:
        raise UserInputError(f"metadata_file {metadata_file} lists no images")
    if repeats < 1:
        raise UserInputError(f"num_repeats = {repeats} for {metadata_file} must be at least 1")
    return Subset(folder, repeats, "", False, tuple(items), cat_triggers, cat_class_word, options, metadata_file)


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"metadata_file {path} does not exist; check the path")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"metadata_file {path} is not valid JSON ({error})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise UserInputError(f'metadata_file {path} must be a JSON object {{"image": {{"caption": "...", '
                             '"tags": "..."}}}}')
    return entries


def _find_image(key: str, folder: Path) -> Path | None:
    """The image a metadata key names: an existing path, or `folder/key` with or without an image suffix."""
    for candidate in (Path(key), folder / key):
        if candidate.is_file():
            return candidate
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{key}{suffix}", folder / f"{key}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _metadata_caption(entry: dict) -> str:
    """sd-scripts' rule: the caption, then ", " and the tags; the tags alone when there is no caption."""
    caption, tags = entry.get("caption"), entry.get("tags")
    if caption is None:
        return str(tags or "").strip()
    return f"{caption}, {tags}".strip() if tags else str(caption).strip()


def scan_folders(
    root: str | Path, caption_extension: str, is_reg: bool, options: SubsetOptions = SubsetOptions(),
    problems: list[str] | None = None,
) -> list[Subset]:
    """All `<repeats>_<class tokens>` sub-folders of `root`. Every problem is reported in one error,
    or, when a `problems` list is given, added to it (and the good folders returned)."""
    root = Path(root)
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    gathered: list[str] = []
    subsets = _scan(root, flag, caption_extension, is_reg, options, gathered)
    if problems is not None:
        problems += gathered
    elif gathered:
        raise UserInputError("\n  - ".join(gathered))
    return subsets


def _scan(root: Path, flag: str, caption_extension: str, is_reg: bool, options: SubsetOptions,
          gathered: list[str]) -> list[Subset]:
    if not root.is_dir():
        gathered.append(f"{flag} {root} is not a folder; give the folder that holds '<repeats>_<class>' folders")
        return []
    subsets, problems = [], []
    # Hidden entries (.ipynb_checkpoints, macOS ._ files) are not data: sd-scripts' globs skip them too.
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = FOLDER_NAME.match(folder.name)
        if not match:
            problems.append(f"{folder}: the name does not start with '<repeats>_' (e.g. '10_sks teapot'); rename it")
            continue
        items = tuple(_items(folder, match.group(2).strip(), caption_extension, is_reg, options=options))
        if not items:
            problems.append(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
            continue
        subsets.append(Subset(folder, int(match.group(1)), match.group(2).strip(), is_reg, items, options=options))
    if not subsets and not problems:
        problems.append(_no_subfolders(root, is_reg))
    gathered += [f"{flag}: {problem}" for problem in problems]
    return subsets


def _no_subfolders(root: Path, is_reg: bool) -> str:
    """The problem with a folder without `<repeats>_<class tokens>` sub-folders, and how to name one."""
    loose = [path for path in root.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")]
    if not loose:
        return f"{root}: no '<repeats>_<class tokens>' folders inside"
    repeats, class_tokens = ("1", "dog") if is_reg else ("10", "sks dog")
    return (f"{root} holds {len(loose)} image(s) directly, but images are read from its sub-folders named "
            f"'<repeats>_<class tokens>': move the images (and their caption files) into a subfolder named like "
            f"'{root / f'{repeats}_{class_tokens}'}/' ({repeats} repeats, class tokens '{class_tokens}')")


def _items(
    folder: Path, class_tokens: str, caption_extension: str, is_reg: bool, cat_triggers: tuple[str, ...] = (),
    cat_class_word: str | None = None, options: SubsetOptions = SubsetOptions(),
) -> list[ImageItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        # sd-scripts appends the extension to the stem; "txt" (no dot) is read as the ".txt" it means.
        caption_file = path.parent / (path.stem + ("" if caption_extension.startswith(".") else ".") + caption_extension)
        caption = _caption_text(caption_file, options.captions.wildcard) if caption_file.is_file() else ""
        items.append(ImageItem(path, caption or class_tokens, class_tokens, is_reg, cat_triggers, cat_class_word, options))
    return items


def _caption_text(path: Path, every_line: bool) -> str:
    """The caption file's first line; with `enable_wildcard`, every non-empty line (one is drawn per step)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise UserInputError(f"caption file {path} is not UTF-8 text ({error}); save it as UTF-8") from None
    if every_line:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip() if lines else ""
