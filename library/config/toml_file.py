"""Reading a TOML file a user wrote (the `--config_file`, `--dataset_config`, tracker and sample
prompt files), with one kind of message for every way it can fail. Python's own tomllib (TOML 1.0)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from library.errors import UserInputError


def read_toml(path: Path, named: str, example: str, *, path_example: str | None = None,
              missing_hint: str = "check the path") -> dict[str, Any]:
    """The parsed document; a missing, unreadable or malformed file is a `UserInputError` that starts
    with `named` (how the message names the file, e.g. "--dataset_config data.toml"). A syntax error
    shows a quoted string of this kind of file (`example`, e.g. 'class_tokens = "sks dog"'), or, where
    a backslash broke it, a Windows path written as TOML takes it (`path_example`, a key of a path)."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"{named} {what}; {missing_hint}.")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Windows editors may add a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"{named} cannot be read as UTF-8 text ({error}); save it as UTF-8.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        hint = (f"write Windows paths with / or in single quotes, e.g. {path_example} = 'C:\\lora\\img'"
                if path_example and "\\" in str(error) else f"strings need quotes, e.g. {example}")
        raise UserInputError(f"{named} is not valid TOML: {error}; fix that line ({hint}).") from None
