"""Plain prompt files: one prompt a line, as `evaluate_kps.py --prompt_file` and
`--preservation_prompts` read them.

Blank lines and lines starting with `#` are skipped, and sd-scripts' inline sample options
(" --n ...", " --w ...") are cut off, so a `--sample_prompts` text file works here too.
"""

from __future__ import annotations

import re
from pathlib import Path

from library.errors import UserInputError

SAMPLE_PROMPT_OPTION = re.compile(r"\s--\w")


def read_prompt_lines(path: str | Path, shown: str) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt of `path`; `shown` names the flag in messages. A missing
    file or one without a prompt is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{shown}: the file {path} does not exist; give a text file with one prompt a line.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        prompt = SAMPLE_PROMPT_OPTION.split(line, maxsplit=1)[0].strip()
        if prompt and not prompt.startswith("#"):
            prompts.append((number, prompt))
    if not prompts:
        raise UserInputError(f"{shown}: {path} holds no prompt; write one prompt a line (lines starting with # "
                             "are comments).")
    return prompts


def read_prompts(path: str | Path, shown: str) -> tuple[str, ...]:
    """The prompts of `path` alone (`read_prompt_lines` without the line numbers)."""
    return tuple(prompt for _, prompt in read_prompt_lines(path, shown))
