"""sd-scripts' `--config_file x.toml`: the command line written as a TOML file, read once, checked.

What sd-scripts does, and we keep: `.toml` is appended to the path when missing; the tables are
flattened one level into one namespace (table names do not matter); explicit command-line flags
override the file and the file overrides the defaults.

What sd-scripts does not do, and we add: every value is checked against the flag's definition and
converted (sd-scripts copies TOML values as they are, so `learning_rate = "1e-4"` reaches the
optimizer as a string and `network_args = "conv_dim=4"` is iterated character by character);
a key that is in two tables is an error; an unknown key is a warning that names it, except the
keys GUIs write for themselves (`GUI_KEYS`).

The rules for a value, per kind of flag:
- on/off flags (`action="store_true"`): `true`/`false`, or 1/0 (kohya_ss GUI writes
  `persistent_data_loader_workers = 1`); a string is refused, since "false" would read as on;
- list flags (`nargs="*"`/`"+"`): a TOML list, each element read as below; a single number is taken
  as a one-element list (sd-scripts' own "toml backward compatibility" for `text_encoder_lr`); a
  single string is refused, because "a b" could be one item or two;
- numbers: an integer flag takes an integer (or a whole float, 8.0); a float flag takes any number;
- text flags take strings, and numbers as their text (GUIs write `resolution = 512`);
- a string for a number flag is read exactly as the same text on the command line would be.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from library.config.toml_file import read_toml as read_toml_file
from library.errors import UserInputError

logger = logging.getLogger(__name__)

# Keys that GUIs write for their own use; sd-scripts ignores them, and so do we, without a warning.
# kohya_ss GUI (bmaltais) writes these into every LoRA config it launches.
GUI_KEYS: dict[str, str] = {
    "epoch": "kohya_ss GUI's epoch field; the run length comes from max_train_epochs/max_train_steps",
    "noise_offset_type": "kohya_ss GUI's Original/Multires switch; the noise flags themselves are read",
    "stop_text_encoder_training": "kohya_ss GUI's DreamBooth setting; LoRA training ignores it, as sd-scripts does",
    "lowvram": "kohya_ss GUI's own setting, not an sd-scripts flag",
    "dynamo_backend": "accelerate's torch.compile backend, copied by kohya_ss GUI; torch.compile is not used here",
}

# Keys that GUIs write at the top level although sd-scripts only reads them from `network_args`:
# sd-scripts ignores them silently, so a GUI user's LoRA+ setting is lost. We ignore them too (a
# drop-in trains the same thing), but say so and how to get what was meant.
NETWORK_ARG_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")

# Keys that only make sense on the command line.
COMMAND_LINE_ONLY_KEYS = ("config_file", "output_config")

_TYPE_NAMES: dict[Any, str] = {int: "a whole number", float: "a number", str: "a string"}
_PLURAL_NAMES: dict[Any, str] = {int: "whole numbers", float: "numbers", str: "strings"}
_TYPE_EXAMPLES: dict[Any, str] = {int: "10", float: "0.5", str: '"text"'}


@dataclass(frozen=True)
class ConfigFile:
    """A config file read and checked: `values` maps flag destinations to converted values."""

    path: Path
    values: Mapping[str, Any] = field(default_factory=dict)


def config_path(value: str) -> Path:
    """sd-scripts' rule: `.toml` is appended when the path does not end with it."""
    return Path(value if value.endswith(".toml") else value + ".toml")


def load_config_file(value: str, parser: argparse.ArgumentParser) -> ConfigFile:
    """Read `--config_file value`, flatten its tables and convert every known key for `parser`."""
    path = config_path(value)
    flat = _flatten(read_toml(path), path)
    actions = option_actions(parser)
    values: dict[str, Any] = {}
    for key, item in flat.items():
        if key in actions and key not in COMMAND_LINE_ONLY_KEYS:
            values[key] = convert_value(actions[key], key, item, path)
        else:
            _report_ignored_key(key, item, path)
    return ConfigFile(path=path, values=values)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML document; a missing, unreadable or malformed file is a `UserInputError`."""
    return read_toml_file(path, f"The config file {path} (from --config_file)", 'output_name = "my_lora"',
                          path_example="train_data_dir", missing_hint="give the path of a .toml file")


def _flatten(document: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Top-level keys and the keys of each top-level table in one namespace; a key twice is an error."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, item in document.items():
        entries = item.items() if isinstance(item, dict) else [(name, item)]
        place = f"table [{name}]" if isinstance(item, dict) else "the top level"
        for key, value in entries:
            if key in flat:
                raise UserInputError(
                    f"The config file {path} sets '{key}' twice, in {origin[key]} and in {place}; "
                    f"table names do not matter (sd-scripts flattens them), so keep one of the two."
                )
            flat[key] = value
            origin[key] = place
    return flat


def _report_ignored_key(key: str, value: Any, path: Path) -> None:
    """Log why a key of the file is not used: GUI bookkeeping quietly, anything else as a warning."""
    if key in GUI_KEYS:
        logger.debug("Config file %s: '%s' ignored (%s).", path, key, GUI_KEYS[key])
    elif key in NETWORK_ARG_KEYS:
        logger.warning(
            "Config file %s: '%s' is ignored, as sd-scripts ignores it: LoRA+ ratios are network arguments; "
            'to use it, write network_args = ["%s=%s"] instead.',
            path, key, key, value,
        )
    elif key in COMMAND_LINE_ONLY_KEYS:
        logger.warning("Config file %s: '%s' is ignored; it only works on the command line.", path, key)
    else:
        logger.warning(
            "Config file %s: unknown key '%s' is ignored; it is not a train_network_cat.py option "
            "(check its spelling against --help).",
            path, key,
        )


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's optional arguments by destination, --help excluded (argparse has no public list
    of its actions)."""
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.default is not argparse.SUPPRESS}


