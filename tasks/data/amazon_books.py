"""Amazon-Books (the 2018 release's reviews and metadata, JSON lines, optionally gzip) in the
normalised schema (:mod:`tasks.data.schema`), built one of two ways (:class:`AmazonConfig`):

- ``kcore`` (the default, :func:`load_amazon_books`): ``Books.json`` filtered to a
  ``min_interactions`` k-core of the reviews of items with a title;
- ``kar`` (:func:`load_amazon_books_kar`): as KAR's ``preprocess/preprocess_amz.py`` builds it,
  ``Books_5.json.gz`` with users of 60 and items of 40 ratings, brand and second-level category.

There are no user features.
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tasks.data.reading import data_lines, parse_int, parse_rating
from tasks.data.schema import CLEANING, ITEM_SCHEMA, DataError, RatingData

# The files each build reads, each as the names it accepts (the first one found is read).
KCORE_REVIEWS = ("Books.json", "Books.json.gz", "Books.jsonl")
KCORE_META = ("meta_Books.json", "meta_Books.json.gz", "meta_Books.jsonl")
KAR_REVIEWS = ("Books_5.json.gz", "Books_5.json")
KAR_META = ("meta_Books.json.gz", "meta_Books.json")


def needed_files(build: str) -> tuple[tuple[str, ...], ...]:
    """The files the ``build`` reads, in reading order, each as the names it accepts."""
    return (KAR_REVIEWS, KAR_META) if build == "kar" else (KCORE_META, KCORE_REVIEWS)


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return folder / names[0]


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in data_lines(path, "utf-8"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, obj


def _categories(path: Path, lineno: int, value: object) -> list[str]:
    """The genres of one metadata record: its ``category`` strings, less "Books".

    ``category`` is a list of strings in the 2018 release; a single string is one category,
    null or missing is none; anything else is refused.
    """
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(c, str) for c in values):
        raise DataError(
            f"{path}:{lineno}: 'category' must be a list of strings, got {json.dumps(value)[:60]}"
        )
    genres = [" ".join(c.split()) for c in values]
    return [c for c in genres if c and c != "Books"]


def _review_str(path: Path, lineno: int, obj: dict, key: str) -> str | None:
    value = obj[key]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__} "
            f"{json.dumps(value)[:40]}"
        )
    return value


def load_amazon_books(folder: str | Path, min_interactions: int = 5) -> RatingData:
    """Load the 2018 Amazon "Books" reviews and metadata (JSON lines, optionally .gz).

    Reviews: ``Books.json`` (``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``).
    Metadata: ``meta_Books.json`` (``asin``, ``title``, ``category``: a list of strings, or
    one string). Users and items are filtered to at least ``min_interactions`` ratings each,
    repeatedly until both hold (a k-core); only items with a title in the metadata are kept.
    Duplicate (user, item) reviews keep the latest (a tie: the later line). A review whose
    ``reviewerID`` is null or empty is dropped; the drops are counted in ``cleaning``. There
    are no user features.
    """
    folder = Path(folder)
    meta_path = _find(folder, KCORE_META)
    titles: dict[str, tuple[str, list[str]]] = {}
    for lineno, obj in _json_lines(meta_path):
        asin = obj.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataError(f"{meta_path}:{lineno}: missing 'asin' (a non-empty string)")
        genres = _categories(meta_path, lineno, obj.get("category"))
        title = obj.get("title")
        if not isinstance(title, str) or not title.strip():
            continue
        titles.setdefault(asin, (" ".join(title.split()), genres))
    reviews_path = _find(folder, KCORE_REVIEWS)
    rows: dict[tuple[str, str], tuple[int, int]] = {}
    cleaning = dict.fromkeys(CLEANING, 0)
    for lineno, obj in _json_lines(reviews_path):
        try:
            user = _review_str(reviews_path, lineno, obj, "reviewerID")
            asin = _review_str(reviews_path, lineno, obj, "asin")
            rating_raw, ts_raw = obj["overall"], obj["unixReviewTime"]
        except KeyError as exc:
            raise DataError(f"{reviews_path}:{lineno}: missing field {exc.args[0]!r}") from None
        if asin is None:
            raise DataError(f"{reviews_path}:{lineno}: 'asin' is null or empty")
        rating = parse_rating(reviews_path, lineno, str(rating_raw))
        ts = parse_int(reviews_path, lineno, str(ts_raw), "unixReviewTime")
        if user is None:
            cleaning["null_reviewer_dropped"] += 1
        elif asin not in titles:
            cleaning["reviews_without_metadata"] += 1
        else:
            seen = rows.get((user, asin))
            if seen is not None:
                cleaning["duplicate_ratings_merged"] += 1
            if seen is None or ts >= seen[1]:
                rows[(user, asin)] = (rating, ts)
    frame = pl.DataFrame(
        {
            "user": [k[0] for k in rows],
            "asin": [k[1] for k in rows],
            "rating": [v[0] for v in rows.values()],
            "timestamp": [v[1] for v in rows.values()],
        },
        schema={"user": pl.Utf8, "asin": pl.Utf8, "rating": pl.Int8, "timestamp": pl.Int64},
    )
    frame = k_core(frame, "user", "asin", min_interactions)
    if frame.height == 0:
        raise DataError(
            f"{reviews_path}: no user left after filtering to users and items with at least "
            f"{min_interactions} interactions (min_interactions)"
        )
    users, item_ids, ratings = _amazon_ids(frame)
    items = item_ids.select(
        pl.col("item_id").cast(pl.Int64),
        pl.col("asin").map_elements(lambda a: titles[a][0], return_dtype=pl.Utf8).alias("title"),
        pl.col("asin")
        .map_elements(lambda a: titles[a][1], return_dtype=pl.List(pl.Utf8))
        .alias("genres"),
        pl.col("asin").alias("source_id"),
    )
    return RatingData("amazon-books", users, items, ratings, cleaning)


def _amazon_ids(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Integer ids for the ``user`` and ``asin`` strings of ``frame`` (in sorted order, from 1):
    the users frame (no profile), the ``asin -> item_id`` table and the ratings frame."""
    user_ids = frame.select(pl.col("user").unique().sort()).with_row_index("user_id", offset=1)
    item_ids = frame.select(pl.col("asin").unique().sort()).with_row_index("item_id", offset=1)
    ratings = (
        frame.join(user_ids, on="user", maintain_order="left")
        .join(item_ids, on="asin", maintain_order="left")
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            "rating",
            "timestamp",
        )
    )
    users = user_ids.select(
        pl.col("user_id").cast(pl.Int64),
        pl.lit(None, pl.Utf8).alias("gender"),
        pl.lit(None, pl.Int64).alias("age"),
        pl.lit(None, pl.Utf8).alias("occupation"),
        pl.lit(None, pl.Utf8).alias("zip"),
        pl.col("user").alias("source_id"),
    )
    return users, item_ids, ratings


