"""The `--sample_prompts` file, read into typed prompts: sd-scripts' three formats, checked.

- `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped. Options follow the
  prompt inline, each introduced by " --": `a photo of sks dog --n lowres --w 512 --h 512 --d 42 --s 30
  --l 7.5 --ss euler_a --g 3.5` (negative prompt, width, height, seed, steps, guidance scale, sampler,
  FLUX.1-dev's guidance input).
- `.toml`: a `[prompt]` table of defaults and `[[prompt.subset]]` tables, one per prompt, with the keys
  `prompt negative_prompt width height seed sample_steps scale sample_sampler guidance_scale`.
- `.json`: a list whose items are prompt lines (as in `.txt`) or objects with those keys.

Defaults are sd-scripts' (`SampleDefaults`, the script's): 512 x 512, 30 steps, scale 7.5 (FLUX.1: 20
steps, scale 1.0, guidance 3.5), no seed (ours: a seed derived from the run's), the `--sample_sampler`.
Sizes are rounded down to a multiple of 8 (FLUX.1: 16), at least 64, as sd-scripts does. Prompts are
read with AUTOMATIC1111's `(word:1.2)` weights on SD 1.x/2.x and SDXL (`SampleDefaults.weights`), as
sd-scripts' samples read them; FLUX.1's read them as text.
Unlike sd-scripts, which skips what it cannot read, every problem is a `UserInputError` naming the
file, the line (or item) and the fix, raised before training starts.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.cat.caption_weights import weight_syntax_problem
from library.config.train_config import SampleDefaults
from library.sampling import samplers as sampler_table
from library.errors import UserInputError

# sd-scripts' names for --sample_sampler and --ss: those library.sampling.samplers maps to diffusers.
SAMPLERS = tuple(sampler_table.SAMPLERS)
# The names the WebUIs show for the same samplers, read as sd-scripts' names.
SAMPLER_ALIASES = {"euler a": "euler_a", "dpm2": "dpm_2", "dpm2 a": "dpm_2_a", "dpm++ 2m": "dpmsolver++",
                   "dpmpp_2m": "dpmsolver++", "k_dpmpp_2m": "dpmsolver++"}

DEFAULT_SIZE = 512
DEFAULT_STEPS = SampleDefaults.steps
DEFAULT_SCALE = SampleDefaults.scale
MAX_STEPS = 1000

# Inline option -> key of the .toml/.json formats.
INLINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "sample_steps",
                  "l": "scale", "ss": "sample_sampler", "g": "guidance_scale"}
KEYS = ("prompt",) + tuple(INLINE_OPTIONS.values())


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to make: the prompt and how to sample it."""

    index: int  # position in the file, counted from 0: the `_{index:02d}` of the file name
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None  # None: derived from the run's seed and `index`; not in the file name
    sampler: str | None = None  # an sd-scripts name (aliases resolved); None: --sample_sampler
    source: str = ""  # "prompts.txt line 3", for messages
    guidance: float | None = None  # FLUX.1-dev's guidance input (`--g`); models without one ignore it


