from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from tasks.data.amazon_books import load_amazon_books
from tasks.data.datasets import load_dataset
from tasks.data.ml1m import load_ml1m
from tasks.data.ml100k import load_ml100k
from tasks.data.schema import DataError
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


# --------------------------------------------------------------------------- Amazon bad input


def test_amazon_truncated_gzip_names_file_and_line(amazon_dir: Path) -> None:
    raw = (amazon_dir / "Books.json").read_bytes()
    (amazon_dir / "Books.json").unlink()
    whole = gzip.compress(raw)
    (amazon_dir / "Books.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"Books\.json\.gz:\d+: gzip file is truncated") as err:
        load_amazon_books(amazon_dir, min_interactions=2)
    assert "\n" not in str(err.value)


def test_amazon_gz_name_but_not_gzip(amazon_dir: Path) -> None:
    (amazon_dir / "meta_Books.json").rename(amazon_dir / "meta_Books.json.gz")
    with pytest.raises(DataError, match=r"meta_Books\.json\.gz: named \.gz but is not a gzip"):
        load_amazon_books(amazon_dir, min_interactions=2)


def test_gzip_read_whatever_its_name(amazon_dir: Path) -> None:
    """A compressed file without the .gz suffix is read (by its magic bytes)."""
    raw = (amazon_dir / "Books.json").read_bytes()
    (amazon_dir / "Books.json").write_bytes(gzip.compress(raw))
    data = load_amazon_books(amazon_dir, min_interactions=2)
    assert data.ratings.height > 0


def _append_json(path: Path, obj: dict) -> int:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")
    return len(path.read_text().splitlines())


def test_amazon_integer_reviewer_id(amazon_dir: Path) -> None:
    n = _append_json(
        amazon_dir / "Books.json",
        {"reviewerID": 12345, "asin": "B0001", "overall": 4.0, "unixReviewTime": 5},
    )
    with pytest.raises(
        DataError, match=rf"Books\.json:{n}: 'reviewerID' must be a string, got int"
    ):
        load_amazon_books(amazon_dir, min_interactions=2)


def test_amazon_numeric_category(amazon_dir: Path) -> None:
    n = _append_json(amazon_dir / "meta_Books.json", {"asin": "B9999", "title": "T", "category": 7})
    with pytest.raises(DataError, match=rf"meta_Books\.json:{n}: 'category' must be a list"):
        load_amazon_books(amazon_dir, min_interactions=2)


def test_amazon_string_category_is_one_genre(amazon_dir: Path) -> None:
    meta = [json.loads(line) for line in (amazon_dir / "meta_Books.json").read_text().splitlines()]
    meta[0]["category"] = "Science Fiction"
    (amazon_dir / "meta_Books.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    data = load_amazon_books(amazon_dir, min_interactions=2)
    genres = data.items.filter(pl.col("source_id") == "B0001")["genres"][0].to_list()
    assert genres == ["Science Fiction"]


def test_amazon_null_reviewer_dropped_and_counted(amazon_dir: Path) -> None:
    for ts in (1, 2, 3):
        _append_json(
            amazon_dir / "Books.json",
            {"reviewerID": None, "asin": "B0001", "overall": 4.0, "unixReviewTime": ts},
        )
    data = load_amazon_books(amazon_dir, min_interactions=2)
    assert data.cleaning["null_reviewer_dropped"] == 3
    assert data.users["source_id"].null_count() == 0


def test_amazon_duplicate_review_keeps_latest(amazon_dir: Path) -> None:
    # U1 rated B0002 first in the fixture (rating 2); a later review of it changes to 5.
    _append_json(
        amazon_dir / "Books.json",
        {"reviewerID": "U1", "asin": "B0002", "overall": 5.0, "unixReviewTime": 990000000},
    )
    data = load_amazon_books(amazon_dir, min_interactions=2)
    assert data.cleaning["duplicate_ratings_merged"] == 1
    row = (
        data.ratings.join(data.users, on="user_id")
        .join(data.items, on="item_id", suffix="_item")
        .filter((pl.col("source_id") == "U1") & (pl.col("source_id_item") == "B0002"))
    )
    assert row.select("rating", "timestamp").rows() == [(5, 990000000)]


# --------------------------------------------------------------------------- duplicates


def test_ml100k_duplicate_keeps_latest_then_last_line(ml100k_dir: Path) -> None:
    with open(ml100k_dir / "u.data", "a") as fh:
        fh.write("1\t2\t5\t990000000\n")  # later than the fixture's (1, 2): wins
        fh.write("1\t2\t3\t990000000\n")  # same time, later line: wins
        fh.write("1\t2\t1\t100\n")  # earlier: loses
    data = load_ml100k(ml100k_dir)
    assert data.cleaning == {"duplicate_ratings_merged": 3}
    assert data.ratings.height == N_USERS * PER_USER
    row = data.ratings.filter((pl.col("user_id") == 1) & (pl.col("item_id") == 2))
    assert row.select("rating", "timestamp").rows() == [(3, 990000000)]


def test_ml1m_duplicate_keeps_latest(ml1m_dir: Path) -> None:
    lines = (ml1m_dir / "ratings.dat").read_text().splitlines()
    u, i, _, t = lines[0].split("::")
    lines.insert(0, f"{u}::{i}::5::{int(t) + 1}")  # earlier line, later time: it wins
    (ml1m_dir / "ratings.dat").write_text("\n".join(lines) + "\n")
    data = load_ml1m(ml1m_dir)
    assert data.cleaning["duplicate_ratings_merged"] == 1
    row = data.ratings.filter((pl.col("user_id") == int(u)) & (pl.col("item_id") == int(i)))
    assert row["rating"].to_list() == [5]


# --------------------------------------------------------------------------- encodings


def test_utf8_titles_are_not_garbled(ml1m_dir: Path, ml100k_dir: Path) -> None:
    movies = (ml1m_dir / "movies.dat").read_text("latin-1")
    (ml1m_dir / "movies.dat").write_text(movies.replace("Film 5 (1955)", "Amélie (2001)"), "utf-8")
    titles = load_ml1m(ml1m_dir).items["title"].to_list()
    assert "Amélie (2001)" in titles
    # the latin-1 lines of a mixed file still read right
    assert "Amélie, Le fabuleux destin d' (2001)" in titles
    items = (ml100k_dir / "u.item").read_text("latin-1").replace("Movie 3 (1953)", "Amélie (2001)")
    (ml100k_dir / "u.item").write_text(items, "utf-8")
    assert "Amélie (2001)" in load_ml100k(ml100k_dir).items["title"].to_list()


def test_bad_utf8_json_names_line(amazon_dir: Path) -> None:
    with open(amazon_dir / "Books.json", "ab") as fh:
        fh.write(b'{"reviewerID": "U\xe9"}\n')
    n = len((amazon_dir / "Books.json").read_bytes().splitlines())
    with pytest.raises(DataError, match=rf"Books\.json:{n}: not valid utf-8 text"):
        load_amazon_books(amazon_dir, min_interactions=2)


def test_corrupt_gzip_is_refused(amazon_dir: Path) -> None:
    raw = (amazon_dir / "meta_Books.json").read_bytes()
    whole = bytearray(gzip.compress(raw))
    whole[-8:-4] = b"\0\0\0\0"  # a wrong CRC
    (amazon_dir / "meta_Books.json").unlink()
    (amazon_dir / "meta_Books.json.gz").write_bytes(bytes(whole))
    with pytest.raises(DataError, match=r"meta_Books\.json\.gz: corrupt gzip data.*CRC check"):
        load_amazon_books(amazon_dir, min_interactions=2)
