"""A reranker's inputs as arrays: the catalogue (:class:`ItemIndex`), lists
(:class:`ListArrays`), the user folds of the reward's cross-fitting, knowledge vectors keyed by
id (:class:`VectorTable`), model batches, and the scores of a model in eval mode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from models.rerankers import Reranker
from tasks.rlrf4rec.encode import frame_vectors


@dataclass
class ItemIndex:
    """Item vocabulary of a run: sorted ids, first-genre index per item, genre names."""

    item_ids: np.ndarray  # [n_items] int64, increasing
    item_genre: np.ndarray  # [n_items] int64, 0 = no genre
    genre_names: list[str]


def build_item_index(items: pl.DataFrame) -> ItemIndex:
    """The catalogue of ``items.parquet``; an item's genre is the first of its ``genres``."""
    items = items.sort("item_id")
    first = items["genres"].list.first().fill_null("").to_list()
    names = sorted({g for g in first if g})
    index = {g: i + 1 for i, g in enumerate(names)}
    genre = np.array([index.get(g, 0) for g in first], dtype=np.int64)
    return ItemIndex(items["item_id"].to_numpy().astype(np.int64), genre, names)


@dataclass
class ListArrays:
    """A set of lists as arrays: ``item_ids`` / ``labels`` ``[N, L]``, ids ``[N]``."""

    list_id: np.ndarray
    user_id: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.list_id.shape[0])


def list_arrays(lists: pl.DataFrame) -> ListArrays:
    """Arrays of a ``lists.parquet`` frame (its order kept; lists must share one length)."""
    n = lists.height
    if n == 0:
        empty = np.zeros((0, 0), dtype=np.int64)
        return ListArrays(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty)
    lengths = lists["item_ids"].list.len()
    if lengths.min() != lengths.max():
        raise ValueError("lists must all have the same length")
    width = int(lengths[0])
    items = lists["item_ids"].explode().to_numpy().astype(np.int64).reshape(n, width)
    labels = lists["labels"].explode().to_numpy().astype(np.float32).reshape(n, width)
    return ListArrays(
        lists["list_id"].to_numpy().astype(np.int64),
        lists["user_id"].to_numpy().astype(np.int64),
        items,
        labels,
    )


def user_folds(users: pl.DataFrame, n_folds: int = 2, seed: int = 0) -> pl.DataFrame:
    """Assign every non-test user to one of ``n_folds`` folds (seeded, balanced).

    Args:
        users: ``users.parquet`` (``user_id``, ``split``).
        n_folds: number of folds (>= 1).
        seed: seed of the permutation of the sorted user ids.

    Returns:
        ``user_id`` Int64, ``split`` Utf8, ``fold`` Int64 for the train and valid users.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    part = users.filter(pl.col("split") != "test").sort("user_id").select("user_id", "split")
    perm = np.random.default_rng(seed).permutation(part.height)
    fold = np.empty(part.height, dtype=np.int64)
    fold[perm] = np.arange(part.height) % n_folds
    return part.with_columns(pl.Series("fold", fold, dtype=pl.Int64))


class VectorTable:
    """Knowledge vectors keyed by id: ``matrix`` ``[n, dim]`` and ``rows(ids)``."""

    def __init__(self, frame: pl.DataFrame, id_col: str, what: str) -> None:
        if id_col not in frame.columns or "vector" not in frame.columns:
            raise ValueError(
                f"{what} must have columns {id_col!r} and 'vector', got {frame.columns}"
            )
        if frame[id_col].is_duplicated().any():
            dup = frame.filter(pl.col(id_col).is_duplicated())[id_col].unique().to_list()[:5]
            raise ValueError(f"{what} has more than one vector for {id_col} {dup}")
        self.what = what
        self.ids = frame[id_col].to_numpy().astype(np.int64)
        self.matrix = frame_vectors(frame, "vector")
        if not np.isfinite(self.matrix).all():
            raise ValueError(f"{what} holds non-finite values")
        order = np.argsort(self.ids)
        self._sorted, self._order = self.ids[order], order

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``matrix``; raises naming the ids that have no vector."""
        return self._order[positions(self._sorted, ids, self.what)]


def positions(sorted_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """``[n]`` the position of each of ``ids`` in ``sorted_ids`` (ascending, unique); raises
    naming the ids ``what`` has no vector for."""
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids).clip(max=max(len(sorted_ids) - 1, 0))
    ok = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not ok.all():
        missing = np.unique(ids[~ok])
        raise ValueError(
            f"{what} has no vector for {len(missing)} ids, e.g. {missing[:5].tolist()}"
        )
    return pos


def catalogue_vectors(item_vectors: pl.DataFrame, catalogue: ItemIndex) -> np.ndarray:
    """The item vectors of ``catalogue``'s items, in its order: ``[n_items, dim]``."""
    table = VectorTable(item_vectors, "item_id", "item_vectors")
    return table.matrix[table.rows(catalogue.item_ids)]


def make_batch(
    items: np.ndarray, user_rows: np.ndarray | None, users: np.ndarray | None
) -> dict[str, torch.Tensor]:
    """A model batch for lists ``items`` ``[b, L]`` whose users are ``user_rows`` of ``users``."""
    batch = {"item_ids": torch.from_numpy(items)}
    if users is not None and user_rows is not None:
        uniq, inv = np.unique(user_rows, return_inverse=True)
        batch["user_vec"] = torch.from_numpy(users[uniq])
        batch["user_index"] = torch.from_numpy(inv.astype(np.int64))
    return batch


@torch.inference_mode()
def predict_scores(
    model: Reranker,
    item_ids: np.ndarray,
    users: np.ndarray | None = None,
    user_rows: np.ndarray | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Scores of lists with a model in eval mode.

    Args:
        model: the reranker.
        item_ids: ``[N, L]`` raw item ids.
        users: ``[U, dim]`` user knowledge vectors (knowledge models).
        user_rows: ``[N]`` row of ``users`` for each list.
        batch_size: lists per forward pass.

    Returns:
        ``[N, L]`` float32 logits.
    """
    if model.cfg.knowledge and (users is None or user_rows is None):
        raise ValueError("this model reads user knowledge: pass user vectors")
    was_training = model.training
    model.eval()
    out = np.zeros(item_ids.shape, dtype=np.float32)
    for start in range(0, item_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        rows = user_rows[sl] if user_rows is not None else None
        out[sl] = model(make_batch(item_ids[sl], rows, users)).float().numpy()
    model.train(was_training)
    return out
