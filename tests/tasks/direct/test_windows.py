"""Window selection, ground truth, split and prompt of the second pipeline (You et al., 3.1)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tasks.data.datasets import load_ml100k
from tasks.direct.windows import (
    WindowConfig,
    build_windows,
    load_zip_table,
    location_of,
    prepare_direct,
    select,
    split_users,
    valid_cutoffs,
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
