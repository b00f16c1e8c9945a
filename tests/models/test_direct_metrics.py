"""NDCG@5, Precision@5 and Recall@5 of the second pipeline, on hand-worked lists."""

from __future__ import annotations

import math

import pytest

from models.direct_metrics import (
    dcg,
    hits,
    mean_metrics,
    metrics_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)

L2_3 = 1 / math.log2(3)  # 0.63093
L2_5 = 1 / math.log2(5)  # 0.43068
L2_6 = 1 / math.log2(6)  # 0.38685


def test_two_hits_of_two_relevant():
    # hits at ranks 1 and 3: DCG = 1 + 1/log2(4) = 1.5; IDCG over min(5, 2) = 2 hits = 1 + L2_3
    rec, rel = [1, 2, 3, 4, 5], {1, 3}
    assert ndcg_at_k(rec, rel) == pytest.approx(1.5 / (1 + L2_3))  # 0.91972
    assert ndcg_at_k(rec, rel) == pytest.approx(0.919721, abs=1e-6)
    assert precision_at_k(rec, rel) == pytest.approx(0.4)
    assert recall_at_k(rec, rel) == pytest.approx(1.0)


def test_unmapped_slot_and_duplicate_count_once():
    # None at rank 1, 7 at rank 2 (hit), 7 again at rank 3 (duplicate: no gain), 2 at rank 4
    rec, rel = [None, 7, 7, 2], {7, 2, 9, 10, 11, 12}
    assert hits(rec, rel).tolist() == [0.0, 1.0, 0.0, 1.0]
    idcg = 1 + L2_3 + 0.5 + L2_5 + L2_6  # five hits: |relevant| = 6 > k
    assert ndcg_at_k(rec, rel) == pytest.approx((L2_3 + L2_5) / idcg)  # 0.36005
    assert ndcg_at_k(rec, rel) == pytest.approx(0.360054, abs=1e-6)
    # Precision divides by k = 5 even though the list has 4 slots
    assert precision_at_k(rec, rel) == pytest.approx(2 / 5)
    assert recall_at_k(rec, rel) == pytest.approx(2 / 6)


def test_perfect_and_empty_cases():
    rel = [10, 20, 30, 40, 50]
    assert metrics_at_k(rel, rel) == {"ndcg@5": 1.0, "precision@5": 1.0, "recall@5": 1.0}
    assert metrics_at_k(list(reversed(rel)), rel)["ndcg@5"] == pytest.approx(1.0)
    assert metrics_at_k([], rel) == {"ndcg@5": 0.0, "precision@5": 0.0, "recall@5": 0.0}
    assert metrics_at_k([1, 2], []) == {"ndcg@5": 0.0, "precision@5": 0.0, "recall@5": 0.0}
    # only the top k count
    assert ndcg_at_k([0, 0, 0, 0, 0, 10], rel) == 0.0
    assert dcg([]) == 0.0


def test_single_relevant_at_rank_two():
    # IDCG over min(5, 1) = 1 hit: 1.0; DCG = 1/log2(3)
    assert ndcg_at_k([5, 9, 8], {9}) == pytest.approx(L2_3)
    assert recall_at_k([5, 9, 8], {9}) == 1.0
    assert precision_at_k([5, 9, 8], {9}) == pytest.approx(0.2)


def test_mean_metrics_and_k():
    out = mean_metrics([[1, 2, 3, 4, 5], [None]], [{1, 3}, {4}])
    assert out["ndcg@5"] == pytest.approx(0.919721 / 2, abs=1e-6)
    assert out["recall@5"] == pytest.approx(0.5)
    assert mean_metrics([], []) == {"ndcg@5": 0.0, "precision@5": 0.0, "recall@5": 0.0}
    assert ndcg_at_k([2, 1], {1}, k=1) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        hits([1], {1}, k=0)
    with pytest.raises(ValueError, match="2 lists but 1"):
        mean_metrics([[1], [2]], [{1}])
