"""Two ways to make a reranker lean on its knowledge vectors (reward-model options of
:class:`tasks.rlrf4rec.reranker.TrainConfig`).

- ``knowledge_draws``: several knowledge vectors per user (say the N texts a policy sampled for
  the user, or the profile-and-history text beside the LLM's answer). At every epoch each
  training list reads one of its user's vectors, drawn at random (:class:`DrawTable`), so the
  reranker sees texts of one user that differ; validation reads each user's first vector.
- ``contrastive``: a knowledge-contrastive term. A list scored with its own user's vector must
  fit its labels better than with another user's (the next list's in the batch):
  ``weight * mean softplus(BCE_own - BCE_other)`` over the lists whose neighbour is another user
  (:func:`knowledge_contrast`), added to the listwise loss.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from tasks.rlrf4rec.encode import frame_vectors
from tasks.rlrf4rec.reranker_data import positions


class DrawTable:
    """Knowledge vectors, one or more per user: ``matrix`` ``[n, dim]``, ``rows(ids)`` (each
    user's first vector, in the frame's order) and ``draw_rows(ids, rng)`` (one drawn at
    random per id)."""

    def __init__(self, frame: pl.DataFrame, what: str = "user_vectors") -> None:
        if "user_id" not in frame.columns or "vector" not in frame.columns:
            raise ValueError(
                f"{what} must have columns 'user_id' and 'vector', got {frame.columns}"
            )
        ordered = frame.with_row_index("_row").sort("user_id", "_row")
        self.what = what
        self.matrix = frame_vectors(ordered, "vector")
        if not np.isfinite(self.matrix).all():
            raise ValueError(f"{what} holds non-finite values")
        ids = ordered["user_id"].to_numpy().astype(np.int64)
        self._users, self._start, self._count = np.unique(
            ids, return_index=True, return_counts=True
        )

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def _pos(self, ids: np.ndarray) -> np.ndarray:
        return positions(self._users, ids, self.what)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """``[n]`` the row of each id's first vector."""
        return self._start[self._pos(ids)]

    def draw_rows(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[n]`` a row of one of each id's vectors, drawn uniformly and independently."""
        pos = self._pos(ids)
        return self._start[pos] + (rng.random(len(pos)) * self._count[pos]).astype(np.int64)


def knowledge_contrast(
    own_scores: torch.Tensor,
    other_scores: torch.Tensor,
    labels: torch.Tensor,
    differs: torch.Tensor,
) -> torch.Tensor:
    """``mean softplus(BCE_own - BCE_other)`` over the lists where ``differs``.

    Args:
        own_scores: ``[b, L]`` logits of the lists with their own user's vector.
        other_scores: ``[b, L]`` logits of the same lists with another user's vector.
        labels: ``[b, L]`` 0/1 labels.
        differs: ``[b]`` bool: the other vector is another user's (a list whose neighbour is
            the same user is left out).

    Returns:
        A scalar; 0 when no list qualifies.
    """
    target = labels.to(own_scores.dtype)
    own = F.binary_cross_entropy_with_logits(own_scores, target, reduction="none").mean(-1)
    other = F.binary_cross_entropy_with_logits(other_scores, target, reduction="none").mean(-1)
    if not bool(differs.any()):
        return own_scores.sum() * 0.0
    return F.softplus(own - other)[differs].mean()


def other_user_rows(rows: np.ndarray, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The next list's vector row for each list of a batch (a cyclic shift), and whether it
    belongs to another user: ``([b] rows, [b] bool)``."""
    return np.roll(rows, 1), np.roll(user_ids, 1) != user_ids


__all__ = ["DrawTable", "knowledge_contrast", "other_user_rows"]
