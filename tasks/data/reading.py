"""Reading the data sets' text files: lines (plain or gzip, UTF-8 or latin-1), fields,
integers and ratings, each failure a :class:`DataError` naming the file and the line; and the
normalised frames built from the rows read (one rating per (user, item), the latest).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import polars as pl

from tasks.data.schema import ITEM_SCHEMA, RATING_SCHEMA, USER_SCHEMA, DataError, RatingData

Rating = tuple[int, int, int, int, int]
"""A rating row as read: user id, item id, rating, timestamp, line number."""

GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: Path) -> BinaryIO:
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


def decode_line(path: Path, lineno: int, raw: bytes, encoding: str) -> str:
    if encoding == "auto":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid {encoding} text ({exc.reason})") from None


def data_lines(
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
    with open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if skip_header and lineno == 1:
                    continue
                line = decode_line(path, lineno, raw, encoding).rstrip("\r\n")
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


def split_fields(path: Path, lineno: int, line: str, sep: str, n: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) != n:
        raise DataError(
            f"{path}:{lineno}: expected {n} fields separated by {sep!r}, got {len(parts)}: "
            f"{line[:80]!r}"
        )
    return parts


def parse_int(path: Path, lineno: int, value: str, what: str) -> int:
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


def parse_rating(path: Path, lineno: int, value: str) -> int:
    rating = parse_int(path, lineno, value, "rating")
    if not 1 <= rating <= 5:
        raise DataError(f"{path}:{lineno}: rating {rating} is out of range 1..5")
    return rating


def check_ids(
    ratings: list[Rating],
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


def keep_latest(
    ratings: list[Rating],
) -> tuple[list[Rating], int]:
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


def rating_data(
    name: str,
    users: list[dict],
    items: list[dict],
    ratings: list[Rating],
) -> RatingData:
    """The normalised frames; duplicate (user, item) ratings keep the latest (counted)."""
    ratings, merged = keep_latest(ratings)
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


def check_unique(path: Path, lineno: int, key: int, seen: set[int], what: str) -> None:
    if key in seen:
        raise DataError(f"{path}:{lineno}: duplicate {what} id {key}")
    seen.add(key)


def read_ratings(path: Path, sep: str, skip_header: bool = False) -> list[Rating]:
    """Every line of a ratings file of four fields: user id, item id, rating, timestamp."""
    ratings = []
    for lineno, line in data_lines(path, "auto", skip_header=skip_header):
        uid, iid, rating, ts = split_fields(path, lineno, line, sep, 4)
        ratings.append(
            (
                parse_int(path, lineno, uid, "user id"),
                parse_int(path, lineno, iid, "item id"),
                parse_rating(path, lineno, rating),
                parse_int(path, lineno, ts, "timestamp"),
                lineno,
            )
        )
    return ratings


def parse_id(path: Path, lineno: int, value: str, seen: set[int], what: str) -> int:
    """A ``what`` id (``user``, ``item``) that must be an integer not ``seen`` before; added
    to ``seen``."""
    key = parse_int(path, lineno, value, f"{what} id")
    check_unique(path, lineno, key, seen, what)
    return key


def rated_data(
    name: str,
    users: list[dict],
    user_ids: set[int],
    items: list[dict],
    item_ids: set[int],
    ratings_path: Path,
    sep: str,
    skip_header: bool = False,
) -> RatingData:
    """Read the ratings file of a data set whose users and items are read
    (:func:`read_ratings`), check every rating's user and item exist, build the frames."""
    ratings = read_ratings(ratings_path, sep, skip_header)
    check_ids(ratings, user_ids, item_ids, ratings_path)
    return rating_data(name, users, items, ratings)