def load_sample_prompts(path: str | Path, defaults: SampleDefaults = SampleDefaults()) -> tuple[SamplePrompt, ...]:
    """The prompts of a .txt, .toml or .json prompt file, checked; `defaults` fill what a prompt leaves out."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--sample_prompts {path}: the file does not exist; give a .txt, .toml or .json "
                             "prompt file (one prompt per line in .txt).")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise UserInputError(f"--sample_prompts {path}: sd-scripts reads .txt, .toml and .json prompt files; rename "
                             "it (a file of one prompt per line is a .txt).")
    text = path.read_text(encoding="utf-8-sig")
    entries = {".txt": _txt_entries, ".toml": _toml_entries, ".json": _json_entries}[suffix](text, path)
    prompts = tuple(_prompt(index, entry, where, defaults) for index, (where, entry) in enumerate(entries))
    if not prompts:
        raise UserInputError(f"--sample_prompts {path} holds no prompt; write one prompt per line (lines starting "
                             "with # are comments).")
    return prompts


def parse_prompt_line(line: str, where: str) -> dict[str, str]:
    """'a dog --n cat --w 640' -> {"prompt": "a dog", "negative_prompt": "cat", "width": "640"}; values stay text."""
    prompt, *options = line.split(" --")
    entry = {"prompt": prompt.strip()}
    for option in options:
        name, _, value = option.strip().partition(" ")
        key = INLINE_OPTIONS.get(name.lower())
        if key is None:
            known = ", ".join(f"--{n}" for n in INLINE_OPTIONS)
            raise UserInputError(f"{where}: unknown option --{name}; the options are {known} (write a prompt's own "
                                 "' --' without the space before it).")
        if not value.strip():
            raise UserInputError(f"{where}: --{name} has no value; write it like --{name} {_EXAMPLES[key]}.")
        entry[key] = value.strip()
    return entry


def canonical_sampler(name: str, where: str) -> str:
    """An sd-scripts sampler name (or a WebUI alias) as the sampler to build; unknown names are refused."""
    lowered = " ".join(name.lower().split())
    lowered = SAMPLER_ALIASES.get(lowered, lowered)
    if lowered in SAMPLERS:
        return lowered
    raise UserInputError(f"{where}: unknown sampler {name!r}; use one of {', '.join(SAMPLERS)} (or "
                         f"{', '.join(repr(a) for a in SAMPLER_ALIASES)}).")


_EXAMPLES = {"negative_prompt": "lowres", "width": "512", "height": "512", "seed": "42", "sample_steps": "30",
             "scale": "7.5", "sample_sampler": "euler_a"}


def _txt_entries(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            where = f"{path} line {number}"
            entries.append((where, parse_prompt_line(line, where)))
    return entries


def _toml_entries(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserInputError(f"--sample_prompts {path} is not valid TOML ({error}).") from None
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise UserInputError(f"--sample_prompts {path}: sd-scripts' TOML prompt files hold a [prompt] table of "
                             "defaults and one [[prompt.subset]] table per prompt, with prompt = \"...\".")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    _check_keys(defaults, f"{path} [prompt]")
    entries = []
    for number, subset in enumerate(subsets, start=1):
        where = f"{path} [[prompt.subset]] number {number}"
        _check_keys(subset, where)
        entries.append((where, {**defaults, **subset}))
    return entries


def _json_entries(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserInputError(f"--sample_prompts {path} is not valid JSON ({error}).") from None
    if not isinstance(data, list):
        raise UserInputError(f"--sample_prompts {path}: a JSON prompt file is a list of prompt lines or objects "
                             "like {\"prompt\": \"...\", \"seed\": 42}.")
    entries = []
    for number, item in enumerate(data, start=1):
        where = f"{path} item {number}"
        if isinstance(item, str):
            entries.append((where, parse_prompt_line(item.strip(), where)))
        elif isinstance(item, dict):
            _check_keys(item, where)
            entries.append((where, item))
        else:
            raise UserInputError(f"{where}: {item!r} is neither a prompt line nor an object with a \"prompt\" key.")
    return entries


def _check_keys(entry: dict[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise UserInputError(f"{where}: unknown key {', '.join(unknown)}; the keys are {', '.join(KEYS)}.")


def _prompt(index: int, entry: dict[str, Any], where: str, defaults: SampleDefaults) -> SamplePrompt:
    """Check and convert one entry's values; sizes rounded as sd-scripts rounds them."""
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise UserInputError(f"{where}: no prompt text; give prompt = \"a photo of sks dog\".")
    negative = entry.get("negative_prompt")
    if defaults.weights:
        _check_weights((prompt, negative), where)
    sampler = entry.get("sample_sampler")
    return SamplePrompt(
        index=index, prompt=prompt,
        negative_prompt=None if negative is None else str(negative),
        width=_size(_number(entry, "width", int, where, DEFAULT_SIZE), defaults.size_multiple),
        height=_size(_number(entry, "height", int, where, DEFAULT_SIZE), defaults.size_multiple),
        steps=_steps(_number(entry, "sample_steps", int, where, defaults.steps), where),
        scale=_number(entry, "scale", float, where, defaults.scale),
        guidance=_number(entry, "guidance_scale", float, where, defaults.guidance),
        seed=_number(entry, "seed", int, where, None),
        sampler=None if sampler is None else canonical_sampler(str(sampler), where),
        source=where,
    )


def _check_weights(texts: tuple[str | None, ...], where: str) -> None:
    """Prompts are read with (word:1.2) weights (SD, SDXL): a weight must be a number (sd-scripts stops at
    the first sample instead)."""
    for text in texts:
        problem = None if text is None else weight_syntax_problem(str(text))
        if problem:
            raise UserInputError(f"{where}: {problem}")


def _number(entry: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    """A non-negative int or float from text or a TOML/JSON number; booleans and fractions of ints refused."""
    if key not in entry:
        return default
    value = entry[key]
    try:
        number = kind(value) if isinstance(value, str) else value
        ok = isinstance(number, (int, float)) and not isinstance(number, bool) and number >= 0
        ok = ok and (kind is float or float(number).is_integer())
    except ValueError:
        ok = False
    if not ok:
        flag = next(name for name, k in INLINE_OPTIONS.items() if k == key)
        kind_text = "a whole number" if kind is int else "a number"
        raise UserInputError(f"{where}: {key} {value!r} is not {kind_text} >= 0; write it like --{flag} "
                             f"{_EXAMPLES[key]} (or {key} = {_EXAMPLES[key]}).")
    return kind(number)


def _size(pixels: int, multiple: int = 8) -> int:
    """sd-scripts' rounding: down to a multiple of `multiple` (8; FLUX.1 16), at least 64."""
    return max(64, pixels - pixels % multiple)


def _steps(steps: int, where: str) -> int:
    if not 1 <= steps <= MAX_STEPS:
        raise UserInputError(f"{where}: {steps} sampling steps; give 1 to {MAX_STEPS}, e.g. --s 30.")
    return steps
