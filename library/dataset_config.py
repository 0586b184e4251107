"""sd-scripts' `--dataset_config` TOML: `[general]` -> `[[datasets]]` -> `[[datasets.subsets]]`.

The most specific level wins, then the command-line flag of the same name, then the default. The
file is checked strictly and every problem is reported at once: an unknown key (with the nearest
valid key suggested), a value of the wrong type, a missing `image_dir`. Each subset may carry its
own `cat_trigger` and `cat_class_word` (multi-concept CAT: each sample strips its own trigger).

Supported here: one `[[datasets]]` entry with DreamBooth-style subsets (`image_dir`, `num_repeats`,
`class_tokens`, `caption_extension`, `caption_separator`, `is_reg`, `cat_trigger`, `cat_class_word`)
and the dataset's `resolution` and `batch_size`. Keys sd-scripts knows that are not implemented yet
(buckets, augmentations, caption shuffling...) are refused with a sentence when set.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml

from library.errors import UserInputError
from library.folder_dataset import Subset, subset_from_folder

DATASET_KEYS = {"resolution": (int, list, str), "batch_size": (int,)}
SUBSET_KEYS = {
    "image_dir": (str,), "num_repeats": (int,), "class_tokens": (str,), "caption_extension": (str,),
    "caption_separator": (str,), "is_reg": (bool,), "cat_trigger": (str, list), "cat_class_word": (str,),
}
NOT_IMPLEMENTED_KEYS = {
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_prefix", "caption_suffix", "flip_aug",
    "color_aug", "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "custom_attributes", "metadata_file", "alpha_mask", "secondary_separator", "enable_wildcard",
    "token_warmup_min", "token_warmup_step", "face_crop_aug_range", "cache_info", "validation_seed",
    "validation_split", "resize_interpolation",
}
DATASET_ONLY = set(DATASET_KEYS)
SUBSET_ONLY = {"image_dir", "is_reg", "metadata_file", "alpha_mask"}


@dataclass(frozen=True)
class DatasetSettings:
    """What the file decides for the run: resolution, batch size, and the subsets with their images."""

    resolution: tuple[int, int] | None
    batch_size: int | None
    subsets: list[Subset]


def load_dataset_config(path: str | Path, caption_extension: str, caption_separator: str) -> DatasetSettings:
    """Read, check and resolve the file; the two arguments are the command-line defaults."""
    path = Path(path)
    data = _read(path)
    problems: list[str] = []
    general = _table(data, "general", path, problems)
    datasets = data.get("datasets", [])
    _check_keys(data, {"general", "datasets"}, "top level", path, problems)
    _check_keys(general, set(DATASET_KEYS) | (set(SUBSET_KEYS) - SUBSET_ONLY), "[general]", path, problems)
    if not isinstance(datasets, list) or len(datasets) != 1:
        problems.append(f"{path}: exactly one [[datasets]] table is supported here (found "
                        f"{len(datasets) if isinstance(datasets, list) else 'a non-list'}); several datasets are not "
                        "implemented yet")
        _raise(problems)
    dataset = datasets[0]
    _check_keys(dataset, set(DATASET_KEYS) | (set(SUBSET_KEYS) - SUBSET_ONLY) | {"subsets"}, "[[datasets]]", path, problems)
    subsets = dataset.get("subsets", [])
    if not subsets:
        problems.append(f"{path}: [[datasets]] has no [[datasets.subsets]]; add one with image_dir = \"...\"")
    for index, subset in enumerate(subsets):
        _check_keys(subset, set(SUBSET_KEYS), f"[[datasets.subsets]] #{index + 1}", path, problems)
    _raise(problems)

    defaults = {"caption_extension": caption_extension, "caption_separator": caption_separator,
                "num_repeats": 1, "is_reg": False}
    resolved = [{**defaults, **_inherited(general), **_inherited(dataset), **subset} for subset in subsets]
    built = [_subset(values, path, index, problems) for index, values in enumerate(resolved)]
    _raise(problems)
    merged = {**general, **dataset}
    return DatasetSettings(_resolution(merged.get("resolution"), path), merged.get("batch_size"), [s for s in built if s])


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserInputError(f"--dataset_config {path} does not exist; check the path.")
    try:
        return toml.loads(path.read_text(encoding="utf-8"))
    except toml.TomlDecodeError as error:
        raise UserInputError(f"--dataset_config {path} is not valid TOML: {error}") from None


def _table(data: dict, name: str, path: Path, problems: list[str]) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append(f"{path}: [{name}] must be a table")
        return {}
    return value


def _check_keys(table: dict, allowed: set[str], where: str, path: Path, problems: list[str]) -> None:
    for key, value in table.items():
        if key in NOT_IMPLEMENTED_KEYS:
            problems.append(f"{path}: {where} {key} = {value!r} is accepted by sd-scripts but not implemented here yet; "
                            "remove it")
        elif key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed | NOT_IMPLEMENTED_KEYS), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            problems.append(f"{path}: {where} has an unknown key {key!r}{hint}")
        elif key in SUBSET_KEYS and not isinstance(value, SUBSET_KEYS[key]):
            problems.append(f"{path}: {where} {key} = {value!r} should be {_type_names(SUBSET_KEYS[key])}")
        elif key in DATASET_KEYS and not isinstance(value, DATASET_KEYS[key]):
            problems.append(f"{path}: {where} {key} = {value!r} should be {_type_names(DATASET_KEYS[key])}")


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names[t] for t in types)


def _inherited(table: dict) -> dict:
    return {k: v for k, v in table.items() if k in SUBSET_KEYS}


def _subset(values: dict, path: Path, index: int, problems: list[str]) -> Subset | None:
    where = f"{path}: [[datasets.subsets]] #{index + 1}"
    if "image_dir" not in values:
        problems.append(f"{where} has no image_dir; add image_dir = \"/path/to/images\"")
        return None
    folder = Path(values["image_dir"])
    if not folder.is_absolute():
        folder = (path.parent / folder).resolve()
    triggers = values.get("cat_trigger")
    triggers = tuple([triggers] if isinstance(triggers, str) else triggers) if triggers else ()
    try:
        return subset_from_folder(
            folder, values["num_repeats"], values.get("class_tokens", ""), values["is_reg"],
            values["caption_extension"], triggers, values.get("cat_class_word"),
        )
    except UserInputError as error:
        problems.append(f"{where}: {error}")
        return None


def _resolution(value: Any, path: Path) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    try:
        if isinstance(value, str):
            value = [int(v) for v in value.split(",")] if "," in value else [int(value)] * 2
        if len(value) != 2:
            raise ValueError
        return int(value[0]), int(value[1])
    except (TypeError, ValueError):
        raise UserInputError(f"{path}: resolution = {value!r} should be one size (512) or [width, height]") from None


def _raise(problems: list[str]) -> None:
    if problems:
        raise UserInputError("--dataset_config has problems:\n  - " + "\n  - ".join(problems))
