"""MovieLens-100K (GroupLens' ``u.user``, ``u.item``, ``u.data``, or RecBole's atomic files) in
the normalised schema (:mod:`tasks.data.schema`)."""

from __future__ import annotations

from pathlib import Path

from tasks.data.reading import data_lines, parse_id, parse_int, rated_data, split_fields
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
        users.append(
            {
                "user_id": parse_id(path, lineno, uid, user_ids, "user"),
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
        item = parse_id(path, lineno, parts[0], item_ids, "item")
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{path}:{lineno}: genre flags must be 0 or 1")
        genres = [g for g, f in zip(ML100K_GENRES, flags, strict=True) if f == "1"]
        items.append(
            {"item_id": item, "title": parts[1].strip(), "genres": genres, "source_id": parts[0]}
        )
    return rated_data("ml-100k", users, user_ids, items, item_ids, folder / "u.data", "\t")


def _load_ml100k_recbole(folder: Path) -> RatingData:
    users, user_ids = _read_users(folder / "ml-100k.user", "\t", skip_header=True)
    items, item_ids = [], set()
    path = folder / "ml-100k.item"
    for lineno, line in data_lines(path, "auto", skip_header=True):
        iid, title, year, genres = split_fields(path, lineno, line, "\t", 4)
        item = parse_id(path, lineno, iid, item_ids, "item")
        title = title.strip()
        if year.strip():
            title = f"{title} ({year.strip()})"
        items.append({"item_id": item, "title": title, "genres": genres.split(), "source_id": iid})
    inter = folder / "ml-100k.inter"
    return rated_data("ml-100k", users, user_ids, items, item_ids, inter, "\t", skip_header=True)