def k_core(
    frame: pl.DataFrame, user_col: str, item_col: str, k: int, item_k: int | None = None
) -> pl.DataFrame:
    """Keep rows whose user has at least ``k`` rows and whose item at least ``item_k`` (default
    ``k``), repeatedly until it holds for all (the unique largest such subset)."""
    item_k = k if item_k is None else item_k
    while True:
        before = frame.height
        frame = frame.filter((pl.len().over(user_col) >= k) & (pl.len().over(item_col) >= item_k))
        if frame.height == before:
            return frame


# --------------------------------------------------------------------------- the kar build

AMAZON_BUILDS = ("kcore", "kar")
KAR_USER_CORE = 60  # preprocess_amz.py: user_core
KAR_ITEM_CORE = 40  # preprocess_amz.py: item_core
KAR_UNKNOWN_BRAND = "unknown brand"
KAR_UNKNOWN_CATEGORY = "unknown category"


@dataclass(frozen=True)
class AmazonConfig:
    """How Amazon-Books is built.

    - ``kcore`` (the default): :func:`load_amazon_books`, ``Books.json`` filtered to a
      ``min_interactions`` k-core of the reviews of items with a title.
    - ``kar``: :func:`load_amazon_books_kar`, as KAR's ``preprocess/preprocess_amz.py`` builds
      it: ``Books_5.json.gz``, users with at least ``user_core`` and items with at least
      ``item_core`` ratings (60 and 40, KAR's), brand and second-level category.
    """

    build: str = "kcore"
    user_core: int = KAR_USER_CORE
    item_core: int = KAR_ITEM_CORE

    def __post_init__(self) -> None:
        if self.build not in AMAZON_BUILDS:
            raise DataError(
                f"unknown amazon build {self.build!r}; choose one of {', '.join(AMAZON_BUILDS)}"
            )
        for name in ("user_core", "item_core"):
            if getattr(self, name) < 1:
                raise DataError(f"amazon {name} must be >= 1, got {getattr(self, name)}")


