"""Reference recommenders for the second pipeline: most-popular and item-kNN.

The paper reports only LLM rows; these two rows say what a plain collaborative recommender gets
on the same users, windows and ground truth. Both are time-aware and never see the future:

- they learn from the **train users'** liked ratings (rating >= ``like_min``) strictly before
  the evaluated window's cut-off;
- the evaluated user's own ratings before the cut-off (``history_item_ids``; or only the
  prompt's context with ``history="context"``) are the query, and are never recommended.

Most-popular ranks items by the number of such liked ratings. Item-kNN scores an item by the
sum of its cosine similarities to the user's liked items, each query item keeping only its
``neighbours`` most similar items; ties and users without a liked item fall back to
popularity. Items that share a title count as one (:meth:`Catalogue.canonical`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the reference recommenders."""

    k: int = 5
    like_min: int = 3
    neighbours: int = 50
    history: Literal["full", "context"] = "full"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.history not in ("full", "context"):
            raise ValueError(f"history must be 'full' or 'context', got {self.history!r}")


class _TrainLikes:
    """The train users' liked ratings sorted by time, for prefix queries ``ts < t``."""

    def __init__(
        self, ratings: pl.DataFrame, train_users: list[int], n_items: int, like_min: int
    ) -> None:
        liked = ratings.filter(
            pl.col("user_id").is_in(train_users) & (pl.col("rating") >= like_min)
        ).sort("timestamp")
        users = sorted(set(train_users))
        row_of = {u: i for i, u in enumerate(users)}
        self.ts = liked["timestamp"].to_numpy()
        self.items = liked["item_id"].to_numpy().astype(np.int64)
        self.rows = np.array([row_of[u] for u in liked["user_id"].to_list()], dtype=np.int64)
        self.n_users = len(users)
        self.n_items = n_items

    def upto(self, t: int) -> int:
        return int(np.searchsorted(self.ts, t, side="left"))

    def popularity(self, t: int) -> np.ndarray:
        n = self.upto(t)
        return np.bincount(self.items[:n], minlength=self.n_items).astype(np.float64)

    def matrix(self, t: int) -> np.ndarray:
        n = self.upto(t)
        x = np.zeros((self.n_users, self.n_items), dtype=np.float32)
        x[self.rows[:n], self.items[:n]] = 1.0
        return x


def _top_k(scores: np.ndarray, exclude: set[int], k: int, tie: np.ndarray) -> list[int]:
    """Indices of the ``k`` best scores (ties by ``tie``, then smaller id), skipping ``exclude``
    and index 0 (item ids start at 1)."""
    s = scores.astype(np.float64).copy()
    s[0] = -np.inf
    if exclude:
        s[list(exclude)] = -np.inf
    order = np.lexsort((np.arange(len(s)), -tie, -s))
    return [int(i) for i in order[:k] if np.isfinite(s[i])]


def recommend(
    windows: pl.DataFrame,
    ratings: pl.DataFrame,
    train_users: list[int],
    cfg: BaselineConfig,
    canonical: dict[int, int] | None = None,
) -> pl.DataFrame:
    """Top-k of both recommenders for every window of ``windows``.

    Returns ``user_id``, ``window_idx``, ``popular`` and ``item_knn`` (List[Int64], k ids each).
    ``canonical`` maps item ids onto one id per distinct title (never recommend both twins).
    """
    n_items = int(max(ratings["item_id"].max(), 0)) + 1
    likes = _TrainLikes(ratings, train_users, n_items, cfg.like_min)
    canonical = canonical or {}
    # Non-canonical twins are never recommended (their canonical id stands for them).
    twins = {i for i, c in canonical.items() if i != c}
    by_user = {
        int(uid): (np.asarray(it), np.asarray(rt), np.asarray(ts))
        for uid, it, rt, ts in ratings.group_by("user_id")
        .agg("item_id", "rating", "timestamp")
        .iter_rows()
    }
    out = []
    rows = windows.iter_rows(named=True)
    for row in tqdm(rows, total=windows.height, desc="baselines", leave=False):
        t = int(row["cutoff_ts"])
        if cfg.history == "full":
            it, rt, ts = by_user[int(row["user_id"])]
            known = it[ts < t].tolist()
            query = it[(ts < t) & (rt >= cfg.like_min)].tolist()
        else:
            known = list(row["context_item_ids"])
            query = [
                i
                for i, r in zip(row["context_item_ids"], row["context_ratings"], strict=True)
                if r >= cfg.like_min
            ]
        seen = set(known) | {canonical.get(i, i) for i in known} | twins
        query = sorted(set(query))
        pop = likes.popularity(t)
        popular = _top_k(pop, seen, cfg.k, pop)
        if query:
            x = likes.matrix(t)
            norms = np.sqrt(x.sum(axis=0))
            sims = (x[:, query].T @ x) / np.maximum(norms[query][:, None] * norms[None, :], 1e-12)
            sims[np.arange(len(query)), query] = 0.0
            if cfg.neighbours < n_items:
                kth = np.partition(sims, -cfg.neighbours, axis=1)[:, -cfg.neighbours][:, None]
                sims = np.where(sims >= kth, sims, 0.0)
            knn = _top_k(sims.sum(axis=0), seen, cfg.k, pop)
        else:
            knn = popular
        out.append(
            {
                "user_id": row["user_id"],
                "window_idx": row["window_idx"],
                "popular": popular,
                "item_knn": knn,
            }
        )
    return pl.DataFrame(
        out,
        schema={
            "user_id": pl.Int64,
            "window_idx": pl.Int64,
            "popular": pl.List(pl.Int64),
            "item_knn": pl.List(pl.Int64),
        },
    )
