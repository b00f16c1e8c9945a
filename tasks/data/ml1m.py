"""MovieLens-1M in the normalised schema (:mod:`tasks.data.schema`): ``users.dat`` (occupation
codes become names), ``movies.dat``, ``ratings.dat``; ``::``-separated, latin-1."""

from __future__ import annotations

from pathlib import Path

from tasks.data.reading import data_lines, parse_id, parse_int, rated_data, split_fields
from tasks.data.schema import DataError, RatingData

# ML-1M occupation codes (README of the GroupLens ML-1M release).
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
]  # fmt: skip

ML1M_FILES = ("users.dat", "movies.dat", "ratings.dat")  # in reading order


def load_ml1m(folder: str | Path) -> RatingData:
    """Load MovieLens-1M (``ratings.dat``, ``movies.dat``, ``users.dat``; ``::``, latin-1)."""
    folder = Path(folder)
    users, user_ids = [], set()
    path = folder / "users.dat"
    for lineno, line in data_lines(path, "auto"):
        uid, gender, age, occupation, zipcode = split_fields(path, lineno, line, "::", 5)
        user = parse_id(path, lineno, uid, user_ids, "user")
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
        items.append(
            {
                "item_id": parse_id(path, lineno, iid, item_ids, "item"),
                "title": title.strip(),
                "genres": [g for g in genres.split("|") if g],
                "source_id": iid,
            }
        )
    return rated_data("ml-1m", users, user_ids, items, item_ids, folder / "ratings.dat", "::")
