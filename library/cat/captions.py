"""The trigger-free caption `y` that CAT's preservation term is computed on.

CAT compares the adapted and the base model on the training caption without its trigger
(arXiv 2404.07554, Eq. 3). Three ways to derive it (`--cat_caption`):

- `strip` (default): delete the trigger words, then tidy the separators and spaces left behind:
  "sks, a photo of a teapot" -> "a photo of a teapot", "a photo of sks teapot" -> "a photo of teapot".
  The authors' code only did `replace("<trigger>, ", "")`, which misses most captions.
- `class`: replace the trigger with a class word: "a photo of sks" -> "a photo of teapot"; a class word
  already next to the trigger is not doubled ("sks teapot" -> "teapot").
- `empty`: the unconditional prompt "".

Triggers match as whole words or phrases, case-insensitively (CLIP's tokenizer lowercases anyway).

With `--weighted_captions` a trigger may sit inside weight syntax (library.cat.caption_weights), and
`strip` removes it from there too, so that the rest keeps its weights: a group the trigger leaves
without words goes with its brackets and weight ("(sks:1.3) dog" -> "dog", "a ((sks)), dog" -> "a, dog"),
a group that keeps words keeps its weight ("(sks dog:1.2)" -> "(dog:1.2)"). `class` puts the class word
where the trigger was, inside its group ("(sks:1.3) dog" -> "(teapot:1.3) dog").
"""

from __future__ import annotations

import re
from typing import Iterable

from library.cat.caption_weights import drop_from_weight_groups

CAPTION_MODES = ("strip", "class", "empty")
_REMOVED = "\x00"  # where `strip` deleted a trigger from a weighted caption (a character no caption holds)


def trigger_pattern(triggers: Iterable[str]) -> re.Pattern[str]:
    """A regex matching any of `triggers` as a whole word or phrase; longest phrases first."""
    phrases = sorted({t.strip() for t in triggers if t.strip()}, key=len, reverse=True)
    if not phrases:
        raise ValueError("trigger_pattern needs at least one non-empty trigger")
    alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in phrases)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def contains_trigger(caption: str, triggers: Iterable[str]) -> bool:
    """Whether `caption` holds any of the triggers as a whole word or phrase."""
    return trigger_pattern(triggers).search(caption) is not None


def trigger_free_caption(
    caption: str, triggers: Iterable[str], mode: str = "strip", class_word: str | None = None, separator: str = ",",
    weighted: bool = False,
) -> str:
    """The caption `y` for CAT's preservation term, derived from the training caption `y_T`.

    A caption without the trigger comes back unchanged in `strip` and `class` modes (its CAT term
    is then pure preservation). `separator` is the caption's tag separator (sd-scripts'
    `caption_separator`, "," by default); `weighted`: the caption is read with weight syntax
    (`--weighted_captions`), so `strip` also empties and tidies the weight groups the trigger sat in.
    """
    if mode == "empty":
        return ""
    pattern = trigger_pattern(triggers)
    if mode == "strip":
        if weighted:
            marked = pattern.sub(_REMOVED, caption)
            return tidy_caption(drop_from_weight_groups(marked, _REMOVED, lambda inside: tidy_caption(inside, separator)),
                                separator)
        return tidy_caption(pattern.sub("", caption), separator)
    if mode == "class":
        if not class_word or not class_word.strip():
            raise ValueError("--cat_caption class needs a class word (--cat_class_word or the subset's class tokens)")
        replaced = pattern.sub(class_word.strip(), caption)
        return tidy_caption(_collapse_repeats(replaced, class_word.strip()), separator)
    raise ValueError(f"unknown caption mode {mode!r}; expected one of {', '.join(CAPTION_MODES)}")


def class_word_from_tokens(class_tokens: str, triggers: Iterable[str]) -> str:
    """The class word hidden in DreamBooth class tokens: "sks teapot" -> "teapot" (trigger removed)."""
    return tidy_caption(trigger_pattern(triggers).sub("", class_tokens), ",")


def tidy_caption(caption: str, separator: str = ",") -> str:
    """Collapse the empty tags, doubled separators and spaces that removing words leaves behind."""
    sep = separator.strip() or ","
    tags = [re.sub(r"\s+([.;:!?])", r"\1", " ".join(tag.split())) for tag in caption.split(sep)]
    kept = [tag for tag in tags if tag]
    joiner = f"{sep} " if sep != " " else " "
    return joiner.join(kept)


def _collapse_repeats(text: str, word: str) -> str:
    """`word word` -> `word` (case-insensitive), for class words placed next to themselves."""
    escaped = r"\s+".join(map(re.escape, word.split()))
    return re.sub(rf"(?<!\w)({escaped})(?:\s+{escaped})+(?!\w)", r"\1", text, flags=re.IGNORECASE)
