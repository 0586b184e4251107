"""sd-scripts' `--dataset_config` TOML: `[general]` -> `[[datasets]]` -> `[[datasets.subsets]]`.

The most specific level wins, then the command-line flag of the same name, then the default. The
file is checked strictly and every problem is reported at once: an unknown key (with the nearest
valid key suggested), a value of the wrong type or out of range, a missing `image_dir`. Each
subset may carry its own `cat_trigger` and `cat_class_word` (multi-concept CAT: each sample strips
its own trigger).

Every `[[datasets]]` entry becomes one dataset with its own resolution, batch size and buckets;
its subsets are DreamBooth folders (`image_dir`) or fine-tune subsets (`metadata_file`), not both
in one dataset (as in sd-scripts). With `--masked_loss`, a subset's `conditioning_data_dir` holds its
images' loss masks (library.data.loss_masks), in every subset of its dataset. Keys sd-scripts knows
that are not implemented here are refused with a sentence when set.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.config.toml_file import read_toml
from library.data.buckets import BucketSettings, check_bucket_settings
from library.data.caption_transforms import CaptionOptions
from library.errors import UserInputError
from library.data.folder_dataset import Subset, SubsetOptions, subset_from_folder, subset_from_metadata
from library.data.loss_masks import with_conditioning_masks
from library.data.resampling import RESIZE_INTERPOLATIONS
from library.config.train_config import DataArgs
from library.data.training_data import DatasetSpec

INT, FLOAT, STR, BOOL, LIST, TABLE = (int,), (float, int), (str,), (bool,), (list,), (dict,)
DATASET_KEYS = {
    "resolution": (int, list), "batch_size": INT, "enable_bucket": BOOL, "min_bucket_reso": INT,
    "max_bucket_reso": INT, "bucket_reso_steps": INT, "bucket_no_upscale": BOOL,
    "validation_split": FLOAT, "validation_seed": INT,
}
SUBSET_KEYS = {
    "image_dir": STR, "metadata_file": STR, "num_repeats": INT, "class_tokens": STR, "caption_extension": STR,
    "caption_separator": STR, "is_reg": BOOL, "cat_trigger": (str, list), "cat_class_word": STR,
    "shuffle_caption": BOOL, "keep_tokens": INT, "keep_tokens_separator": STR, "caption_prefix": STR,
    "caption_suffix": STR, "flip_aug": BOOL, "color_aug": BOOL, "random_crop": BOOL, "caption_dropout_rate": FLOAT,
    "caption_dropout_every_n_epochs": INT, "caption_tag_dropout_rate": FLOAT, "custom_attributes": TABLE,
    "enable_wildcard": BOOL, "secondary_separator": STR, "alpha_mask": BOOL, "conditioning_data_dir": STR,
    "token_warmup_min": INT, "token_warmup_step": FLOAT, "face_crop_aug_range": LIST, "resize_interpolation": STR,
    "cache_info": BOOL,
}
# Keys sd-scripts has that are not implemented here: the reason, and the one value that changes nothing
# (accepted, since GUIs write defaults out).
NOT_IMPLEMENTED_KEYS: dict[str, tuple[str, Any]] = {
    "network_multiplier": ("a dataset's own network multiplier (sd-scripts' difference training) is not "
                           "implemented; every sample trains at the network's multiplier", 1.0),
}
SUBSET_ONLY = {"image_dir", "is_reg", "metadata_file", "alpha_mask", "conditioning_data_dir"}
# Keys sd-scripts' subsets with a conditioning_data_dir (its ControlNet subsets) do not have.
NOT_IN_MASK_SUBSETS = ("is_reg", "alpha_mask", "metadata_file", "class_tokens")
RANGES = {  # key: (smallest, largest) allowed
    "num_repeats": (1, None), "batch_size": (1, None), "keep_tokens": (0, None), "caption_dropout_rate": (0, 1),
    "caption_tag_dropout_rate": (0, 1), "caption_dropout_every_n_epochs": (0, None), "min_bucket_reso": (8, None),
    "max_bucket_reso": (8, None), "bucket_reso_steps": (8, None), "token_warmup_min": (0, None),
    "token_warmup_step": (0, None),
}


@dataclass(frozen=True)
class _Where:
    """Where a table sits, for messages: the file and the table's name."""

    path: Path
    table: str

    def __str__(self) -> str:
        return f"{self.path}: {self.table}"


