"""Reranking metrics (KAR's definitions). Intervals comparing systems: :mod:`models.stats`.

All metric functions take ``labels`` and ``scores`` as arrays of shape ``[lists, items]``
(numpy arrays, torch tensors or nested lists). Items are ranked by descending score; ties are
broken by position, deterministically: of two items with equal scores the one that comes first
in the list ranks first (a stable sort on the negated scores).

With ``rel`` the label of the item at rank ``i`` (1-based) and only the top ``K`` ranks counted:

- ``NDCG@K = DCG@K / IDCG@K`` with ``DCG@K = sum_i (2^rel_i - 1) / log2(i + 1)`` and ``IDCG@K``
  the DCG of the labels sorted in decreasing order; 0 for a list with no positive.
- ``MAP@K`` = the mean, over the hits (``rel > 0``) in the top ``K``, of ``hits so far / rank``;
  0 when the top ``K`` holds no hit. The denominator is the number of hits in the top ``K``
  (KAR's code), not ``min(K, positives)``.

``soft-AUC`` is a continuous companion of these (not one of KAR's metrics): the mean, over the
list's (positive, negative) item pairs, of ``sigmoid(score_pos - score_neg)``; 0.5 for a list
without a positive or without a negative. Unlike NDCG@K it moves with every change of the
scores, not only when the top K changes order.

The ``*_per_list`` variants return one value per list (shape ``[lists]``, vectorised, no Python
loop over lists); :func:`map_at_k` and :func:`ndcg_at_k` are their means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KS: tuple[int, ...] = (1, 3, 5, 7)


def _as_2d(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [lists, items], got shape {arr.shape}")
    return arr


def _ranked_labels(labels: Any, scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels in rank order, cut to the top ``k``, and the full label matrix.

    Returns:
        ``top`` ``[lists, min(k, items)]`` labels ordered by descending score (stable on ties)
        and ``lab`` ``[lists, items]`` the labels as float64.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    lab = _as_2d("labels", labels)
    sco = _as_2d("scores", scores)
    if lab.shape != sco.shape:
        raise ValueError(f"labels {lab.shape} and scores {sco.shape} must have the same shape")
    order = np.argsort(-sco, axis=1, kind="stable")
    top = np.take_along_axis(lab, order[:, :k], axis=1)
    return top, lab


def map_at_k_per_list(labels: Any, scores: Any, k: int) -> np.ndarray:
    """MAP@K of each list: shape ``[lists]``, float64 (0 where the top K holds no hit)."""
    top, _ = _ranked_labels(labels, scores, k)
    hit = (top > 0).astype(np.float64)  # [lists, k]
    hits_so_far = np.cumsum(hit, axis=1)
    ranks = np.arange(1, top.shape[1] + 1, dtype=np.float64)
    precision_sum = (hit * hits_so_far / ranks).sum(axis=1)
    n_hits = hit.sum(axis=1)
    return np.divide(precision_sum, n_hits, out=np.zeros_like(n_hits), where=n_hits > 0)


def ndcg_at_k_per_list(labels: Any, scores: Any, k: int) -> np.ndarray:
    """NDCG@K of each list: shape ``[lists]``, float64 (0 for a list with no positive)."""
    top, lab = _ranked_labels(labels, scores, k)
    kk = top.shape[1]
    discount = 1.0 / np.log2(np.arange(2, kk + 2, dtype=np.float64))  # rank i -> 1/log2(i+1)
    dcg = ((np.power(2.0, top) - 1.0) * discount).sum(axis=1)
    ideal = -np.sort(-lab, axis=1)[:, :kk]
    idcg = ((np.power(2.0, ideal) - 1.0) * discount).sum(axis=1)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def soft_auc_per_list(labels: Any, scores: Any) -> np.ndarray:
    """Soft-AUC of each list: shape ``[lists]``, float64 in (0, 1).

    ``mean over pairs (i pos, j neg) of sigmoid(s_i - s_j)``; 0.5 where a list has no positive
    or no negative (no pair to order).
    """
    lab = _as_2d("labels", labels)
    sco = _as_2d("scores", scores)
    if lab.shape != sco.shape:
        raise ValueError(f"labels {lab.shape} and scores {sco.shape} must have the same shape")
    pos, neg = lab > 0, lab <= 0
    diff = sco[:, :, None] - sco[:, None, :]  # [lists, items, items]: s_i - s_j
    sig = 0.5 * (1.0 + np.tanh(0.5 * diff))  # sigmoid without overflow
    both = pos[:, :, None] & neg[:, None, :]
    n_pairs = both.sum(axis=(1, 2))
    total = np.where(both, sig, 0.0).sum(axis=(1, 2))
    return np.divide(total, n_pairs, out=np.full(len(lab), 0.5), where=n_pairs > 0)


def map_at_k(labels: Any, scores: Any, k: int) -> float:
    """Mean MAP@K over lists (``labels``, ``scores``: ``[lists, items]``)."""
    return float(map_at_k_per_list(labels, scores, k).mean())


def ndcg_at_k(labels: Any, scores: Any, k: int) -> float:
    """Mean NDCG@K over lists (``labels``, ``scores``: ``[lists, items]``)."""
    return float(ndcg_at_k_per_list(labels, scores, k).mean())


def metrics_per_list(labels: Any, scores: Any, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """``{"map@k": [lists], "ndcg@k": [lists]}`` for every ``k`` in ``ks``."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"map@{k}"] = map_at_k_per_list(labels, scores, k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k_per_list(labels, scores, k)
    return out


def all_metrics(labels: Any, scores: Any, ks: Sequence[int] = KS) -> dict[str, float]:
    """Means over lists of :func:`metrics_per_list`."""
    return {name: float(v.mean()) for name, v in metrics_per_list(labels, scores, ks).items()}
