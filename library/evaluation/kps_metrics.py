"""The paper's evaluation scores as pure functions: PS, IS and KPS (arXiv 2404.07554, Section 3, A.1).

Each score aggregates CLIP cosine similarities (Eq. 10) with a harmonic mean (Eq. 11):

- Prompt score (Eq. 4-5): the caption part without the trigger vs. the image generated with the
  adapter on and the trigger prompt.
- Identity score (Eq. 6-7): a training image vs. the image generated from its own caption.
- Knowledge Preservation Score (Eq. 8-9): 1 - the harmonic mean of the similarities between the
  images generated from `y` and from `y_T` with the same seed. High KPS: the adapter leaves
  trigger-free prompts alone.

The harmonic mean is defined for positive numbers only, and a cosine similarity can be 0 or
negative: each similarity is clamped to a small positive floor first, and the number clamped is
reported with the score (the project's decision, CAT.md "Evaluation"). The mean itself is the
standard library's `statistics.harmonic_mean` (exactly rounded; it refuses negative values, which
the clamp has removed).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

SIMILARITY_FLOOR = 1e-4


@dataclass(frozen=True)
class Score:
    """One aggregated score with what went into it."""

    value: float
    count: int  # similarities aggregated
    clamped: int  # of those, how many were below `floor` and were raised to it
    floor: float


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Eq. 10, row by row: SC(A, B) = A.B / (|A|_2 |B|_2) for two [n, d] batches of embeddings."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def harmonic_mean(values: Sequence[float], floor: float = SIMILARITY_FLOOR) -> Score:
    """Eq. 11: H(x_1..x_n) = n / sum_i 1/x_i, each x_i first raised to at least `floor` (> 0); a value at the
    floor is not counted as clamped."""
    if floor <= 0:
        raise ValueError(f"the clamp floor must be positive, got {floor}")
    if len(values) == 0:
        raise ValueError("the harmonic mean of no values is undefined; score at least one image")
    clamped = [max(float(v), floor) for v in values]
    return Score(statistics.harmonic_mean(clamped), len(clamped), sum(float(v) < floor for v in values), floor)


def prompt_score(similarities: Sequence[float], floor: float = SIMILARITY_FLOOR) -> Score:
    """PS, Eq. 4-5: H_i SC(E_txt(P_i), E_img(I_i^{y_T})), P_i the caption part without the trigger."""
    return harmonic_mean(similarities, floor)


def identity_score(similarities: Sequence[float], floor: float = SIMILARITY_FLOOR) -> Score:
    """IS, Eq. 6-7: H_i SC(E_img(I_i^{orig}), E_img(I_i^{y_T})), generated from the training image's caption."""
    return harmonic_mean(similarities, floor)


def knowledge_preservation_score(similarities: Sequence[float], floor: float = SIMILARITY_FLOOR) -> Score:
    """KPS, Eq. 8-9: 1 - H_i SC(E_img(I_i^{y}), E_img(I_i^{y_T})), both images from the same seed."""
    mean = harmonic_mean(similarities, floor)
    return Score(1.0 - mean.value, mean.count, mean.clamped, mean.floor)


def pairwise_similarities(a: Tensor, b: Tensor) -> list[float]:
    """SC of each row of `a` with the same row of `b`, as Python floats (for the scores above)."""
    if a.shape != b.shape:
        raise ValueError(f"embedding batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return [float(s) for s in cosine_similarity(a, b)]

