"""Loaders for MovieLens-100K, MovieLens-1M and Amazon-Books into one normalised schema.

Every loader returns a :class:`RatingData` with three polars frames:

- ``users``: ``user_id`` (Int64), ``gender`` (Utf8, null when unknown), ``age`` (Int64; the raw
  age for ML-100K, the age-bucket code for ML-1M, null for Amazon), ``occupation`` (Utf8),
  ``zip`` (Utf8), ``source_id`` (Utf8: the id in the source files).
- ``items``: ``item_id`` (Int64), ``title`` (Utf8, with the year where known, commas kept:
  "American President, The (1995)"), ``genres`` (List[Utf8]), ``source_id`` (Utf8).
- ``ratings``: ``user_id``, ``item_id`` (Int64), ``rating`` (Int8, 1..5), ``timestamp``
  (Int64, seconds), in file order.

Every loader keeps one rating per (user, item): the latest by timestamp, a tie going to the
later line; how many were merged is in ``RatingData.cleaning`` (with anything else dropped on
the way, see :data:`CLEANING`), which the prepare summary prints and ``meta.json`` records.
GroupLens text is read line by line as UTF-8 where valid, else latin-1, so titles come out
right from the original latin-1 files and from UTF-8 copies alike. Files may be gzip-compressed.

Bad input raises :class:`DataError` whose message names the file and the line.
"""

from __future__ import annotations

import gzip
import html
import json
import string
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import polars as pl

DATASETS = ("ml-100k", "ml-1m", "amazon-books")

# ML-100K genre flags, in u.item column order (u.genre).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip

# ML-1M occupation codes (README of the GroupLens ML-1M release).
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip

USER_SCHEMA = {
    "user_id": pl.Int64,
    "gender": pl.Utf8,
    "age": pl.Int64,
    "occupation": pl.Utf8,
    "zip": pl.Utf8,
    "source_id": pl.Utf8,
}
ITEM_SCHEMA = {
    "item_id": pl.Int64,
    "title": pl.Utf8,
    "genres": pl.List(pl.Utf8),
    "source_id": pl.Utf8,
}
RATING_SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "rating": pl.Int8,
    "timestamp": pl.Int64,
}


# What a loader may merge or drop on the way, and how the summary describes each count.
CLEANING = {
    "duplicate_ratings_merged": "duplicate (user, item) ratings merged, keeping the latest",
    "null_reviewer_dropped": "reviews with a null or empty reviewerID dropped",
    "reviews_without_metadata": "reviews of items with no title in the metadata dropped",
    "reviews_without_rating_dropped": "reviews without an 'overall' rating dropped (kar build)",
}


class DataError(ValueError):
    """Malformed or inconsistent input data; the message names the file and line."""


@dataclass
class RatingData:
    """A data set in the normalised schema (see the module docstring)."""

    name: str
    users: pl.DataFrame
    items: pl.DataFrame
    ratings: pl.DataFrame
    # What the loader merged or dropped on the way: counts keyed as in CLEANING.
    cleaning: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- line readers


GZIP_MAGIC = b"\x1f\x8b"


def _open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, through gzip when it is gzip-compressed.

    A file is read as gzip when it starts with the gzip magic bytes, whatever its name; a file
    named ``.gz`` that does not is refused.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.suffix == ".gz":
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise DataError(f"{path}: named .gz but is not a gzip file ({what})")
    return open(path, "rb")  # noqa: SIM115


def _decode(path: Path, lineno: int, raw: bytes, encoding: str) -> str:
    if encoding == "auto":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid {encoding} text ({exc.reason})") from None