def load_dataset_config(path: str | Path, data: DataArgs, found: list[str] | None = None) -> list[DatasetSpec]:
    """Read, check and resolve the file; `data` (the command line) gives the values no level sets.

    Mistakes in the file itself are raised at once, all together. Problems with what it points to
    (a missing folder, an empty one) are added to `found` when given, so that the caller can report
    them with its own, else raised."""
    path = Path(path)
    config = _read(path)
    problems: list[str] = []
    general = _table(config, "general", path, problems)
    datasets = config.get("datasets", [])
    _check_keys(config, {"general": TABLE, "datasets": LIST}, _Where(path, "the top level"), problems)
    _check_keys(general, {**DATASET_KEYS, **_without(SUBSET_KEYS, SUBSET_ONLY)}, _Where(path, "[general]"), problems)
    if not isinstance(datasets, list) or not datasets:
        problems.append(f"{path}: there is no [[datasets]] table; add one with a [[datasets.subsets]] inside")
        _raise(problems)
    wheres = [_Where(path, f"[[datasets]] #{i + 1}") for i in range(len(datasets))]
    for dataset, where in zip(datasets, wheres):
        _check_dataset_keys(dataset, where, problems)
    _raise(problems)  # values of the wrong type would make the rest fail in confusing ways
    specs = [_dataset(dataset, general, data, where, problems) for dataset, where in zip(datasets, wheres)]
    if found is None:
        _raise(problems)
    else:
        found += problems
    return [spec for spec in specs if spec is not None]


def _check_dataset_keys(dataset: Any, where: _Where, problems: list[str]) -> None:
    """The keys of one [[datasets]] table and of its subsets."""
    if not isinstance(dataset, dict):
        problems.append(f"{where} must be a table")
        return
    _check_keys(dataset, {**DATASET_KEYS, **_without(SUBSET_KEYS, SUBSET_ONLY), "subsets": LIST}, where, problems)
    subsets = dataset.get("subsets") or []
    if not subsets:
        problems.append(f"{where} has no [[datasets.subsets]]; add one with image_dir = \"...\"")
    for index, subset in enumerate(subsets if isinstance(subsets, list) else []):
        sub_where = _subset_where(where, index)
        if isinstance(subset, dict):
            _check_keys(subset, SUBSET_KEYS, sub_where, problems)
        else:
            problems.append(f"{sub_where} must be a table")


def _subset_where(where: _Where, index: int) -> _Where:
    return _Where(where.path, f"{where.table}, [[datasets.subsets]] #{index + 1}")


def _dataset(dataset: dict, general: dict, data: DataArgs, where: _Where, problems: list[str]) -> DatasetSpec | None:
    merged = {**general, **dataset}
    resolution = _resolution(merged.get("resolution")) or data.resolution
    if resolution is None:
        problems.append(f"{where}: no resolution; set resolution = 512 there (or in [general]), or pass --resolution")
        return None
    buckets = BucketSettings(
        resolution, merged.get("enable_bucket", data.enable_bucket), merged.get("min_bucket_reso", data.min_bucket_reso),
        merged.get("max_bucket_reso", data.max_bucket_reso), merged.get("bucket_reso_steps", data.bucket_reso_steps),
        merged.get("bucket_no_upscale", data.bucket_no_upscale),
    )
    problems += check_bucket_settings(buckets, str(where), data.bucket_reso_multiple)
    problems += _mask_subset_problems(dataset["subsets"], data.masked_loss, where)
    built = []
    for index, subset in enumerate(dataset["subsets"]):
        values = {**cli_subset_values(data), **_inherited(general), **_inherited(dataset), **subset}
        built.append(_subset(values, _subset_where(where, index), problems))
    kinds = {s.metadata_file is None for s in built if s is not None}
    if len(kinds) > 1:
        problems.append(f"{where} mixes image_dir subsets with metadata_file subsets; put them in separate "
                        "[[datasets]] (as sd-scripts requires)")
    return DatasetSpec(tuple(s for s in built if s), merged.get("batch_size", data.train_batch_size), buckets,
                       merged.get("validation_split", data.validation_split),
                       merged.get("validation_seed", data.validation_seed))


def cli_subset_values(data: DataArgs) -> dict[str, Any]:
    """The subset values the command line gives when no level of the file sets them."""
    return {
        "caption_extension": data.caption_extension, "caption_separator": data.caption_separator, "num_repeats": 1,
        "is_reg": False, "shuffle_caption": data.shuffle_caption, "keep_tokens": data.keep_tokens,
        "keep_tokens_separator": data.keep_tokens_separator, "caption_prefix": data.caption_prefix or "",
        "caption_suffix": data.caption_suffix or "", "flip_aug": data.flip_aug, "color_aug": data.color_aug,
        "random_crop": data.random_crop, "caption_dropout_rate": data.caption_dropout_rate,
        "caption_dropout_every_n_epochs": data.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": data.caption_tag_dropout_rate,
        "enable_wildcard": data.enable_wildcard, "secondary_separator": data.secondary_separator or "",
        "alpha_mask": data.alpha_mask, "token_warmup_min": data.token_warmup_min,
        "token_warmup_step": data.token_warmup_step, "face_crop_aug_range": data.face_crop_aug_range,
        "resize_interpolation": data.resize_interpolation, "cache_info": data.cache_info,
    }


