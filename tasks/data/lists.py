"""The KAR reranking task: prompt histories, lists of 10, labels and the user split.

Rules (docs/design.md, "The reranking task"):

- each user's ratings in time order (ties keep file order);
- the earliest ``min((n + 1) // 2, 30)`` ratings are the history the LLM sees; they never
  appear in a list;
- the rest is cut into chunks of 4 consecutive rated items (a trailing chunk shorter than 4
  is dropped; with ``ListsConfig.keep_short_chunk``, KAR's rule, it is kept and filled with
  ``10 - len`` negatives); each chunk's negatives are drawn uniformly from the items somebody
  rated (KAR's ``item_set``: on ML-1M 3,706 of movies.dat's 3,883 rows; on ML-100K and
  Amazon-Books every catalogue item) that the user never rated; the 10 items are shuffled.
  Excluding the user's own items is a deliberate fix: KAR's ``random.sample(item_set, ...)``
  can draw an item of the list itself or one the user liked, as a negative;
- label 1 when rating > 3 (``positive_above``; KAR's Amazon-Books: > 4), else 0; sampled
  negatives are 0;
- users are split by id: ``test_frac`` test, then ``valid_frac`` of the remaining train users
  as a validation slice for checkpoint selection. All randomness comes from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from tasks.data.schema import DataError, RatingData

HISTORY_CAP = 30
CHUNK = 4
N_NEGATIVES = 6
LIST_LEN = CHUNK + N_NEGATIVES
POSITIVE_ABOVE = 3


@dataclass(frozen=True)
class ListsConfig:
    """How the reranking lists are built.

    Attributes:
        seed: the split's seed (negatives and shuffles: ``seed + 1``).
        test_frac, valid_frac: test share of the users; validation share of the rest.
        history_cap: most ratings in the prompt history.
        chunk: rated items per list.
        n_negatives: sampled negatives per list (a list holds ``chunk + n_negatives``).
        keep_short_chunk: keep a user's last chunk of fewer than ``chunk`` rated items and
            fill it with ``chunk + n_negatives - len`` negatives (KAR's
            ``generate_rerank_data``; the paper profile). Off: the remainder is dropped.
        negatives_from: ``"rated"`` (items with at least one rating in the data set, KAR's
            pool) or ``"catalogue"`` (every item row, the first rule; differs on ML-1M only).
    """

    seed: int = 42
    test_frac: float = 0.1
    valid_frac: float = 0.1
    history_cap: int = HISTORY_CAP
    chunk: int = CHUNK
    n_negatives: int = N_NEGATIVES
    positive_above: int = POSITIVE_ABOVE  # label 1 when rating > this
    keep_short_chunk: bool = False
    negatives_from: Literal["rated", "catalogue"] = "rated"

    def __post_init__(self) -> None:
        if self.negatives_from not in ("rated", "catalogue"):
            raise ValueError(
                f"ListsConfig.negatives_from must be 'rated' or 'catalogue', "
                f"got {self.negatives_from!r}"
            )

    @property
    def list_len(self) -> int:
        """Items per list: ``chunk + n_negatives``."""
        return self.chunk + self.n_negatives


@dataclass
class RerankLists:
    """The prepared lists.

    - ``users``: the data set's users with ``split`` in {train, valid, test} and
      ``n_ratings``, ``n_history``, ``n_lists``;
    - ``history``: ``user_id``, ``position`` (0 = oldest), ``item_id``, ``rating``,
      ``timestamp``: the prompt history prefix;
    - ``lists``: ``list_id``, ``user_id``, ``split``, ``chunk_idx`` (0 = earliest list of that
      user), ``item_ids`` (List[Int64], length 10), ``labels`` (List[Int8]), ``rated``
      (List[Boolean]: True for the user's own rated items, False for sampled negatives).
    """

    users: pl.DataFrame
    history: pl.DataFrame
    lists: pl.DataFrame


def history_length(n_ratings: int, cap: int = HISTORY_CAP) -> int:
    """Number of earliest ratings that form the prompt history: ``min((n+1)//2, cap)``."""
    return min((n_ratings + 1) // 2, cap)


def split_users(user_ids: np.ndarray, cfg: ListsConfig) -> dict[int, str]:
    """Assign each user id to train / valid / test, by a seeded permutation of sorted ids."""
    rng = np.random.default_rng(cfg.seed)
    ids = np.sort(np.asarray(user_ids))
    perm = rng.permutation(len(ids))
    n_test = int(round(cfg.test_frac * len(ids)))
    n_valid = int(round(cfg.valid_frac * (len(ids) - n_test)))
    split = {}
    for rank, idx in enumerate(perm):
        uid = int(ids[idx])
        split[uid] = "test" if rank < n_test else ("valid" if rank < n_test + n_valid else "train")
    return split


def build_lists(data: RatingData, cfg: ListsConfig | None = None) -> RerankLists:
    """Build histories, lists and the user split from a normalised data set."""
    cfg = cfg or ListsConfig()
    if data.ratings.height == 0:
        raise DataError(f"{data.name}: no ratings")
    ordered = (
        data.ratings.with_row_index("_order")
        .sort(["user_id", "timestamp", "_order"])
        .drop("_order")
    )
    catalogue = data.items["item_id"].to_numpy()
    if cfg.negatives_from == "rated":  # same array (and draws) when every item has a rating
        catalogue = catalogue[np.isin(catalogue, ordered["item_id"].unique().to_numpy())]
    rng = np.random.default_rng(cfg.seed + 1)

    users = ordered["user_id"].to_numpy()
    items = ordered["item_id"].to_numpy()
    ratings = ordered["rating"].to_numpy()
    times = ordered["timestamp"].to_numpy()
    # Start offset of each user's block in the sorted arrays.
    uniq, starts, counts = np.unique(users, return_index=True, return_counts=True)

    hist_cols: dict[str, list] = {
        k: [] for k in ("user_id", "position", "item_id", "rating", "timestamp")
    }
    list_cols: dict[str, list] = {
        k: [] for k in ("user_id", "chunk_idx", "item_ids", "labels", "rated")
    }
    per_user = []
    for uid, start, n in zip(uniq.tolist(), starts.tolist(), counts.tolist(), strict=True):
        h = history_length(n, cfg.history_cap)
        n_lists = (n - h) // cfg.chunk
        if cfg.keep_short_chunk:
            n_lists = -(-(n - h) // cfg.chunk)  # ceil: the short last chunk is a list
        per_user.append((uid, n, h, n_lists))
        if n_lists == 0:
            continue
        block = slice(start, start + n)
        u_items, u_ratings = items[block], ratings[block]
        hist_cols["user_id"].extend([uid] * h)
        hist_cols["position"].extend(range(h))
        hist_cols["item_id"].extend(u_items[:h].tolist())
        hist_cols["rating"].extend(u_ratings[:h].tolist())
        hist_cols["timestamp"].extend(times[block][:h].tolist())
        rated_set = set(u_items.tolist())
        candidates = catalogue[~np.isin(catalogue, u_items)]
        most_negatives = cfg.list_len - min(cfg.chunk, n - h - (n_lists - 1) * cfg.chunk)
        if len(candidates) < most_negatives:
            raise DataError(
                f"{data.name}: user {uid} rated all but {len(candidates)} of the catalogue's "
                f"items; cannot sample {most_negatives} negatives"
            )
        for c in range(n_lists):
            lo = h + c * cfg.chunk
            pos_items = u_items[lo : lo + cfg.chunk]
            pos_labels = (u_ratings[lo : lo + cfg.chunk] > cfg.positive_above).astype(np.int8)
            n_neg = cfg.list_len - len(pos_items)  # n_negatives, more for a short last chunk
            negs = candidates[rng.choice(len(candidates), n_neg, replace=False)]
            all_items = np.concatenate([pos_items, negs])
            all_labels = np.concatenate([pos_labels, np.zeros(n_neg, np.int8)])
            order = rng.permutation(len(all_items))
            list_cols["user_id"].append(uid)
            list_cols["chunk_idx"].append(c)
            list_cols["item_ids"].append(all_items[order].tolist())
            list_cols["labels"].append(all_labels[order].tolist())
            list_cols["rated"].append([int(i) in rated_set for i in all_items[order]][:])
    stats = pl.DataFrame(
        per_user,
        schema={
            "user_id": pl.Int64,
            "n_ratings": pl.Int64,
            "n_history": pl.Int64,
            "n_lists": pl.Int64,
        },
        orient="row",
    ).filter(pl.col("n_lists") > 0)
    if stats.height == 0:
        raise DataError(
            f"{data.name}: no user left: every user has too few ratings for one list of "
            f"{cfg.chunk} after the history prefix"
        )
    split = split_users(stats["user_id"].to_numpy(), cfg)
    split_df = pl.DataFrame(
        {"user_id": list(split), "split": list(split.values())},
        schema={"user_id": pl.Int64, "split": pl.Utf8},
    )
    users_out = data.users.join(stats, on="user_id", how="inner").join(split_df, on="user_id")
    history = pl.DataFrame(
        hist_cols,
        schema={
            "user_id": pl.Int64,
            "position": pl.Int32,
            "item_id": pl.Int64,
            "rating": pl.Int8,
            "timestamp": pl.Int64,
        },
    )
    lists = (
        pl.DataFrame(
            list_cols,
            schema={
                "user_id": pl.Int64,
                "chunk_idx": pl.Int32,
                "item_ids": pl.List(pl.Int64),
                "labels": pl.List(pl.Int8),
                "rated": pl.List(pl.Boolean),
            },
        )
        .join(split_df, on="user_id")
        .sort(["user_id", "chunk_idx"])
        .with_row_index("list_id")
        .with_columns(pl.col("list_id").cast(pl.Int64))
        .select("list_id", "user_id", "split", "chunk_idx", "item_ids", "labels", "rated")
    )
    return RerankLists(users=users_out.sort("user_id"), history=history, lists=lists)


def lists_counts(rerank: RerankLists, data: RatingData) -> dict:
    """Counts worth printing: users, items, ratings, lists per split, share with no positive."""
    lists = rerank.lists.with_columns(pl.col("labels").list.sum().alias("_pos"))
    per_split = {}
    for split in ("train", "valid", "test"):
        part = lists.filter(pl.col("split") == split)
        per_split[split] = {
            "users": int(rerank.users.filter(pl.col("split") == split).height),
            "lists": int(part.height),
            "no_positive_share": float((part["_pos"] == 0).mean()) if part.height else 0.0,
        }
    return {
        "dataset": data.name,
        "users": int(data.users.height),
        "items": int(data.items.height),
        "ratings": int(data.ratings.height),
        "users_with_lists": int(rerank.users.height),
        "history_ratings": int(rerank.history.height),
        "lists": int(lists.height),
        "no_positive_share": float((lists["_pos"] == 0).mean()),
        "splits": per_split,
    }
