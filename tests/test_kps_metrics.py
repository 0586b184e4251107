"""PS, IS and KPS (paper Eq. 4-11) against values computed by hand; no model involved."""

import math
import statistics

import pytest
import torch

from library.evaluation.kps_metrics import (
    SIMILARITY_FLOOR,
    cosine_similarity,
    harmonic_mean,
    identity_score,
    knowledge_preservation_score,
    pairwise_similarities,
    prompt_score,
)


def test_cosine_similarity_row_by_row():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [6.0, 8.0], [-1.0, -2.0]])
    assert cosine_similarity(a, b).tolist() == pytest.approx([1 / math.sqrt(2), 1.0, -1.0])


def test_harmonic_mean_by_hand():
    score = harmonic_mean([0.5, 0.25])
    assert score.value == pytest.approx(2 / (2 + 4))
    assert (score.count, score.clamped, score.floor) == (2, 0, SIMILARITY_FLOOR)


def test_harmonic_mean_clamps_non_positive_values_and_counts_them():
    score = harmonic_mean([0.5, -0.2, 0.0], floor=0.01)
    assert score.value == pytest.approx(3 / (2 + 100 + 100))
    assert score.clamped == 2
    assert harmonic_mean([0.01, 0.5], floor=0.01).clamped == 0, "a value at the floor is not clamped"


def test_harmonic_mean_is_the_standard_library_s_whatever_the_order():
    """statistics.harmonic_mean sums exactly: the same similarities in another order give the same bits
    (a float sum, 3 / (1/0.7 + 1/0.6 + 1/1e-4), differs in its last bit when reversed)."""
    values = [0.7, 0.6, -0.2]
    score = harmonic_mean(values)
    assert score.value == harmonic_mean(values[::-1]).value == statistics.harmonic_mean([0.7, 0.6, SIMILARITY_FLOOR])
    assert score.clamped == 1


def test_harmonic_mean_of_nothing_or_with_a_bad_floor_is_refused():
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])
    with pytest.raises(ValueError, match="positive"):
        harmonic_mean([0.5], floor=0.0)


def test_knowledge_preservation_score_is_one_minus_the_harmonic_mean():
    score = knowledge_preservation_score([0.8, 0.4])
    assert score.value == pytest.approx(1 - 2 / (1 / 0.8 + 1 / 0.4))
    assert knowledge_preservation_score([1.0, 1.0]).value == pytest.approx(0.0), "identical pairs: nothing preserved"
    clamped = knowledge_preservation_score([-0.5], floor=1e-3)
    assert clamped.value == pytest.approx(1 - 1e-3) and clamped.clamped == 1


def test_prompt_and_identity_scores_are_harmonic_means():
    values = [0.3, 0.2, 0.6]
    expected = 3 / (1 / 0.3 + 1 / 0.2 + 1 / 0.6)
    assert prompt_score(values).value == pytest.approx(expected)
    assert identity_score(values).value == pytest.approx(expected)


def test_pairwise_similarities_needs_matching_batches():
    assert pairwise_similarities(torch.eye(2), torch.eye(2)) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        pairwise_similarities(torch.eye(2), torch.eye(3))
