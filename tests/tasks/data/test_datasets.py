from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.data.datasets import (
    DataError,
    load_amazon_books,
    load_dataset,
    load_ml1m,
    load_ml100k,
)
from tests.conftest import N_ITEMS, N_USERS, PER_USER


def test_ml100k_grouplens_schema_and_commas(ml100k_dir: Path) -> None:
    data = load_ml100k(ml100k_dir)
    assert data.users.height == N_USERS
    assert data.items.height == N_ITEMS
    assert data.ratings.height == N_USERS * PER_USER
    assert data.ratings.schema["rating"] == pl.Int8
    title = data.items.filter(pl.col("item_id") == 7)["title"][0]
    assert title == "American President, The (1995)"
    user = data.users.filter(pl.col("user_id") == 2).row(0, named=True)
    assert (user["age"], user["gender"], user["occupation"]) == (22, "M", "student")
    genres = data.items.filter(pl.col("item_id") == 1)["genres"][0].to_list()
    assert genres == ["Adventure"]


def test_ml1m_loader(ml1m_dir: Path) -> None:
    data = load_ml1m(ml1m_dir)
    assert data.ratings.height == N_USERS * PER_USER
    assert data.items.filter(pl.col("item_id") == 3)["title"][0].startswith("Amélie")
    assert data.items["genres"][0].to_list() == ["Comedy", "Romance"]
    # occupation codes become names
    occ = dict(zip(data.users["user_id"], data.users["occupation"], strict=True))
    assert occ[1] == "academic/educator" and occ[4] == "college/grad student"


def test_amazon_loader_filters_and_remaps(amazon_dir: Path) -> None:
    data = load_amazon_books(amazon_dir, min_interactions=2)
    assert "ULONE" not in data.users["source_id"].to_list()
    assert data.users["gender"].null_count() == data.users.height
    assert data.items["title"].str.contains(", Number").all()
    per_user = data.ratings.group_by("user_id").len()["len"]
    per_item = data.ratings.group_by("item_id").len()["len"]
    assert per_user.min() >= 2 and per_item.min() >= 2
    assert data.ratings["rating"].is_between(1, 5).all()


def test_amazon_no_user_left(amazon_dir: Path) -> None:
    with pytest.raises(DataError, match="no user left.*min_interactions"):
        load_amazon_books(amazon_dir, min_interactions=50)


def test_missing_file(ml100k_dir: Path) -> None:
    (ml100k_dir / "u.data").unlink()
    with pytest.raises(DataError, match=r"u\.data: file not found"):
        load_ml100k(ml100k_dir)


def test_malformed_line_names_file_and_line(ml100k_dir: Path) -> None:
    lines = (ml100k_dir / "u.data").read_text().splitlines()
    lines[4] = "1\t2\t3"
    (ml100k_dir / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"u\.data:5: expected 4 fields"):
        load_ml100k(ml100k_dir)


def test_rating_out_of_range(ml1m_dir: Path) -> None:
    lines = (ml1m_dir / "ratings.dat").read_text().splitlines()
    lines[9] = "1::2::7::880000000"
    (ml1m_dir / "ratings.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ratings\.dat:10: rating 7 is out of range"):
        load_ml1m(ml1m_dir)


def test_unknown_user(ml100k_dir: Path) -> None:
    with open(ml100k_dir / "u.data", "a") as fh:
        fh.write("999\t1\t4\t880000000\n")
    n = len((ml100k_dir / "u.data").read_text().splitlines())
    with pytest.raises(DataError, match=rf"u\.data:{n}: unknown user id 999"):
        load_ml100k(ml100k_dir)


def test_empty_file(ml1m_dir: Path) -> None:
    (ml1m_dir / "movies.dat").write_text("")
    with pytest.raises(DataError, match=r"movies\.dat: file is empty"):
        load_ml1m(ml1m_dir)


def test_malformed_json(amazon_dir: Path) -> None:
    with open(amazon_dir / "Books.json", "a") as fh:
        fh.write("{not json\n")
    n = len((amazon_dir / "Books.json").read_text().splitlines())
    with pytest.raises(DataError, match=rf"Books\.json:{n}: malformed JSON"):
        load_amazon_books(amazon_dir, min_interactions=2)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'ml-20m'"):
        load_dataset("ml-20m", None)