def subset_options(values: dict[str, Any]) -> SubsetOptions:
    """A subset's caption and augmentation options from its resolved values."""
    captions = CaptionOptions(
        shuffle=values["shuffle_caption"], separator=values["caption_separator"], keep_tokens=values["keep_tokens"],
        keep_tokens_separator=values["keep_tokens_separator"], prefix=values["caption_prefix"],
        suffix=values["caption_suffix"], dropout_rate=float(values["caption_dropout_rate"]),
        dropout_every_n_epochs=values["caption_dropout_every_n_epochs"],
        tag_dropout_rate=float(values["caption_tag_dropout_rate"]),
        wildcard=values["enable_wildcard"], secondary_separator=values["secondary_separator"],
        token_warmup_min=values["token_warmup_min"], token_warmup_step=float(values["token_warmup_step"]),
    )
    face_range = values["face_crop_aug_range"]
    return SubsetOptions(captions, values["flip_aug"], values["color_aug"], values["random_crop"],
                         alpha_mask=values["alpha_mask"], face_crop_aug_range=tuple(float(v) for v in face_range) if face_range else None,
                         resize_interpolation=values["resize_interpolation"], cache_info=values["cache_info"])


def _has_masks(subset: dict) -> bool:
    """Whether a subset table names a conditioning_data_dir (GUIs write "" for a field left empty)."""
    return bool(str(subset.get("conditioning_data_dir", "")).strip())


def _mask_subset_problems(subsets: list[dict], masked_loss: bool, where: _Where) -> list[str]:
    """sd-scripts' rules for conditioning_data_dir: read only with --masked_loss; every subset of the
    dataset has one or none does; such a subset has no is_reg, alpha_mask, metadata_file or class_tokens."""
    with_masks = [index for index, subset in enumerate(subsets) if _has_masks(subset)]
    if not with_masks:
        return []
    if not masked_loss:
        return [f"{where}: conditioning_data_dir is read only with --masked_loss (as in sd-scripts); add "
                "--masked_loss, or remove conditioning_data_dir"]
    if len(with_masks) < len(subsets):
        return [f"{where}: subsets #{', #'.join(str(i + 1) for i in with_masks)} have a conditioning_data_dir and "
                "the others do not; in sd-scripts every subset of a dataset has one or none does: put them in "
                "separate [[datasets]]"]
    return [f"{_subset_where(where, index)}: {key} is not a key of a subset with conditioning_data_dir "
            "(sd-scripts' masked subsets have none); remove it"
            for index, subset in enumerate(subsets) for key in NOT_IN_MASK_SUBSETS if key in subset]


def _subset(values: dict, where: _Where, problems: list[str]) -> Subset | None:
    if (values.get("custom_attributes") or {}).get("diff_output_preservation"):
        problems.append(f"{where}: custom_attributes.diff_output_preservation is sd-scripts' own preservation; CAT "
                        "does this (and more) for every sample: remove it, and keep is_reg = true for pure "
                        "preservation images")
    for key in ("image_dir", "metadata_file"):  # GUIs write "" for a field left empty
        if isinstance(values.get(key), str) and not values[key].strip():
            values.pop(key)
    if "image_dir" not in values and "metadata_file" not in values:
        problems.append(f"{where} has no image_dir; add image_dir = \"/path/to/images\"")
        return None
    if values.get("metadata_file") and values["is_reg"]:
        problems.append(f"{where}: a metadata_file subset cannot be is_reg (sd-scripts' rule); use an image_dir "
                        "subset for regularisation images")
        return None
    triggers = values.get("cat_trigger")
    triggers = tuple([triggers] if isinstance(triggers, str) else triggers) if triggers else ()
    folder = _relative(values["image_dir"], where.path) if values.get("image_dir") else None
    masks = _relative(values["conditioning_data_dir"], where.path) if _has_masks(values) else None
    if masks is not None:  # sd-scripts' masked subsets: no alpha mask, no class tokens
        values = {**values, "alpha_mask": False, "class_tokens": ""}
    options = subset_options(values)
    try:
        if values.get("metadata_file"):
            return subset_from_metadata(_relative(values["metadata_file"], where.path), folder,
                                        values["num_repeats"], triggers, values.get("cat_class_word"), options)
        subset = subset_from_folder(folder, values["num_repeats"], values.get("class_tokens", ""), values["is_reg"],
                                    values["caption_extension"], triggers, values.get("cat_class_word"), options)
        return subset if masks is None else with_conditioning_masks(subset, masks)
    except UserInputError as error:
        problems.append(f"{where}: {error}")
        return None