# KAR's filter_title / convert_brand (preprocess_amz.py), in its order.
_KAR_REPLACE = (
    ("\u201c", '"'), ("\u201d", '"'), ("\u2018", "'"), ("\u2019", "'"), ("\u2013", "-"),
    ("\n", " "), ("\r", " "), ("\u2026", ""), ("\u201a", ","), ("\u00b4", "'"),
    ("&ndash;", "-"), ("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"), ("&quot;", '"'),
    ("&nbsp;", " "), ("&copy;", "\u00a9"), ("\u2033", '"'), ("\u3010", "["), ("\u3011", "]"),
    ("\u2014", "-"), ("\u2212", "-"),
)  # fmt: skip
_KAR_BLANKED = (
    127, 174, 160, 170, 8482, 188, 162, 189, 8594, 169, 235, 168, 957, 12288, 8222, 179, 190,
    173, 186, 8225,
)  # fmt: skip
_KAR_ALLOWED = frozenset(
    string.ascii_letters + string.digits + string.punctuation + " \t\n\r\x0b\x0c"
)
_KAR_KEEP_END = frozenset(string.ascii_letters + string.digits)


def kar_clean_text(text: str, strict: bool = True) -> str | None:
    """KAR's ``filter_title``: unescape HTML, normalise quotes and dashes, blank a few symbols,
    collapse spaces, and cut a text over 150 characters at its last whole word.

    With ``strict`` a text KAR flags for deletion (a character outside printable ASCII, no
    letter, or under 3 characters) gives None; without it the text is kept as cleaned.
    """
    x = html.unescape(text)
    for old, new in _KAR_REPLACE:
        x = x.replace(old, new)
    for code in _KAR_BLANKED:
        x = x.replace(chr(code), " ")
    while "  " in x:
        x = x.replace("  ", " ")
    x = x.strip()
    if strict and (
        any(c not in _KAR_ALLOWED for c in x)
        or not any(c in string.ascii_letters for c in x)
        or len(x) < 3
    ):
        return None
    if len(x) > 150:
        cut = " ".join(x[:150].strip().split(" ")[:-1])
        while cut and cut[-1] not in _KAR_KEEP_END:
            cut = cut[:-1]
        x = cut or x[:150]  # KAR fails on a 150-character word; keep the cut text
    return x


def _kar_brand(path: Path, lineno: int, value: object) -> str:
    """KAR's ``convert_brand``: the cleaned brand, ``unknown brand`` when KAR flags it."""
    if value is None:
        return KAR_UNKNOWN_BRAND
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: 'brand' must be a string, got {json.dumps(value)[:60]}")
    brand = kar_clean_text(value)
    return KAR_UNKNOWN_BRAND if brand is None or "abcdefg" in brand else brand


def _kar_category(path: Path, lineno: int, value: object) -> str:
    """KAR's ``convert_category``: the second entry of ``category`` (the first under "Books")."""
    if not isinstance(value, list) or len(value) < 2:
        return KAR_UNKNOWN_CATEGORY
    if not isinstance(value[1], str):
        raise DataError(
            f"{path}:{lineno}: 'category' must be a list of strings, got {json.dumps(value)[:60]}"
        )
    return value[1].strip()