def convert_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """One file value checked and converted as the command line would convert it for `action`."""
    if action.nargs == 0:
        return _flag_value(key, value, path)
    if action.nargs in ("*", "+"):
        return _list_value(action, key, value, path)
    converted = _scalar_value(action, key, value, path)
    _check_choice(action, key, converted, path)
    return converted


def _flag_value(key: str, value: Any, path: Path) -> bool:
    """An on/off flag: a TOML boolean, or 0/1 as kohya_ss GUI writes some of them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _type_error(path, key, value, "true or false (an on/off flag)", "true")


def _list_value(action: argparse.Action, key: str, value: Any, path: Path) -> list[Any]:
    """A list flag: a TOML list of items, or one number or string as a one-element list (`cat_trigger =
    "sks dog"` is one trigger phrase, as the dataset config's key reads it)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        elements = _PLURAL_NAMES.get(action.type, "values")
        example = toml_text(value) if isinstance(value, str) else _TYPE_EXAMPLES.get(action.type, '"text"')
        raise _type_error(path, key, value, f"a list of {elements}", f"[{example}]")
    if action.nargs == "+" and not value:
        raise _type_error(path, key, value, "a list with at least one item", f"[{_TYPE_EXAMPLES[str]}]")
    items = [_scalar_value(action, f"{key}[{index}]", item, path) for index, item in enumerate(value)]
    for index, item in enumerate(items):
        _check_choice(action, f"{key}[{index}]", item, path)
    return items


def _scalar_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """One value for a flag with `type=int|float|str` or a custom type that reads command-line text."""
    kind = action.type or str
    if isinstance(value, str):
        return _from_text(kind, key, value, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(path, key, value, _TYPE_NAMES.get(kind, "a number or a string"), _example(kind))
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _type_error(path, key, value, "a whole number", _example(int))
        return int(value)
    if kind is float:
        return float(value)
    if kind is str:
        return str(value)
    return _from_text(kind, key, repr(value), path)


def _from_text(kind: Callable[[str], Any], key: str, text: str, path: Path) -> Any:
    """Read `text` with the flag's own type, as argparse would read it from the command line."""
    try:
        return kind(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        if kind in _TYPE_NAMES:
            raise _type_error(path, key, text, _TYPE_NAMES[kind], _example(kind)) from err
        # A type of our own: its message already says what it expects.
        raise UserInputError(f"Config file {path}: {key} = {toml_text(text)} is not valid: {err}.") from err


def _check_choice(action: argparse.Action, key: str, value: Any, path: Path) -> None:
    """Refuse a value outside the flag's `choices`, listing them."""
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(toml_text(choice) for choice in action.choices)
        raise _type_error(path, key, value, f"one of {allowed}", toml_text(next(iter(action.choices))))


def _example(kind: Any) -> str:
    """An example value to put in an error message."""
    return _TYPE_EXAMPLES.get(kind, "10")


def _type_error(path: Path, key: str, value: Any, expected: str, example: str) -> UserInputError:
    """The error for a value of the wrong kind: file, key, value, what was expected, an example."""
    name = key.split("[")[0]
    return UserInputError(
        f"Config file {path}: {key} = {toml_text(value)} is not {expected}; write it as e.g. {name} = {example}."
    )


def toml_text(value: Any) -> str:
    """A value as it is written in TOML (strings quoted and escaped, floats exact)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "a table {" + ", ".join(f"{k} = {toml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config_file(path: Path, values: Mapping[str, Any]) -> None:
    """`--output_config`: write `values` (flag destinations) as a flat TOML file; never overwrite."""
    if path.exists():
        raise UserInputError(
            f"--output_config would overwrite {path}; choose another --config_file path or delete that file."
        )
    # Written by hand: the `toml` package leaves a backslash before "x" unescaped (D:\\x1 -> "D:\\x1"), which
    # no TOML reader accepts, and Windows paths are full of backslashes.
    lines = [f"{key} = {toml_text(value)}\n" for key, value in values.items() if value is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
