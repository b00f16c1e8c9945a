"""Top-k metrics of a recommended list against a set of relevant items (You et al., 4.4).

Plain numpy, no framework. Relevance is binary. A recommended list may hold ``None`` (a title
that mapped to nothing, or a duplicate): such a slot is never relevant. A relevant item that
appears twice counts once (the later slot scores nothing).

- ``DCG@k = sum_{i=1..k} rel_i / log2(i + 1)``;
- ``NDCG@k = DCG@k / IDCG@k`` with ``IDCG@k`` the DCG of ``min(k, |relevant|)`` hits at the top;
- ``Precision@k = hits in the top k / k`` (k fixed, also for a shorter list);
- ``Recall@k = hits in the top k / |relevant|``.

All three are 0 when ``relevant`` is empty.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

K = 5

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; 1.96 beyond.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def hits(recommended: Sequence[Any], relevant: Collection[Any], k: int = K) -> np.ndarray:
    """Binary relevance of the top ``k`` slots, shape ``(min(k, len(recommended)),)``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = set(relevant)
    seen: set[Any] = set()
    out = np.zeros(min(k, len(recommended)), dtype=np.float64)
    for i, item in enumerate(recommended[:k]):
        if item is not None and item in rel and item not in seen:
            out[i] = 1.0
        if item is not None:
            seen.add(item)
    return out


def dcg(gains: np.ndarray) -> float:
    """``sum gains_i / log2(i + 1)`` over 1-based positions."""
    gains = np.asarray(gains, dtype=np.float64)
    if gains.size == 0:
        return 0.0
    return float(np.sum(gains / np.log2(np.arange(2, gains.size + 2))))


def ndcg_at_k(recommended: Sequence[Any], relevant: Collection[Any], k: int = K) -> float:
    """NDCG@k with binary relevance and IDCG over ``min(k, |relevant|)`` hits."""
    n_rel = len(set(relevant))
    if n_rel == 0:
        return 0.0
    ideal = dcg(np.ones(min(k, n_rel)))
    return dcg(hits(recommended, relevant, k)) / ideal


def precision_at_k(recommended: Sequence[Any], relevant: Collection[Any], k: int = K) -> float:
    """Hits in the top ``k`` divided by ``k``."""
    if not relevant:
        return 0.0
    return float(hits(recommended, relevant, k).sum()) / k


def recall_at_k(recommended: Sequence[Any], relevant: Collection[Any], k: int = K) -> float:
    """Hits in the top ``k`` divided by the number of relevant items."""
    n_rel = len(set(relevant))
    if n_rel == 0:
        return 0.0
    return float(hits(recommended, relevant, k).sum()) / n_rel


def metrics_at_k(
    recommended: Sequence[Any], relevant: Collection[Any], k: int = K
) -> dict[str, float]:
    """``{"ndcg@k", "precision@k", "recall@k"}`` for one list."""
    return {
        f"ndcg@{k}": ndcg_at_k(recommended, relevant, k),
        f"precision@{k}": precision_at_k(recommended, relevant, k),
        f"recall@{k}": recall_at_k(recommended, relevant, k),
    }


def mean_metrics(
    lists: Sequence[Sequence[Any]], relevant: Sequence[Collection[Any]], k: int = K
) -> dict[str, float]:
    """Mean of :func:`metrics_at_k` over paired lists (0s for an empty input)."""
    if len(lists) != len(relevant):
        raise ValueError(f"{len(lists)} lists but {len(relevant)} relevant sets")
    keys = (f"ndcg@{k}", f"precision@{k}", f"recall@{k}")
    if not lists:
        return dict.fromkeys(keys, 0.0)
    rows = [metrics_at_k(r, g, k) for r, g in zip(lists, relevant, strict=True)]
    return {key: float(np.mean([row[key] for row in rows])) for key in keys}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t 95% interval (0 for fewer than 2 values)."""
    if confidence != 0.95:
        raise ValueError("only the 95% interval is tabulated")
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), 0.0
    df = arr.size - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return float(arr.mean()), float(t * arr.std(ddof=1) / math.sqrt(arr.size))
