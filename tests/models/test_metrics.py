from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    all_metrics,
    map_at_k,
    map_at_k_per_list,
    ndcg_at_k,
    ndcg_at_k_per_list,
)

L2 = math.log2


def test_hand_worked_list() -> None:
    # scores rank the items 0,1,2,3,4 in that order; hits at ranks 1, 3, 4
    labels = [[1, 0, 1, 1, 0]]
    scores = [[0.9, 0.8, 0.7, 0.6, 0.5]]
    assert map_at_k(labels, scores, 1) == pytest.approx(1.0)
    assert map_at_k(labels, scores, 3) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert map_at_k(labels, scores, 5) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    dcg3 = 1 + 1 / L2(4)
    idcg3 = 1 + 1 / L2(3) + 1 / L2(4)
    assert ndcg_at_k(labels, scores, 3) == pytest.approx(dcg3 / idcg3)
    dcg5 = 1 + 1 / L2(4) + 1 / L2(5)
    assert ndcg_at_k(labels, scores, 5) == pytest.approx(dcg5 / idcg3)


def test_scores_reorder_items() -> None:
    # the positive sits last in the list but gets the top score
    labels = [[0, 0, 0, 1]]
    scores = [[0.1, 0.2, 0.3, 0.9]]
    assert map_at_k(labels, scores, 1) == 1.0
    assert ndcg_at_k(labels, scores, 1) == 1.0
    # reversed scores put it at rank 4
    assert map_at_k(labels, [[4, 3, 2, 1]], 3) == 0.0
    assert map_at_k(labels, [[4, 3, 2, 1]], 4) == pytest.approx(1 / 4)
    assert ndcg_at_k(labels, [[4, 3, 2, 1]], 4) == pytest.approx(1 / L2(5))


def test_no_positive_is_zero() -> None:
    labels = np.zeros((2, 5))
    scores = np.random.default_rng(0).random((2, 5))
    for k in (1, 3, 5, 7):
        assert map_at_k(labels, scores, k) == 0.0
        assert ndcg_at_k(labels, scores, k) == 0.0


def test_all_positive_is_one() -> None:
    labels = np.ones((3, 6))
    scores = np.random.default_rng(1).random((3, 6))
    for k in (1, 3, 5, 7):
        assert map_at_k(labels, scores, k) == pytest.approx(1.0)
        assert ndcg_at_k(labels, scores, k) == pytest.approx(1.0)


def test_ties_break_by_position() -> None:
    # all scores tied: the initial order is the ranking
    labels = [[0, 1, 0, 1]]
    tied = [[0.5, 0.5, 0.5, 0.5]]
    assert map_at_k(labels, tied, 4) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert ndcg_at_k(labels, tied, 2) == pytest.approx((1 / L2(3)) / (1 + 1 / L2(3)))
    # a partial tie: items 1 and 2 share the top score; item 1 (earlier) ranks first
    assert map_at_k([[0, 1, 0]], [[0.1, 0.7, 0.7]], 1) == 1.0
    assert map_at_k([[0, 0, 1]], [[0.1, 0.7, 0.7]], 1) == 0.0
    # deterministic: the same input always gives the same value
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 2, (50, 10))
    sco = rng.integers(0, 3, (50, 10)).astype(float)
    assert np.array_equal(map_at_k_per_list(lab, sco, 5), map_at_k_per_list(lab, sco, 5))


def test_k_larger_than_list_and_mean_over_lists() -> None:
    labels = [[1, 0], [0, 0]]
    scores = [[0.0, 1.0], [1.0, 0.0]]
    per = map_at_k_per_list(labels, scores, 10)
    assert per.tolist() == pytest.approx([0.5, 0.0])
    assert map_at_k(labels, scores, 10) == pytest.approx(0.25)
    assert ndcg_at_k_per_list(labels, scores, 10).tolist() == pytest.approx([1 / L2(3), 0.0])


def test_per_list_matches_loop_and_accepts_tensors() -> None:
    rng = np.random.default_rng(7)
    lab = rng.integers(0, 2, (200, 10))
    sco = rng.random((200, 10))
    per = map_at_k_per_list(lab, sco, 5)
    for i in range(0, 200, 37):
        assert per[i] == pytest.approx(map_at_k(lab[i : i + 1], sco[i : i + 1], 5))
    assert map_at_k(torch.tensor(lab), torch.tensor(sco), 5) == pytest.approx(per.mean())
    assert set(all_metrics(lab, sco)) == {f"{m}@{k}" for m in ("map", "ndcg") for k in (1, 3, 5, 7)}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same shape"):
        map_at_k([[1, 0]], [[1, 0, 0]], 1)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k([[1, 0]], [[1, 0]], 0)


def test_soft_auc_hand_worked() -> None:
    from models.metrics import soft_auc_per_list

    # one positive (score 2) against negatives scored 0 and 2:
    # (sigmoid(2 - 0) + sigmoid(2 - 2)) / 2 = (0.880797 + 0.5) / 2 = 0.690399
    labels = [[1, 0, 0], [0, 0, 0], [1, 1, 1]]
    scores = [[2.0, 0.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    got = soft_auc_per_list(labels, scores)
    assert np.allclose(got, [(1 / (1 + np.exp(-2.0)) + 0.5) / 2, 0.5, 0.5])
    # a small change of a score moves it, though the top-K order stays the same
    nudged = soft_auc_per_list([[1, 0, 0]], [[2.0, 0.0, 1.9]])
    assert nudged[0] > got[0]
    assert soft_auc_per_list([[1, 0]], [[1000.0, -1000.0]])[0] == 1.0  # no overflow