def _lines(
    path: Path, encoding: str = "utf-8", skip_header: bool = False
) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without newline), skipping blank lines.

    ``encoding="auto"`` decodes each line as UTF-8 when it is valid UTF-8 and as latin-1
    otherwise: the GroupLens files are latin-1, re-saved copies are often UTF-8, and either
    reads correctly (accented latin-1 text is practically never valid UTF-8). Raises DataError for a
    missing or empty file, bad text and a truncated or corrupt gzip file.
    """
    seen = False
    lineno = 0
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if skip_header and lineno == 1:
                    continue
                line = _decode(path, lineno, raw, encoding).rstrip("\r\n")
                if not line.strip():
                    continue
                seen = True
                yield lineno, line
        except EOFError:
            raise DataError(
                f"{path}:{lineno + 1}: gzip file is truncated (it ends inside line "
                f"{lineno + 1}); download or copy it again"
            ) from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(
                f"{path}: corrupt gzip data, found reading line {lineno + 1} ({exc}); "
                "download or copy it again"
            ) from None
    if not seen:
        raise DataError(f"{path}: file is empty (no data lines)")


def _fields(path: Path, lineno: int, line: str, sep: str, n: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) != n:
        raise DataError(
            f"{path}:{lineno}: expected {n} fields separated by {sep!r}, got {len(parts)}: "
            f"{line[:80]!r}"
        )
    return parts


def _int(path: Path, lineno: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
        raise DataError(f"{path}:{lineno}: {what} {value!r} is not an integer") from None


def _rating(path: Path, lineno: int, value: str) -> int:
    rating = _int(path, lineno, value, "rating")
    if not 1 <= rating <= 5:
        raise DataError(f"{path}:{lineno}: rating {rating} is out of range 1..5")
    return rating


def _check_ids(
    ratings: list[tuple[int, int, int, int, int]],
    users: set[int],
    items: set[int],
    path: Path,
) -> None:
    """Fail on the first rating whose user or item is not in the users/items files."""
    for user, item, _, _, lineno in ratings:
        if user not in users:
            raise DataError(f"{path}:{lineno}: unknown user id {user} (not in the users file)")
        if item not in items:
            raise DataError(f"{path}:{lineno}: unknown item id {item} (not in the items file)")


def _keep_latest(
    ratings: list[tuple[int, int, int, int, int]],
) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """One rating per (user, item): the latest timestamp, a tie going to the later line.

    Returns the kept ratings, in file order, and how many were merged away.
    """
    best: dict[tuple[int, int], int] = {}
    for idx, r in enumerate(ratings):
        key = (r[0], r[1])
        seen = best.get(key)
        if seen is None or r[3] >= ratings[seen][3]:
            best[key] = idx
    if len(best) == len(ratings):
        return ratings, 0
    keep = sorted(best.values())
    return [ratings[i] for i in keep], len(ratings) - len(keep)


def _frames(
    name: str,
    users: list[dict],
    items: list[dict],
    ratings: list[tuple[int, int, int, int, int]],
) -> RatingData:
    """The normalised frames; duplicate (user, item) ratings keep the latest (counted)."""
    ratings, merged = _keep_latest(ratings)
    ratings_df = pl.DataFrame(
        {
            "user_id": [r[0] for r in ratings],
            "item_id": [r[1] for r in ratings],
            "rating": [r[2] for r in ratings],
            "timestamp": [r[3] for r in ratings],
        },
        schema=RATING_SCHEMA,
    )
    return RatingData(
        name=name,
        users=pl.DataFrame(users, schema=USER_SCHEMA).sort("user_id"),
        items=pl.DataFrame(items, schema=ITEM_SCHEMA).sort("item_id"),
        ratings=ratings_df,
        cleaning={"duplicate_ratings_merged": merged},
    )


def _unique(path: Path, lineno: int, key: int, seen: set[int], what: str) -> None:
    if key in seen:
        raise DataError(f"{path}:{lineno}: duplicate {what} id {key}")
    seen.add(key)


# --------------------------------------------------------------------------- MovieLens-100K


def load_ml100k(folder: str | Path) -> RatingData:
    """Load MovieLens-100K from the GroupLens layout or from RecBole's atomic files."""
    folder = Path(folder)
    if (folder / "u.data").exists() or not (folder / "ml-100k.inter").exists():
        return _load_ml100k_grouplens(folder)
    return _load_ml100k_recbole(folder)


