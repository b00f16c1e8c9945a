"""MovieLens-1M (``users.dat``, ``movies.dat``, ``ratings.dat``; ``::``-separated, latin-1) in
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

# ML-1M occupation codes (README of the GroupLens ML-1M release).
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip


def load_ml1m(folder: str | Path) -> RatingData:
    """Load MovieLens-1M (``ratings.dat``, ``movies.dat``, ``users.dat``; ``::``, latin-1)."""
    folder = Path(folder)
    users, user_ids = [], set()
    path = folder / "users.dat"
    for lineno, line in data_lines(path, "auto"):
        uid, gender, age, occupation, zipcode = split_fields(path, lineno, line, "::", 5)
        user = parse_int(path, lineno, uid, "user id")
        check_unique(path, lineno, user, user_ids, "user")
        occ = parse_int(path, lineno, occupation, "occupation code")
        if not 0 <= occ < len(ML1M_OCCUPATIONS):
            raise DataError(f"{path}:{lineno}: occupation code {occ} is out of range 0..20")
        users.append(
            {
                "user_id": user,
                "gender": gender,
                "age": parse_int(path, lineno, age, "age"),
                "occupation": ML1M_OCCUPATIONS[occ],
                "zip": zipcode,
                "source_id": uid,
            }
        )
    items, item_ids = [], set()
    path = folder / "movies.dat"
    for lineno, line in data_lines(path, "auto"):
        iid, title, genres = split_fields(path, lineno, line, "::", 3)
        item = parse_int(path, lineno, iid, "item id")
        check_unique(path, lineno, item, item_ids, "item")
        items.append(
            {
                "item_id": item,
                "title": title.strip(),
                "genres": [g for g in genres.split("|") if g],
                "source_id": iid,
            }
        )
    path = folder / "ratings.dat"
    ratings = read_ratings(path, "::")
    check_ids(ratings, user_ids, item_ids, path)
    return rating_data("ml-1m", users, items, ratings)