def load_amazon_books_kar(folder: str | Path, cfg: AmazonConfig | None = None) -> RatingData:
    """Load Amazon-Books as KAR's ``preprocess_amz.py`` builds it.

    1. Reviews from ``Books_5.json.gz`` (or ``Books_5.json``); a review without ``overall`` is
       dropped (counted), one with a null or empty ``reviewerID`` too.
    2. Users with at least ``cfg.user_core`` and items with at least ``cfg.item_core`` reviews,
       repeatedly until both hold, counting every review line (KAR keeps repeated reviews of an
       item by one user; so does this count).
    3. Then, without filtering again, the ratings of items with no record in
       ``meta_Books.json.gz`` (or ``meta_Books.json``) are dropped (counted); a repeated
       ``asin`` keeps its last record, as KAR's dict does.
    4. Repeated (user, item) reviews keep the latest (a tie: the later line), counted.

    Items carry ``title`` (KAR's cleaning, :func:`kar_clean_text`), ``genres`` = [the
    second-level category] (``unknown category`` when there is none) and ``brand``
    (``unknown brand`` when missing or flagged by KAR's cleaning).
    """
    cfg = cfg or AmazonConfig(build="kar")
    folder = Path(folder)
    reviews_path = _find(folder, KAR_REVIEWS)
    cleaning = dict.fromkeys(CLEANING, 0)
    cols: dict[str, list] = {"user": [], "asin": [], "rating": [], "timestamp": []}
    for lineno, obj in _json_lines(reviews_path):
        try:
            user = _review_str(reviews_path, lineno, obj, "reviewerID")
            asin = _review_str(reviews_path, lineno, obj, "asin")
            ts_raw = obj["unixReviewTime"]
        except KeyError as exc:
            raise DataError(f"{reviews_path}:{lineno}: missing field {exc.args[0]!r}") from None
        if asin is None:
            raise DataError(f"{reviews_path}:{lineno}: 'asin' is null or empty")
        if "overall" not in obj:
            cleaning["reviews_without_rating_dropped"] += 1
            continue
        rating = parse_rating(reviews_path, lineno, str(obj["overall"]))
        ts = parse_int(reviews_path, lineno, str(ts_raw), "unixReviewTime")
        if user is None:
            cleaning["null_reviewer_dropped"] += 1
            continue
        cols["user"].append(user)
        cols["asin"].append(asin)
        cols["rating"].append(rating)
        cols["timestamp"].append(ts)
    frame = pl.DataFrame(
        cols,
        schema={"user": pl.Utf8, "asin": pl.Utf8, "rating": pl.Int8, "timestamp": pl.Int64},
    ).with_row_index("_line")
    frame = k_core(frame, "user", "asin", cfg.user_core, cfg.item_core)
    if frame.height == 0:
        raise DataError(
            f"{reviews_path}: no user left after filtering to users with at least "
            f"{cfg.user_core} and items with at least {cfg.item_core} ratings"
        )
    kept = set(frame["asin"].unique().to_list())
    meta_path = _find(folder, KAR_META)
    meta: dict[str, tuple[str, str, str]] = {}
    for lineno, obj in _json_lines(meta_path):
        asin = obj.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataError(f"{meta_path}:{lineno}: missing 'asin' (a non-empty string)")
        if asin not in kept:
            continue
        title = obj.get("title")
        if not isinstance(title, str) or not title.strip():
            continue  # KAR fails on a record without a title; here it is no metadata
        clean = kar_clean_text(title, strict=False) or ""
        if clean == "EMINEM SHOW":  # KAR skips this one record by name
            continue
        brand = _kar_brand(meta_path, lineno, obj.get("brand"))
        meta[asin] = (clean, _kar_category(meta_path, lineno, obj.get("category")), brand)
    with_meta = frame.filter(pl.col("asin").is_in(list(meta)))
    cleaning["reviews_without_metadata"] = frame.height - with_meta.height
    if with_meta.height == 0:
        raise DataError(f"{meta_path}: none of the {len(kept)} items left has a metadata record")
    merged = (
        with_meta.sort("timestamp", "_line")
        .unique(["user", "asin"], keep="last")
        .sort("_line")
        .drop("_line")
    )
    cleaning["duplicate_ratings_merged"] = with_meta.height - merged.height
    users, item_ids, ratings = _amazon_ids(merged)
    asins = item_ids["asin"].to_list()
    items = pl.DataFrame(
        {
            "item_id": item_ids["item_id"].cast(pl.Int64),
            "title": [meta[a][0] for a in asins],
            "genres": [[meta[a][1]] for a in asins],
            "source_id": asins,
            "brand": [meta[a][2] for a in asins],
        },
        schema={**ITEM_SCHEMA, "brand": pl.Utf8},
    )
    return RatingData("amazon-books", users, items, ratings, cleaning)
