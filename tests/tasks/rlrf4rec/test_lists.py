from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.data.datasets import load_ml100k
from tasks.rlrf4rec.lists import ListsConfig, build_lists, history_length, split_users


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 1), (7, 4), (20, 10), (59, 30), (200, 30)])
def test_history_length(n: int, expected: int) -> None:
    assert history_length(n) == expected


def test_lists_follow_the_rules(ml100k_dir: Path) -> None:
    data = load_ml100k(ml100k_dir)
    rerank = build_lists(data, ListsConfig(seed=3, test_frac=0.34, valid_frac=0.25))
    ratings = data.ratings.sort(["user_id", "timestamp"])
    for uid in rerank.users["user_id"]:
        seq = ratings.filter(pl.col("user_id") == uid)
        h = history_length(seq.height)
        hist = rerank.history.filter(pl.col("user_id") == uid).sort("position")
        # the history is the earliest h ratings, in time order
        assert hist["item_id"].to_list() == seq["item_id"].to_list()[:h]
        lists = rerank.lists.filter(pl.col("user_id") == uid).sort("chunk_idx")
        assert lists.height == (seq.height - h) // 4
        rest = seq[h:]
        for row in lists.iter_rows(named=True):
            items, labels, rated = row["item_ids"], row["labels"], row["rated"]
            assert len(items) == len(labels) == len(rated) == 10
            assert len(set(items)) == 10
            # history items never appear in a list
            assert not set(items) & set(hist["item_id"].to_list())
            chunk = rest[4 * row["chunk_idx"] : 4 * row["chunk_idx"] + 4]
            assert {i for i, r in zip(items, rated, strict=True) if r} == set(chunk["item_id"])
            truth = dict(zip(chunk["item_id"], chunk["rating"], strict=True))
            for item, label, is_rated in zip(items, labels, rated, strict=True):
                expected = int(truth[item] > 3) if is_rated else 0
                assert label == expected
                if not is_rated:  # negatives are never items the user rated
                    assert item not in seq["item_id"].to_list()


def test_split_is_disjoint_and_covers_users(ml100k_dir: Path) -> None:
    rerank = build_lists(
        load_ml100k(ml100k_dir), ListsConfig(seed=1, test_frac=0.34, valid_frac=0.25)
    )
    splits = rerank.users.group_by("split").agg(pl.col("user_id"))
    sets = {row[0]: set(row[1]) for row in splits.iter_rows()}
    assert set(sets) == {"train", "valid", "test"}
    assert sets["train"].isdisjoint(sets["test"]) and sets["valid"].isdisjoint(sets["test"])
    assert sets["train"].isdisjoint(sets["valid"])
    per_list = rerank.lists.join(
        rerank.users.select("user_id", pl.col("split").alias("s")), on="user_id"
    )
    assert (per_list["split"] == per_list["s"]).all()


def test_split_fractions() -> None:
    import numpy as np

    split = split_users(np.arange(1, 1001), ListsConfig(seed=0))
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "valid", "test")}
    assert counts == {"test": 100, "valid": 90, "train": 810}


def test_deterministic_under_seed(ml100k_dir: Path) -> None:
    data = load_ml100k(ml100k_dir)
    a = build_lists(data, ListsConfig(seed=7))
    b = build_lists(data, ListsConfig(seed=7))
    c = build_lists(data, ListsConfig(seed=8))
    assert a.lists.equals(b.lists) and a.users.equals(b.users)
    assert not a.lists["item_ids"].equals(c.lists["item_ids"])
