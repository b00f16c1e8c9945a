"""Window selection, ground truth, split and prompt of the second pipeline (You et al., 3.1)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from tasks.data.ml100k import load_ml100k
from tasks.data.schema import RatingData
from tasks.direct.windows import (
    WindowConfig,
    build_windows,
    load_zip_table,
    location_of,
    prepare_direct,
    select,
    split_users,
    valid_cutoffs,
    you_et_al_cutoffs,
)


def test_valid_cutoffs_hand_worked():
    cfg = WindowConfig(context_size=3, k_min=2, n_ground_truth=2, min_ground_truth=2)
    ts = np.array([10, 20, 20, 30, 40, 50, 60, 70])
    ratings = np.array([5, 4, 1, 1, 2, 5, 3, 4])
    # j=1 (t=20): context [5] has 1 liked, 0 hated -> no.  (index 2 shares t=20: no cut there)
    # j=3 (t=30): context [5, 4, 1]: 2 liked; liked at/after: 5, 3, 4 -> yes
    # j=4: [4, 1, 1]: 2 hated -> yes;  j=5: [1, 1, 2]: 3 hated -> yes
    # j=6: [1, 2, 5]: 2 hated; liked after: 3, 4 -> yes
    # j=7: [2, 5, 3]: 2 liked, but only 1 liked at/after -> no
    assert valid_cutoffs(ts, ratings, cfg).tolist() == [3, 4, 5, 6]
    # k_min 3 keeps only the window with three hated ratings
    cfg3 = WindowConfig(context_size=3, k_min=3, n_ground_truth=2, min_ground_truth=2)
    assert valid_cutoffs(ts, ratings, cfg3).tolist() == [5]
    assert valid_cutoffs(ts[:1], ratings[:1], cfg).tolist() == []


def _sorted_ratings(data, user_id):
    return (
        data.ratings.with_row_index("_o")
        .filter(pl.col("user_id") == user_id)
        .sort(["timestamp", "_o"])
    )


def test_windows_follow_the_rules(ml100k_dir):
    data = load_ml100k(ml100k_dir)
    cfg = WindowConfig(seed=3, liked_cap=4, hated_cap=2)
    windows = build_windows(data, cfg)
    assert windows.height == 6 and windows["user_id"].n_unique() == 6
    for row in windows.iter_rows(named=True):
        r = _sorted_ratings(data, row["user_id"])
        before = r.filter(pl.col("timestamp") < row["cutoff_ts"]).tail(10)
        after = r.filter((pl.col("timestamp") >= row["cutoff_ts"]) & (pl.col("rating") >= 3))
        assert row["cutoff_ts"] in r["timestamp"].to_list()
        assert row["context_item_ids"] == before["item_id"].to_list()
        assert row["context_ratings"] == before["rating"].to_list()
        pairs = list(zip(row["context_item_ids"], row["context_ratings"], strict=True))
        liked = [i for i, x in pairs if x >= 3]
        hated = [i for i, x in pairs if x <= 2]
        assert len(liked) >= 3 or len(hated) >= 3
        assert row["liked_item_ids"] == liked[-4:]  # the most recent, capped
        assert row["hated_item_ids"] == hated[-2:]
        assert row["ground_truth_item_ids"] == after["item_id"].head(5).to_list()
        assert len(row["ground_truth_item_ids"]) == 5
        assert set(row["history_item_ids"]) >= set(row["context_item_ids"])
        assert not set(row["ground_truth_item_ids"]) & set(row["history_item_ids"])
        assert len(row["liked_titles"]) == len(row["liked_item_ids"])
        assert row["prompt"].startswith("I am a ")
        assert f"from 0213{row['user_id']}" in row["prompt"]  # no ZIP table: the ZIP itself
        assert "released before" in row["prompt"]


def test_titles_stay_whole_lists(ml100k_dir, tmp_path):
    data = load_ml100k(ml100k_dir)
    out = tmp_path / "direct"
    counts = prepare_direct(data, out, WindowConfig(seed=1, min_ground_truth=1))
    assert counts["windows"] == 6
    windows = pl.read_parquet(out / "windows.parquet")
    assert windows.schema["ground_truth_titles"] == pl.List(pl.Utf8)
    assert windows.schema["liked_titles"] == pl.List(pl.Utf8)
    every = (
        windows["ground_truth_titles"].explode().to_list()
        + windows["liked_titles"].explode().to_list()
        + windows["hated_titles"].explode().to_list()
    )
    # item 7 of the fixture is "American President, The (1995)": one element, never split
    assert any(t.startswith("American President, The (1995)") for t in every if t)
    assert "The (1995)" not in every
    items = pl.read_parquet(out / "items.parquet")
    assert items.columns == ["item_id", "title", "genres"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["window_config"]["seed"] == 1


def test_split_is_seeded_70_15_15():
    users = list(range(1, 101))
    split = split_users(users, WindowConfig(seed=5))
    sizes = {s: sum(v == s for v in split.values()) for s in ("train", "valid", "test")}
    assert sizes == {"train": 70, "valid": 15, "test": 15}
    assert split == split_users(list(reversed(users)), WindowConfig(seed=5))
    assert split != split_users(users, WindowConfig(seed=6))


def test_seed_and_windows_per_train_user(ml100k_dir):
    data = load_ml100k(ml100k_dir)
    a = build_windows(data, WindowConfig(seed=0))
    assert a.equals(build_windows(data, WindowConfig(seed=0)))
    assert not a.equals(build_windows(data, WindowConfig(seed=1)))
    many = build_windows(data, WindowConfig(seed=0, windows_per_train_user=3, min_ground_truth=1))
    per_user = many.group_by("user_id", "split").agg(pl.len(), pl.col("cutoff_ts").n_unique())
    for row in per_user.iter_rows(named=True):
        assert row["len"] == row["cutoff_ts"] == (3 if row["split"] == "train" else 1)
    test = select(many, "test")
    assert test["split"].unique().to_list() == ["test"]
    assert select(many, "train", max_users=2)["user_id"].n_unique() == 2


def test_zip_table(tmp_path, ml100k_dir):
    table = tmp_path / "zips.csv"
    table.write_text("zip,city,state\n02131,BOSTON,MA\n90210,Beverly Hills,CA\n")
    zips = load_zip_table(table)
    assert location_of("02131", zips) == "Boston, MA"
    assert location_of("T8H1N", zips) == "T8H1N"  # unknown: the code itself
    assert location_of(None, zips) is None
    windows = build_windows(load_ml100k(ml100k_dir), WindowConfig(), zips)
    row = windows.filter(pl.col("user_id") == 1).row(0, named=True)
    assert row["location"] == "Boston, MA" and "from Boston, MA" in row["prompt"]
    bad = tmp_path / "bad.csv"
    bad.write_text("code,town\n1,x\n")
    with pytest.raises(ValueError, match="zip, city, state"):
        load_zip_table(bad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k_min": 0}, "k_min"),
        ({"k_min": 11}, "k_min"),
        ({"min_ground_truth": 6}, "min_ground_truth"),
        ({"train_frac": 1.0}, "train_frac"),
        ({"valid_frac": 0.4}, "valid_frac"),
        ({"release_cutoff": "never"}, "release_cutoff"),
        ({"hate_max": 3}, "hate_max"),
    ],
)
def test_config_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WindowConfig(**kwargs)


def test_no_valid_window_is_an_error(ml100k_dir):
    data = load_ml100k(ml100k_dir)
    # the fixture's ratings cycle 1..5: ten liked (or hated) in a row never happen
    with pytest.raises(ValueError, match="no user has a valid window"):
        build_windows(data, WindowConfig(k_min=10))


def test_you_et_al_cutoffs_hand_worked():
    """You et al.'s rule: >= 5 ratings >= 4 or >= 5 ratings <= 2 up to and including the
    cut-off rating; ground truth strictly after its timestamp, at least one liked (>= 3)."""
    cfg = WindowConfig(you_et_al_exact=True, min_ground_truth=1)
    ts = np.array([1, 2, 3, 4, 5, 6, 6, 7, 8, 9])
    ratings = np.array([5, 4, 1, 4, 4, 2, 5, 3, 1, 1])
    # ratings >= 4 counted up to each index: 1 2 2 3 4 4 5 5 5 5 -> valid from index 6 (t=6);
    # t=6 starts at index 5 (the tie), so j=5; liked strictly after t=6: index 7 (3) -> valid.
    # t=7 (j=7): liked after: none (1, 1) -> not valid; t=8, t=9: none either.
    assert you_et_al_cutoffs(ts, ratings, cfg).tolist() == [5]
    # ratings <= 2 reach 5 only with more of them: five 1s then one liked rating
    assert you_et_al_cutoffs(np.arange(7), np.array([1, 1, 2, 1, 1, 3, 3]), cfg).tolist() == [4, 5]
    # the default rule on the same ratings (>= 3 liked (>= 3) or hated in the 10 before, here
    # >= 1 liked at or after): j=3 has 2 liked before; j=4, 5, 7 pass; j=8, 9 have no liked
    # from their cut-off on
    assert valid_cutoffs(ts, ratings, WindowConfig(min_ground_truth=1)).tolist() == [4, 5, 7]


def test_you_et_al_windows_and_prompt():
    """One user, written out: the window, its newest-first lists, the ground truth strictly
    after the cut-off and their prompt text with the "Do not repeat" line."""
    titles = {i: f"M{i} (199{i % 10})" for i in range(1, 13)}
    items = pl.DataFrame(
        {"item_id": list(titles), "title": list(titles.values()), "genres": [["Drama"]] * 12}
    )
    #            item: 1  2  3  4  5  6  7  8  9 10 11 12
    rating_list = [5, 4, 1, 4, 4, 2, 5, 3, 4, 1, 3, 5]
    stamps = [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10]
    ratings = pl.DataFrame(
        {"user_id": [1] * 12, "item_id": list(range(1, 13)), "rating": rating_list,
         "timestamp": stamps}
    )  # fmt: skip
    users = pl.DataFrame(
        {"user_id": [1], "gender": ["F"], "age": [30], "occupation": ["writer"], "zip": ["02139"]}
    )
    data = RatingData("ml-100k", users, items, ratings)
    cfg = WindowConfig(you_et_al_exact=True, min_ground_truth=1, train_frac=0.5, valid_frac=0.0)
    # valid cut-offs: t=6 (5th rating >= 4 is item 7 at t=6), t=7, t=8, t=9 (liked after t=9:
    # item 12); t=10 has nothing after it. Expected per cut-off, by hand:
    expected = {
        6: ([1, 2, 3, 4, 5], [5, 4, 2, 1], [3], [8, 9, 11, 12]),
        7: ([1, 2, 3, 4, 5, 6, 7], [7, 5, 4, 2, 1], [6, 3], [9, 11, 12]),
        8: ([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 5, 4, 2], [6, 3], [11, 12]),
        9: ([1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 5, 4], [6, 3], [12]),
    }
    seen = set()
    for seed in range(12):
        row = build_windows(data, replace(cfg, seed=seed)).row(0, named=True)
        context, liked, hated, truth = expected[row["cutoff_ts"]]
        assert row["context_item_ids"] == context
        assert row["liked_item_ids"] == liked and row["hated_item_ids"] == hated
        assert row["ground_truth_item_ids"] == truth
        assert row["history_item_ids"] == context
        seen.add(row["cutoff_ts"])
        prompt = row["prompt"]
        assert prompt.startswith("I am a female, aged 30, from 02139, working as writer.")
        assert f"liked the movies: ['{titles[liked[0]]} (drama)'" in prompt
        assert prompt.endswith(
            "Do not repeat the movies given in the prompt. Recommend movies based on the "
            "preference given. "
        )
    assert seen == set(expected)  # every valid cut-off can be drawn, no other
