"""MovieLens-100K (GroupLens' ``u.user``, ``u.item``, ``u.data``, or RecBole's atomic files) in
the normalised schema (:mod:`tasks.data.schema`)."""

from __future__ import annotations

from pathlib import Path

from tasks.data.reading import (
    check_ids,
    check_unique,
    data_lines,
    parse_int,
    rating_data,
    read_ratings,
    split_fields,
)
from tasks.data.schema import DataError, RatingData

# ML-100K genre flags, in u.item column order (u.genre).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def load_ml100k(folder: str | Path) -> RatingData:
    """Load MovieLens-100K from the GroupLens layout or from RecBole's atomic files."""
    folder = Path(folder)
    if (folder / "u.data").exists() or not (folder / "ml-100k.inter").exists():
        return _load_ml100k_grouplens(folder)
    return _load_ml100k_recbole(folder)


def _read_users(path: Path, sep: str, skip_header: bool = False) -> tuple[list[dict], set[int]]:
    """The users of ``u.user`` / ``ml-100k.user`` (id, age, gender, occupation, zip) and
    their ids."""
    users, user_ids = [], set()
    for lineno, line in data_lines(path, "auto", skip_header=skip_header):
        uid, age, gender, occupation, zipcode = split_fields(path, lineno, line, sep, 5)
        user = parse_int(path, lineno, uid, "user id")
        check_unique(path, lineno, user, user_ids, "user")
        users.append(
            {
                "user_id": user,
                "gender": gender,
                "age": parse_int(path, lineno, age, "age"),
                "occupation": occupation,
                "zip": zipcode,
                "source_id": uid,
            }
        )
    return users, user_ids


def _load_ml100k_grouplens(folder: Path) -> RatingData:
    users, user_ids = _read_users(folder / "u.user", "|")
    items, item_ids = [], set()
    path = folder / "u.item"
    for lineno, line in data_lines(path, "auto"):
        parts = split_fields(path, lineno, line, "|", 5 + len(ML100K_GENRES))
        item = parse_int(path, lineno, parts[0], "item id")
        check_unique(path, lineno, item, item_ids, "item")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{path}:{lineno}: genre flags must be 0 or 1")
        genres = [g for g, f in zip(ML100K_GENRES, flags, strict=True) if f == "1"]
        items.append(
            {"item_id": item, "title": parts[1].strip(), "genres": genres, "source_id": parts[0]}
        )
    path = folder / "u.data"
    ratings = read_ratings(path, "\t")
    check_ids(ratings, user_ids, item_ids, path)
    return rating_data("ml-100k", users, items, ratings)


def _load_ml100k_recbole(folder: Path) -> RatingData:
    users, user_ids = _read_users(folder / "ml-100k.user", "\t", skip_header=True)
    items, item_ids = [], set()
    path = folder / "ml-100k.item"
    for lineno, line in data_lines(path, "auto", skip_header=True):
        iid, title, year, genres = split_fields(path, lineno, line, "\t", 4)
        item = parse_int(path, lineno, iid, "item id")
        check_unique(path, lineno, item, item_ids, "item")
        title = title.strip()
        if year.strip():
            title = f"{title} ({year.strip()})"
        items.append({"item_id": item, "title": title, "genres": genres.split(), "source_id": iid})
    path = folder / "ml-100k.inter"
    ratings = read_ratings(path, "\t", skip_header=True)
    check_ids(ratings, user_ids, item_ids, path)
    return rating_data("ml-100k", users, items, ratings)
