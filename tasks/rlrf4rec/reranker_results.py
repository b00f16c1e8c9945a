"""A system's metrics on one split (:class:`EvalResult`: MAP@K and NDCG@K means and per-list
values, written as JSON and parquet), and the reference rows: the initial (shuffled) order,
train popularity and the oracle (:func:`reference_results`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from models.metrics import KS, metrics_per_list
from tasks.common.io import write_json, write_parquet
from tasks.data.prepare import PreparedData, load_prepared
from tasks.rlrf4rec.reranker_data import ListArrays, list_arrays

SPLITS = ("train", "valid", "test")


@dataclass
class EvalResult:
    """Metrics of one system on one split.

    Attributes:
        name: the system (``"dlcm"``, ``"prm+knowledge"``, ``"popularity"``, ...).
        split: ``train`` / ``valid`` / ``test``.
        metrics: ``{"map@1": ..., "ndcg@7": ...}`` means over lists.
        per_list: ``list_id``, ``user_id`` and one column per metric, one row per list.
    """

    name: str
    split: str
    metrics: dict[str, float]
    per_list: pl.DataFrame = field(repr=False)

    @property
    def n_lists(self) -> int:
        return self.per_list.height

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "n_lists": self.n_lists,
            "metrics": self.metrics,
        }


def evaluate_scores(
    name: str, split: str, arrays: ListArrays, scores: np.ndarray, ks=KS
) -> EvalResult:
    """An :class:`EvalResult` from scores ``[N, L]`` of ``arrays``' lists."""
    if arrays.n == 0:
        raise ValueError(f"no lists to evaluate in split {split!r}")
    per = metrics_per_list(arrays.labels, scores, ks)
    frame = pl.DataFrame(
        {"list_id": arrays.list_id, "user_id": arrays.user_id}
        | {k: v.astype(np.float64) for k, v in per.items()}
    )
    return EvalResult(name, split, {k: float(v.mean()) for k, v in per.items()}, frame)


def write_eval(result: EvalResult, path: str | Path, per_list: bool = True) -> Path:
    """Write ``result`` as JSON to ``path`` (and its per-list values beside it as parquet,
    ``<stem>.per_list.parquet``). Both writes are atomic. Returns ``path``."""
    path = Path(path)
    write_json(result.to_dict(), path)
    if per_list:
        write_parquet(result.per_list, path.with_name(f"{path.stem}.per_list.parquet"))
    return path


def split_lists(data: PreparedData, split: str) -> pl.DataFrame:
    """The lists of ``split``, by ``list_id``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return data.lists.filter(pl.col("split") == split).sort("list_id")


def popularity(data: PreparedData) -> pl.DataFrame:
    """``item_id``, ``count``: ratings of each item by train-split users (all their ratings)."""
    train_users = data.users.filter(pl.col("split") == "train")["user_id"]
    return (
        data.ratings.filter(pl.col("user_id").is_in(train_users.implode()))
        .group_by("item_id")
        .agg(pl.len().alias("count"))
    )


def reference_results(data_dir: str | Path, split: str = "test") -> dict[str, EvalResult]:
    """Reference rows on ``split``: ``initial`` (the shuffled order), ``popularity`` (train
    popularity, ties by position) and ``oracle`` (labels)."""
    data = load_prepared(data_dir)
    arrays = list_arrays(split_lists(data, split))
    n, width = arrays.item_ids.shape
    initial = np.broadcast_to(-np.arange(width, dtype=np.float32), (n, width))
    pop = popularity(data)
    counts = dict(zip(pop["item_id"].to_list(), pop["count"].to_list(), strict=True))
    lookup = np.vectorize(lambda i: counts.get(int(i), 0), otypes=[np.float32])
    pop_scores = lookup(arrays.item_ids) if n else np.zeros((0, width), np.float32)
    return {
        "initial": evaluate_scores("initial", split, arrays, initial),
        "popularity": evaluate_scores("popularity", split, arrays, pop_scores),
        "oracle": evaluate_scores("oracle", split, arrays, arrays.labels),
    }
