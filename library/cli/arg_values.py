"""The flag values after merging the command line with `--config_file`, and where each came from.

Precedence is sd-scripts': an explicit flag beats the file, even when it repeats the default; the
file beats the defaults. `ArgValues.show` writes a value back as the user gave it, with its place,
for the sentences of checks.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from library.cli.config_file import load_config_file, toml_text
from library.cli.flags import build_parser

_UNSET = object()


@dataclass(frozen=True)
class ArgValues:
    """The merged flag values (defaults < config file < command line) and where each came from."""

    values: Mapping[str, Any]
    defaults: Mapping[str, Any]
    from_command_line: frozenset[str]
    from_file: frozenset[str]
    config_file: Path | None

    def __getitem__(self, dest: str) -> Any:
        return self.values[dest]

    def is_set(self, dest: str) -> bool:
        """Whether the value differs from the default (however it was given)."""
        return self.values[dest] != self.defaults[dest]

    def show(self, dest: str) -> str:
        """The value as the user wrote it, with its place: "--cat_weight -1" or "cat_weight = -1 in x.toml"."""
        value = self.values[dest]
        if dest in self.from_file and dest not in self.from_command_line:
            return f"{dest} = {_toml_text(value)} in {self.config_file}"
        return f"--{dest}" + ("" if value is True else f" {_cli_text(value)}")


def _cli_text(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(_cli_text(item) for item in value)
    text = _number_text(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if " " in text or not text else text


def _toml_text(value: Any) -> str:
    """A value as it would be written in TOML, whole floats without ".0"."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_text(item) for item in value) + "]"
    return _number_text(value) if isinstance(value, float) else toml_text(value)


def _number_text(value: float) -> str:
    """-1.0 as "-1", as the user most likely typed it; other floats exactly (repr)."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def read_arg_values(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> ArgValues:
    """Parse the command line, read --config_file, and merge: command line > file > defaults.

    An explicit flag wins even when it repeats the default: the command line is parsed into a
    namespace of placeholders, so a flag counts as given exactly when argparse set it.
    """
    parser = parser or build_parser()
    defaults = vars(parser.parse_args([]))
    placeholders = argparse.Namespace(**{dest: _UNSET for dest in defaults})
    parsed = vars(parser.parse_args(list(argv) if argv is not None else None, namespace=placeholders))
    explicit = {dest: value for dest, value in parsed.items() if value is not _UNSET}
    file_values: Mapping[str, Any] = {}
    read_from = None
    if explicit.get("config_file") and not explicit.get("output_config"):
        loaded = load_config_file(explicit["config_file"], parser)
        file_values, read_from = loaded.values, loaded.path
    return ArgValues(
        values={**defaults, **file_values, **explicit},
        defaults=defaults,
        from_command_line=frozenset(explicit),
        from_file=frozenset(file_values),
        config_file=read_from,
    )
