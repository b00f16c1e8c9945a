"""The ``kar`` Amazon-Books build (KAR's preprocess_amz.py) on hand-made Books_5 files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from tasks.data.amazon_books import (
    AmazonConfig,
    kar_clean_text,
    load_amazon_books,
    load_amazon_books_kar,
)
from tasks.data.datasets import load_dataset
from tasks.data.lists import ListsConfig
from tasks.data.prepare import load_prepared, main, prepare
from tasks.data.schema import DataError

# Thresholds scaled down for the small fixture: users >= 3, items >= 2 review lines.
SMALL = AmazonConfig(build="kar", user_core=3, item_core=2)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _review(user: str | None, asin: str, rating: float, ts: int) -> dict:
    return {"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": ts}


@pytest.fixture
def books5_dir(tmp_path: Path) -> Path:
    """17 review lines, 6 users, 6 items; worked through by hand for users >= 3, items >= 2:

    pass 1 counts: A 4, B 3, C 3, D 2, E 3 (two of them the same item), i1 5, i2 4, i3 2, i4 1,
    i5 2, i6 1 -> D, i4 and i6 go; pass 2: i5 has C only -> goes; pass 3: C has 2 -> goes.
    Core: A, B, E x i1, i2, i3 (9 lines). i3's only metadata record is KAR's skipped
    "EMINEM SHOW": its 2 ratings go, leaving A and B with 2 ratings each (no second filter).
    E's two reviews of i1 merge into the later one: 6 ratings of 3 users and 2 items.
    """
    d = tmp_path / "amz"
    d.mkdir()
    reviews = [
        _review("A", "i1", 5.0, 100),
        _review("A", "i2", 4.0, 101),
        _review("A", "i3", 5.0, 102),
        _review("A", "i4", 3.0, 103),
        _review("B", "i1", 5.0, 200),
        _review("B", "i2", 5.0, 201),
        _review("B", "i3", 2.0, 202),
        _review("C", "i1", 4.0, 300),
        _review("C", "i2", 5.0, 301),
        _review("C", "i5", 5.0, 302),
        _review("D", "i5", 5.0, 400),
        _review("D", "i6", 1.0, 401),
        _review("E", "i1", 3.0, 500),
        _review("E", "i1", 5.0, 501),
        _review("E", "i2", 4.0, 502),
        {"reviewerID": "F", "asin": "i1", "unixReviewTime": 600},  # no 'overall': dropped
        _review(None, "i2", 5.0, 700),  # null reviewer: dropped
    ]
    (d / "Books_5.json.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in reviews).encode())
    )
    meta = [
        {
            "asin": "i1",
            "title": "Harry Potter &amp; the \u201cStone\u201d",
            "category": ["Books", " Literature & Fiction ", "Genre Fiction"],
            "brand": "J. K. Rowling",
        },
        {"asin": "i2", "title": "Old Title", "category": ["Books", "History"], "brand": "X Y Z"},
        # a repeated asin keeps its last record, as KAR's dict does
        {"asin": "i2", "title": "Am\u00e9lie", "category": ["Books"], "brand": ""},
        {"asin": "i3", "title": "EMINEM SHOW", "category": ["Books", "Music"], "brand": "Em"},
        {"asin": "i9", "title": "Not in the core", "brand": 7},  # never looked at
    ]
    (d / "meta_Books.json.gz").write_bytes(
        gzip.compress("".join(json.dumps(m) + "\n" for m in meta).encode())
    )
    return d


def test_kar_defaults_are_kars() -> None:
    cfg = AmazonConfig(build="kar")
    assert (cfg.user_core, cfg.item_core) == (60, 40)
    assert AmazonConfig().build == "kcore"  # the generic k-core stays the default


def test_kar_filter_counts_by_hand(books5_dir: Path) -> None:
    data = load_amazon_books_kar(books5_dir, SMALL)
    assert data.users["source_id"].to_list() == ["A", "B", "E"]
    assert data.items["source_id"].to_list() == ["i1", "i2"]
    assert data.ratings.height == 6
    assert data.cleaning["reviews_without_rating_dropped"] == 1
    assert data.cleaning["null_reviewer_dropped"] == 1
    assert data.cleaning["reviews_without_metadata"] == 2
    assert data.cleaning["duplicate_ratings_merged"] == 1
    # A and B keep 2 ratings each, under the user threshold: KAR filters once, before metadata
    per_user = data.ratings.group_by("user_id").len().sort("user_id")["len"].to_list()
    assert per_user == [2, 2, 2]
    e_i1 = data.ratings.filter((pl.col("user_id") == 3) & (pl.col("item_id") == 1))
    assert e_i1.select("rating", "timestamp").rows() == [(5, 501)]
    # ratings stay in file order
    assert data.ratings["timestamp"].to_list() == [100, 101, 200, 201, 501, 502]


def test_kar_item_attributes(books5_dir: Path) -> None:
    items = load_amazon_books_kar(books5_dir, SMALL).items
    assert items.columns == ["item_id", "title", "genres", "source_id", "brand"]
    assert items["title"].to_list() == ['Harry Potter & the "Stone"', "Am\u00e9lie"]
    # second-level category (stripped); "unknown category" without one
    assert items["genres"].to_list() == [["Literature & Fiction"], ["unknown category"]]
    # an empty brand is one KAR's cleaning flags
    assert items["brand"].to_list() == ["J. K. Rowling", "unknown brand"]


def test_kar_filter_repeats_until_it_holds(books5_dir: Path) -> None:
    # C has 3 lines and would pass one filter of the raw counts; it goes only once i5 (2 lines,
    # one of them D's) has gone. With items >= 1, i5 stays and so does C.
    assert load_amazon_books_kar(books5_dir, AmazonConfig("kar", 3, 1)).users[
        "source_id"
    ].to_list() == ["A", "B", "C", "E"]
    assert "C" not in load_amazon_books_kar(books5_dir, SMALL).users["source_id"].to_list()


def test_kar_uncompressed_names_are_accepted(books5_dir: Path) -> None:
    for name in ("Books_5.json", "meta_Books.json"):
        raw = gzip.decompress((books5_dir / f"{name}.gz").read_bytes())
        (books5_dir / f"{name}.gz").unlink()
        (books5_dir / name).write_bytes(raw)
    assert load_amazon_books_kar(books5_dir, SMALL).ratings.height == 6


def test_kar_missing_reviews_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Books_5\.json\.gz: file not found"):
        load_amazon_books_kar(tmp_path, SMALL)


def test_kar_bad_line_is_named(books5_dir: Path) -> None:
    raw = gzip.decompress((books5_dir / "Books_5.json.gz").read_bytes()) + b'{"reviewerID": "Q",\n'
    (books5_dir / "Books_5.json.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"Books_5\.json\.gz:18: malformed JSON"):
        load_amazon_books_kar(books5_dir, SMALL)


def test_kar_bad_brand_of_a_core_item_is_named(books5_dir: Path) -> None:
    meta = gzip.decompress((books5_dir / "meta_Books.json.gz").read_bytes())
    meta += b'{"asin": "i1", "title": "T", "brand": ["a"]}\n'
    (books5_dir / "meta_Books.json.gz").write_bytes(gzip.compress(meta))
    with pytest.raises(DataError, match=r"meta_Books\.json\.gz:6: 'brand' must be a string"):
        load_amazon_books_kar(books5_dir, SMALL)


def test_kar_nothing_left_is_one_line(books5_dir: Path) -> None:
    with pytest.raises(DataError, match=r"at least 60 and items with at least 40"):
        load_amazon_books_kar(books5_dir, AmazonConfig(build="kar"))


def test_amazon_config_refuses_bad_values() -> None:
    with pytest.raises(DataError, match=r"unknown amazon build 'paper'"):
        AmazonConfig(build="paper")
    with pytest.raises(DataError, match=r"amazon item_core must be >= 1, got 0"):
        AmazonConfig(build="kar", item_core=0)


def test_load_dataset_dispatches_on_the_build(books5_dir: Path, amazon_dir: Path) -> None:
    kar = load_dataset("amazon-books", books5_dir, amazon=SMALL)
    assert kar.ratings.height == 6
    generic = load_dataset("amazon-books", amazon_dir, min_interactions=2)
    assert generic.ratings.height == load_amazon_books(amazon_dir, 2).ratings.height
    assert "brand" not in generic.items.columns


def test_kar_clean_text_is_kars() -> None:
    assert kar_clean_text("A  &amp;  B \u2014 C\u2019s") == "A & B - C's"
    assert kar_clean_text("Am\u00e9lie") is None  # outside printable ASCII: KAR's flag
    assert kar_clean_text("Am\u00e9lie", strict=False) == "Am\u00e9lie"
    assert kar_clean_text("1984") is None  # no letter
    assert kar_clean_text("It") is None  # under 3 characters
    long = "word " * 40  # 200 characters: cut at 150, then at the last whole word
    assert kar_clean_text(long) == " ".join(["word"] * 29)


# --------------------------------------------------------------------------- default thresholds

N_USERS, N_ITEMS, PER_USER = 50, 70, 60


@pytest.fixture
def books5_60_40(tmp_path: Path) -> Path:
    """The real thresholds, worked by hand.

    Users u0..u49 rate items (u + k) % 70 for k = 0..59 (60 each, rating 5 when k % 3 == 0,
    else 4). Item j is rated by the 50 users less those u in {j+1, ..., j+10} (mod 70) below
    50: 40 to 50 users, exactly 40 for j = 0..39 and 69. Besides: "ushort" rates 58 of them and
    item X (59: goes in pass 1); X is also rated by u0..u38 (40 at first, 39 once ushort goes:
    goes in pass 2); Y is rated by u0..u38 (39: goes in pass 1). Left: 50 users x 60 = 3,000
    ratings of 70 items.
    """
    d = tmp_path / "amz60"
    d.mkdir()
    reviews = []
    for u in range(N_USERS):
        for k in range(PER_USER):
            rating = 5.0 if k % 3 == 0 else 4.0
            reviews.append(_review(f"u{u:02d}", f"b{(u + k) % N_ITEMS:02d}", rating, 1000 * u + k))
    for u in range(39):
        reviews.append(_review(f"u{u:02d}", "X", 5.0, 10**6 + u))
        reviews.append(_review(f"u{u:02d}", "Y", 5.0, 10**6 + u))
    for k in range(58):
        reviews.append(_review("ushort", f"b{k:02d}", 5.0, 2 * 10**6 + k))
    reviews.append(_review("ushort", "X", 5.0, 3 * 10**6))
    _write(d / "Books_5.json", reviews)
    asins = [f"b{j:02d}" for j in range(N_ITEMS)] + ["X", "Y"]
    _write(
        d / "meta_Books.json",
        [
            {"asin": a, "title": f"Book {a}", "category": ["Books", "Fiction"], "brand": "Pub"}
            for a in asins
        ],
    )
    return d


def test_kar_default_thresholds_by_hand(books5_60_40: Path) -> None:
    data = load_amazon_books_kar(books5_60_40)
    assert (data.users.height, data.items.height, data.ratings.height) == (50, 70, 3000)
    assert "ushort" not in data.users["source_id"].to_list()
    assert {"X", "Y"}.isdisjoint(data.items["source_id"].to_list())
    per_item = data.ratings.group_by("item_id").len()["len"]
    assert (per_item.min(), per_item.max()) == (40, 50)


def test_prepare_kar_takes_kars_task_settings(books5_60_40: Path, tmp_path: Path) -> None:
    # history min((60 + 1) // 2, 15) = 15 (30 without the cap); (60 - 15) // 4 = 11 lists each;
    # the list items are k = 15..58, of which k % 3 == 0 (rating 5, label > 4) are 15 per user
    counts = prepare("amazon-books", tmp_path / "run", books5_60_40, amazon=AmazonConfig("kar"))
    data = load_prepared(tmp_path / "run")
    assert (counts["users"], counts["items"], counts["ratings"]) == (50, 70, 3000)
    assert counts["history_ratings"] == 50 * 15
    assert counts["lists"] == 50 * 11
    assert int(data.lists["labels"].list.sum().sum()) == 50 * 15
    assert data.meta["task"]["history_cap"] == 15
    assert data.meta["task"]["positive_above"] == 4
    assert data.meta["amazon"] == {"build": "kar", "user_core": 60, "item_core": 40}
    assert "brand" in data.items.columns


def test_prepare_kar_with_a_given_task_config_keeps_it(books5_60_40: Path, tmp_path: Path) -> None:
    # an explicit ListsConfig is used as given: history 30, (60 - 30) // 4 = 7 lists, label > 3
    cfg = ListsConfig()
    counts = prepare("amazon-books", tmp_path / "r", books5_60_40, cfg, amazon=AmazonConfig("kar"))
    assert (counts["history_ratings"], counts["lists"]) == (50 * 30, 50 * 7)
    labels = load_prepared(tmp_path / "r").lists["labels"].list.sum().sum()
    assert labels == 50 * 28  # every rated list item (4 or 5 stars) is positive


def test_cli_amazon_build_kar(
    books5_60_40: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["prepare", "--dataset", "amazon-books", "--amazon-build", "kar",
               "--data-dir", str(books5_60_40), "--out", str(tmp_path / "r")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "users             50 (50 with lists)" in out
    assert "ratings           3,000 (750 in histories)" in out
    meta = load_prepared(tmp_path / "r").meta
    assert (meta["task"]["history_cap"], meta["task"]["positive_above"]) == (15, 4)


def test_cli_default_build_is_the_kcore(amazon_dir: Path, tmp_path: Path) -> None:
    assert main(["prepare", "--dataset", "amazon-books", "--data-dir", str(amazon_dir),
                 "--out", str(tmp_path / "r"), "--test-frac", "0.34",
                 "--min-interactions", "2"]) == 0  # fmt: skip
    meta = load_prepared(tmp_path / "r").meta
    assert meta["amazon"]["build"] == "kcore"
    assert (meta["task"]["history_cap"], meta["task"]["positive_above"]) == (30, 3)


# --------------------------------------------------------------------------- flows.iterate


def test_paper_profile_builds_amazon_books_the_kar_way() -> None:
    from flows.iterate import IterateParams, LoopConfig

    paper = LoopConfig.of(IterateParams(profile="paper", dataset="amazon-books").resolved())
    assert paper.amazon == AmazonConfig(build="kar", user_core=60, item_core=40)
    assert (paper.lists.history_cap, paper.lists.positive_above) == (15, 4)
    quick = LoopConfig.of(IterateParams(profile="quick", dataset="amazon-books").resolved())
    assert quick.amazon == AmazonConfig(build="kcore")
    assert (quick.lists.history_cap, quick.lists.positive_above) == (30, 3)
    movies = LoopConfig.of(IterateParams(profile="paper", dataset="ml-1m").resolved())
    assert movies.amazon is None
    assert (movies.lists.history_cap, movies.lists.positive_above) == (30, 3)


def test_stages_prepare_and_prompt_the_kar_build(books5_60_40: Path, tmp_path: Path) -> None:
    from tasks.common.stage import InputRef
    from tasks.rlrf4rec import stages
    from tasks.rlrf4rec.book_prompts import KAR_BOOK_USER_HEAD

    lists = ListsConfig(history_cap=15, positive_above=4)
    data = stages.prepare_data.stage_fn(
        "amazon-books",
        data_dir=InputRef.of(books5_60_40),
        lists=lists,
        max_users=None,
        amazon=AmazonConfig("kar"),
        out=tmp_path / "run" / "data",
    )
    assert (data.stats["users"], data.stats["lists"]) == (50, 550)
    prompts = stages.build_prompts.stage_fn(data, "amazon-books", out=tmp_path / "run" / "p.pq")
    table = pl.read_parquet(prompts.path)
    assert table.height == 50
    # u00's history: its first 15 ratings, items b00..b14, 5 stars when k % 3 == 0
    first = table.filter(pl.col("user_id") == 1)["prefix"][0]
    assert first.startswith(KAR_BOOK_USER_HEAD + '"Book b00", 5 stars; "Book b01", 4 stars; ')
    assert first.endswith('"Book b14", 4 stars')
    assert first.count(" stars") == 15