def _relative(value: str, config_path: Path) -> Path:
    """A path from the file: absolute as is, relative to the file's folder otherwise."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def _read(path: Path) -> dict:
    """The parsed file (TOML 1.0, stdlib tomllib as for --config_file); problems name the file and line."""
    return read_toml(path, f"--dataset_config {path}", 'class_tokens = "sks dog"', path_example="image_dir")


def _table(data: dict, name: str, path: Path, problems: list[str]) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append(f"{path}: [{name}] must be a table")
        return {}
    return value


def _check_keys(table: dict, allowed: dict[str, tuple[type, ...]], where: _Where, problems: list[str]) -> None:
    for key, value in table.items():
        if key in NOT_IMPLEMENTED_KEYS:
            reason, harmless = NOT_IMPLEMENTED_KEYS[key]
            if value != harmless:
                problems.append(f"{where} {key} = {value!r}: {reason}; remove it")
        elif key not in allowed and key in DATASET_KEYS:
            problems.append(f"{where}: {key} is a dataset's setting; put it in its [[datasets]] table or in "
                            "[general] (as in sd-scripts)")
        elif key not in allowed:
            near = difflib.get_close_matches(key, sorted(set(allowed) | set(NOT_IMPLEMENTED_KEYS)), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            problems.append(f"{where} has an unknown key {key!r}{hint}")
        elif key == "resolution":
            if _resolution_sides(value) is None:
                problems.append(f"{where} resolution = {value!r} {_resolution_fix(value)}")
        elif not _fits(value, allowed[key]):
            problems.append(f"{where} {key} = {value!r} should be {_type_names(allowed[key])}")
        elif key == "cat_trigger" and isinstance(value, list) and not all(isinstance(t, str) and t.strip() for t in value):
            problems.append(f"{where} cat_trigger = {value!r} should be a string or a list of non-empty strings")
        elif key == "validation_split" and not 0 <= value < 1:
            problems.append(f"{where} validation_split = {value!r} should be at least 0 and below 1 (the share of "
                            "each subset's images held out for validation, e.g. 0.1)")
        elif key == "face_crop_aug_range" and not _is_face_range(value):
            problems.append(f"{where} face_crop_aug_range = {value!r} should be [low, high]: two numbers above 0, "
                            "low <= high, e.g. face_crop_aug_range = [2.0, 4.0]")
        elif key == "resize_interpolation" and value not in RESIZE_INTERPOLATIONS:
            problems.append(f"{where} resize_interpolation = {value!r} should be one of "
                            f"{', '.join(RESIZE_INTERPOLATIONS)} (sd-scripts' names)")
        elif key in RANGES and not _in_range(value, *RANGES[key]):
            low, high = RANGES[key]
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            problems.append(f"{where} {key} = {value!r} should be {bound}")


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except that true/false are not numbers."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _is_face_range(value: list) -> bool:
    """sd-scripts' face_crop_aug_range: [low, high], two numbers (here above 0, low <= high)."""
    numbers = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return numbers and 0 < value[0] <= value[1]


def _in_range(value: float, low: float, high: float | None) -> bool:
    return value >= low and (high is None or value <= high)


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "a table"}
    return " or ".join(dict.fromkeys(names[t] for t in types if not (t is int and float in types)))


def _without(keys: dict, removed: set[str]) -> dict:
    return {k: v for k, v in keys.items() if k not in removed}


def _inherited(table: dict) -> dict:
    return {k: v for k, v in table.items() if k in SUBSET_KEYS and k not in SUBSET_ONLY}


def _resolution(value: Any) -> tuple[int, int] | None:
    """(width, height) of a resolution that `_check_keys` accepted; None when no level sets one."""
    return None if value is None else _resolution_sides(value)


def _resolution_sides(value: Any) -> tuple[int, int] | None:
    """sd-scripts' schema for a dataset resolution: one integer (square) or [width, height] of integers."""
    sides = [value, value] if not isinstance(value, list) else value
    if len(sides) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        return sides[0], sides[1]
    return None


def _resolution_fix(value: Any) -> str:
    """What is wrong with a refused resolution, and the line to write instead."""
    parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else []
    if len(parts) in (1, 2) and all(part.isdigit() and int(part) > 0 for part in parts):
        fixed = parts[0] if len(parts) == 1 else f"[{parts[0]}, {parts[1]}]"
        return (f"is a string, and sd-scripts reads an integer or [width, height] here: write resolution = {fixed} "
                f"(the quoted \"512,768\" form belongs to --resolution and --config_file)")
    return "should be one size (resolution = 512) or [width, height] (resolution = [512, 768]), in pixels"


def _raise(problems: list[str]) -> None:
    if problems:
        raise UserInputError("--dataset_config has problems:\n  - " + "\n  - ".join(problems))
