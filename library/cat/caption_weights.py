"""sd-scripts' caption weight syntax (`--weighted_captions`), as plain text functions.

The syntax is AUTOMATIC1111's, as sd-scripts reads it (library/strategy_base.py,
`TokenizeStrategy._get_weighted_input_ids` and its `parse_prompt_attention`):

- `(words)` multiplies the weight of `words` by 1.1, `[words]` by 1 / 1.1; groups nest and multiply;
- `(words:1.3)` multiplies it by 1.3 (a signed decimal number: no exponent);
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a bracket that closes nothing is text;
  a group left open at the end still weighs what it would weigh closed;
- runs of equal weight are joined, and the text of each run is tokenized on its own.

This package holds it (not the families, which tokenize with it) because CAT's trigger-free caption
must also rewrite it: `drop_from_weight_groups` removes a deleted trigger from the groups it sat in.
"""

from __future__ import annotations

import re
from typing import Callable

from library.errors import UserInputError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One token of the syntax per match, in sd-scripts' order of alternatives: escapes, a lone backslash,
# openers, a weighted closer (its number in group 1), closers, a run of text, a lone colon.
_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` as runs of (text, weight), adjacent runs of equal weight joined; [("", 1.0)] for no text.

    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))." -> [("a ", 1.0), ("house", 1.573), (" ", 1.1),
    ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)], each weight
    the float product of its multipliers, innermost first, as sd-scripts multiplies them.
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            runs.append([token, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _join_equal_runs(runs) or [("", 1.0)]


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise UserInputError(
            f"the weight ':{number})' in {text!r} is not a number; write it like (word:1.2), or escape brackets "
            "meant as text as \\( and \\)."
        ) from None


def _join_equal_runs(runs: list[list]) -> list[tuple[str, float]]:
    joined: list[tuple[str, float]] = []
    for text, weight in runs:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + text, weight)
        else:
            joined.append((text, weight))
    return joined


def weight_syntax_problem(text: str) -> str | None:
    """Why `text` cannot be read with weights (a weight that is not a number); None if it can."""
    try:
        parse_prompt_attention(text)
    except UserInputError as error:
        return str(error)
    return None


def drop_from_weight_groups(text: str, marker: str, tidy: Callable[[str], str]) -> str:
    """`text` with every `marker` (where a trigger was deleted) removed, and the groups it sat in tidied.

    A group that keeps words keeps its brackets and weight, its inside tidied by `tidy` (the caption
    tidier: separators and spaces the deletion left): "(<m> dog:1.2)" -> "(dog:1.2)". A group left
    with nothing is removed with its weight, and counts as a deletion in the group around it:
    "(<m>:1.3) dog" -> " dog", "((<m>)) dog" -> " dog". Groups without a marker, escaped brackets and
    brackets that close nothing are kept exactly as written.
    """
    pieces: list[str] = []
    open_at: dict[str, list[int]] = {"(": [], "[": []}
    for match in _TOKENS.finditer(text):
        token = match.group(0)
        kind = "(" if token == ")" or match.group(1) is not None else "[" if token == "]" else None
        if token in open_at:
            open_at[token].append(len(pieces))
        elif kind and open_at[kind] and _innermost(open_at, kind):
            start = open_at[kind].pop()
            inside = "".join(pieces[start + 1 :])
            if marker in inside:
                kept = tidy(inside.replace(marker, ""))
                pieces[start:] = [pieces[start], kept, token] if kept else [marker]
                continue
        elif kind and open_at[kind]:  # closes a group that another, still open, overlaps: left as written
            open_at[kind].pop()
        pieces.append(token)
    return "".join(pieces).replace(marker, "")


def _innermost(open_at: dict[str, list[int]], kind: str) -> bool:
    """Whether the innermost open group of `kind` has no group of the other kind open inside it."""
    other = open_at["[" if kind == "(" else "("]
    return not other or other[-1] < open_at[kind][-1]