def _load_ml100k_grouplens(folder: Path) -> RatingData:
    users, user_ids = [], set()
    path = folder / "u.user"
    for lineno, line in _lines(path, "auto"):
        uid, age, gender, occupation, zipcode = _fields(path, lineno, line, "|", 5)
        user = _int(path, lineno, uid, "user id")
        _unique(path, lineno, user, user_ids, "user")
        users.append(
            {
                "user_id": user,
                "gender": gender,
                "age": _int(path, lineno, age, "age"),
                "occupation": occupation,
                "zip": zipcode,
                "source_id": uid,
            }
        )
    items, item_ids = [], set()
    path = folder / "u.item"
    for lineno, line in _lines(path, "auto"):
        parts = _fields(path, lineno, line, "|", 5 + len(ML100K_GENRES))
        item = _int(path, lineno, parts[0], "item id")
        _unique(path, lineno, item, item_ids, "item")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{path}:{lineno}: genre flags must be 0 or 1")
        genres = [g for g, f in zip(ML100K_GENRES, flags, strict=True) if f == "1"]
        items.append(
            {"item_id": item, "title": parts[1].strip(), "genres": genres, "source_id": parts[0]}
        )
    ratings = []
    path = folder / "u.data"
    for lineno, line in _lines(path, "auto"):
        uid, iid, rating, ts = _fields(path, lineno, line, "\t", 4)
        ratings.append(
            (
                _int(path, lineno, uid, "user id"),
                _int(path, lineno, iid, "item id"),
                _rating(path, lineno, rating),
                _int(path, lineno, ts, "timestamp"),
                lineno,
            )
        )
    _check_ids(ratings, user_ids, item_ids, path)
    return _frames("ml-100k", users, items, ratings)


def _load_ml100k_recbole(folder: Path) -> RatingData:
    users, user_ids = [], set()
    path = folder / "ml-100k.user"
    for lineno, line in _lines(path, "auto", skip_header=True):
        uid, age, gender, occupation, zipcode = _fields(path, lineno, line, "\t", 5)
        user = _int(path, lineno, uid, "user id")
        _unique(path, lineno, user, user_ids, "user")
        users.append(
            {
                "user_id": user,
                "gender": gender,
                "age": _int(path, lineno, age, "age"),
                "occupation": occupation,
                "zip": zipcode,
                "source_id": uid,
            }
        )
    items, item_ids = [], set()
    path = folder / "ml-100k.item"
    for lineno, line in _lines(path, "auto", skip_header=True):
        iid, title, year, genres = _fields(path, lineno, line, "\t", 4)
        item = _int(path, lineno, iid, "item id")
        _unique(path, lineno, item, item_ids, "item")
        title = title.strip()
        if year.strip():
            title = f"{title} ({year.strip()})"
        items.append({"item_id": item, "title": title, "genres": genres.split(), "source_id": iid})
    ratings = []
    path = folder / "ml-100k.inter"
    for lineno, line in _lines(path, "auto", skip_header=True):
        uid, iid, rating, ts = _fields(path, lineno, line, "\t", 4)
        ratings.append(
            (
                _int(path, lineno, uid, "user id"),
                _int(path, lineno, iid, "item id"),
                _rating(path, lineno, rating),
                _int(path, lineno, ts, "timestamp"),
                lineno,
            )
        )
    _check_ids(ratings, user_ids, item_ids, path)
    return _frames("ml-100k", users, items, ratings)


# --------------------------------------------------------------------------- MovieLens-1M


