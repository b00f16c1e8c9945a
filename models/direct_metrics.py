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

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

K = 5


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
