"""The normalised schema every data set loader returns, and the error bad input raises.

A :class:`RatingData` holds three polars frames:

- ``users``: ``user_id`` (Int64), ``gender`` (Utf8, null when unknown), ``age`` (Int64; the raw
  age for ML-100K, the age-bucket code for ML-1M, null for Amazon), ``occupation`` (Utf8),
  ``zip`` (Utf8), ``source_id`` (Utf8: the id in the source files).
- ``items``: ``item_id`` (Int64), ``title`` (Utf8, with the year where known, commas kept:
  "American President, The (1995)"), ``genres`` (List[Utf8]), ``source_id`` (Utf8).
- ``ratings``: ``user_id``, ``item_id`` (Int64), ``rating`` (Int8, 1..5), ``timestamp``
  (Int64, seconds), in file order.

What a loader merged or dropped on the way is counted in ``RatingData.cleaning``, keyed as in
:data:`CLEANING`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

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