def load_ml1m(folder: str | Path) -> RatingData:
    """Load MovieLens-1M (``ratings.dat``, ``movies.dat``, ``users.dat``; ``::``, latin-1)."""
    folder = Path(folder)
    users, user_ids = [], set()
    path = folder / "users.dat"
    for lineno, line in _lines(path, "auto"):
        uid, gender, age, occupation, zipcode = _fields(path, lineno, line, "::", 5)
        user = _int(path, lineno, uid, "user id")
        _unique(path, lineno, user, user_ids, "user")
        occ = _int(path, lineno, occupation, "occupation code")
        if not 0 <= occ < len(ML1M_OCCUPATIONS):
            raise DataError(f"{path}:{lineno}: occupation code {occ} is out of range 0..20")
        users.append(
            {
                "user_id": user,
                "gender": gender,
                "age": _int(path, lineno, age, "age"),
                "occupation": ML1M_OCCUPATIONS[occ],
                "zip": zipcode,
                "source_id": uid,
            }
        )
    items, item_ids = [], set()
    path = folder / "movies.dat"
    for lineno, line in _lines(path, "auto"):
        iid, title, genres = _fields(path, lineno, line, "::", 3)
        item = _int(path, lineno, iid, "item id")
        _unique(path, lineno, item, item_ids, "item")
        items.append(
            {
                "item_id": item,
                "title": title.strip(),
                "genres": [g for g in genres.split("|") if g],
                "source_id": iid,
            }
        )
    ratings = []
    path = folder / "ratings.dat"
    for lineno, line in _lines(path, "auto"):
        uid, iid, rating, ts = _fields(path, lineno, line, "::", 4)
        ratings.append(
            (
                _int(path, lineno, uid, "user id"),
                _int(path, lineno, iid, "item id"),
                _rating(path, lineno, rating),
                _int(path, lineno, ts, "timestamp"),
                lineno,
            )
        )
    _check_ids(ratings, user_ids, item_ids, path)
    return _frames("ml-1m", users, items, ratings)


# --------------------------------------------------------------------------- Amazon-Books


def _find(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return folder / names[0]


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(path, "utf-8"):
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
    meta_path = _find(folder, ("meta_Books.json", "meta_Books.json.gz", "meta_Books.jsonl"))
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
    reviews_path = _find(folder, ("Books.json", "Books.json.gz", "Books.jsonl"))
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
        rating = _rating(reviews_path, lineno, str(rating_raw))
        ts = _int(reviews_path, lineno, str(ts_raw), "unixReviewTime")
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


# --------------------------------------------------------------------------- Amazon-Books, KAR

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
    reviews_path = _find(folder, ("Books_5.json.gz", "Books_5.json"))
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
        rating = _rating(reviews_path, lineno, str(obj["overall"]))
        ts = _int(reviews_path, lineno, str(ts_raw), "unixReviewTime")
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
    meta_path = _find(folder, ("meta_Books.json.gz", "meta_Books.json"))
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


# --------------------------------------------------------------------------- dispatch

LOADERS: dict[str, Callable[..., RatingData]] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "amazon-books": load_amazon_books,
}


def load_dataset(
    name: str,
    folder: str | Path | None = None,
    min_interactions: int = 5,
    amazon: AmazonConfig | None = None,
) -> RatingData:
    """Load a supported data set by name.

    ``folder`` is required for ``ml-1m`` and ``amazon-books``; for ``ml-100k`` it is optional
    (the files come from the offline asset cache when it is omitted). ``amazon`` chooses how
    Amazon-Books is built (default: the ``min_interactions`` k-core, :class:`AmazonConfig`).
    """
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "ml-100k":
        from tasks.data.assets import movielens_100k

        return load_ml100k(movielens_100k(folder))
    if folder is None:
        raise DataError(f"dataset {name!r} needs --data-dir pointing at its files")
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: data folder not found")
    if name == "amazon-books":
        if amazon is not None and amazon.build == "kar":
            return load_amazon_books_kar(folder, amazon)
        return load_amazon_books(folder, min_interactions=min_interactions)
    return LOADERS[name](folder)
