from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.data.lists import ListsConfig, build_lists, history_length, split_users
from tasks.data.ml100k import load_ml100k
from tasks.data.reading import rating_data
from tasks.data.schema import RatingData


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


def hand_made() -> RatingData:
    """30 catalogue items, of which only 1..20 are ever rated.

    user 1 rates items 1..11 (item k: 5 stars when k is odd, else 2) -> history 6 (items 1..6),
    5 left: one full chunk (7..10) and a short one (11);
    user 2 rates items 12..20 -> history 5, one full chunk (17..20), nothing left;
    user 3 rates items 1..3 -> history 2, a short chunk (3) only.
    """
    ratings = [(1, k, 5 if k % 2 else 2, 100 + k) for k in range(1, 12)]
    ratings += [(2, k, 4, 200 + k) for k in range(12, 21)]
    ratings += [(3, k, 3, 300 + k) for k in range(1, 4)]
    users = [
        {"user_id": u, "gender": "F", "age": 25, "occupation": "writer", "zip": "0"}
        | {"source_id": str(u)}
        for u in (1, 2, 3)
    ]
    items = [
        {"item_id": k, "title": f"T{k} (1990)", "genres": ["Drama"], "source_id": str(k)}
        for k in range(1, 31)
    ]
    return rating_data("hand", users, items, ratings)


def _lists_of(rerank, uid: int) -> list[dict]:
    return rerank.lists.filter(pl.col("user_id") == uid).sort("chunk_idx").to_dicts()


def test_short_last_chunk_dropped_by_default() -> None:
    rerank = build_lists(hand_made(), ListsConfig(seed=0))
    # user 1: 1 list (the 1-item remainder dropped), user 2: 1, user 3: none (and left out)
    assert rerank.lists.height == 2
    assert sorted(rerank.users["user_id"].to_list()) == [1, 2]
    assert dict(rerank.users.select("user_id", "n_lists").iter_rows()) == {1: 1, 2: 1}


def test_keep_short_chunk_fills_it_with_negatives() -> None:
    """KAR's rule: 2 + 1 + 1 = 4 lists, each of 10; a 1-item chunk gets 10 - 1 = 9 negatives.

    User 1's negatives come from the rated items it did not rate, 12..20: exactly 9, so its
    short list is item 11 (5 stars: label 1) and all of 12..20 (label 0)."""
    rerank = build_lists(hand_made(), ListsConfig(seed=0, keep_short_chunk=True))
    assert rerank.lists.height == 4
    assert dict(rerank.users.select("user_id", "n_lists").iter_rows()) == {1: 2, 2: 1, 3: 1}
    assert (rerank.lists["item_ids"].list.len() == 10).all()
    full, short = _lists_of(rerank, 1)
    assert sum(full["rated"]) == 4 and sum(short["rated"]) == 1
    assert sorted(short["item_ids"]) == list(range(11, 21))
    assert dict(zip(short["item_ids"], short["labels"], strict=True))[11] == 1
    assert sum(short["labels"]) == 1
    (only,) = _lists_of(rerank, 3)  # item 3 (3 stars: label 0) + 9 negatives from 4..20
    rated = [i for i, r in zip(only["item_ids"], only["rated"], strict=True) if r]
    assert rated == [3] and sum(only["labels"]) == 0
    assert all(4 <= i <= 20 for i in only["item_ids"] if i != 3)
    # the history prefixes are those without the flag, plus user 3's (items 1, 2) now kept
    before = build_lists(hand_made(), ListsConfig(seed=0)).history
    assert rerank.history.filter(pl.col("user_id") < 3).equals(before)
    assert rerank.history.filter(pl.col("user_id") == 3)["item_id"].to_list() == [1, 2]


def test_negatives_only_from_rated_items() -> None:
    """Items 21..30 have no rating: never a negative under "rated" (the default, KAR's pool);
    the first rule ("catalogue") draws from them (user 1's short list: 9 of 12..30, so at
    least one of 21..30 unless all 9 fall on 12..20, chance 1 / C(19, 9) = 1 / 92,378)."""
    rated = build_lists(hand_made(), ListsConfig(seed=0, keep_short_chunk=True))
    negatives = [
        i
        for row in rated.lists.iter_rows(named=True)
        for i, r in zip(row["item_ids"], row["rated"], strict=True)
        if not r
    ]
    assert len(negatives) == 6 + 9 + 6 + 9
    assert max(negatives) <= 20
    old = build_lists(
        hand_made(), ListsConfig(seed=0, keep_short_chunk=True, negatives_from="catalogue")
    )
    _, short = _lists_of(old, 1)
    assert any(i > 20 for i in short["item_ids"])
    with pytest.raises(ValueError, match="negatives_from"):
        ListsConfig(negatives_from="all")  # type: ignore[arg-type]


def test_every_item_rated_keeps_todays_draws(ml100k_dir: Path) -> None:
    """ML-100K: all 1,682 items have a rating, so "rated" draws exactly today's lists."""
    data = load_ml100k(ml100k_dir)
    a = build_lists(data, ListsConfig(seed=7))
    b = build_lists(data, ListsConfig(seed=7, negatives_from="catalogue"))
    assert a.lists.equals(b.lists)
