"""Loaders for MovieLens-100K, MovieLens-1M and Amazon-Books into one normalised schema
(:mod:`tasks.data.schema`), by name: :func:`load_dataset`.

One loader module per data set: :mod:`tasks.data.ml100k`, :mod:`tasks.data.ml1m`,
:mod:`tasks.data.amazon_books` (its ``kcore`` and ``kar`` builds). Every loader keeps one rating
per (user, item): the latest by timestamp, a tie going to the later line; how many were merged
is in ``RatingData.cleaning`` (with anything else dropped on the way, see
:data:`tasks.data.schema.CLEANING`), which the prepare summary prints and ``meta.json``
records. GroupLens text is read line by line as UTF-8 where valid, else latin-1, so titles come
out right from the original latin-1 files and from UTF-8 copies alike. Files may be
gzip-compressed (:mod:`tasks.data.reading`).

Bad input raises :class:`tasks.data.schema.DataError` whose message names the file and the line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.data.amazon_books import (
    AmazonConfig,
    load_amazon_books,
    load_amazon_books_kar,
    needed_files,
)
from tasks.data.ml1m import ML1M_FILES, load_ml1m
from tasks.data.ml100k import load_ml100k
from tasks.data.schema import DataError, RatingData

DATASETS = ("ml-100k", "ml-1m", "amazon-books")

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
    check_data_files(name, folder, amazon)
    if name == "ml-100k":
        from tasks.data.assets import movielens_100k

        return load_ml100k(movielens_100k(folder))
    if name == "amazon-books":
        if amazon is not None and amazon.build == "kar":
            return load_amazon_books_kar(folder, amazon)
        return load_amazon_books(folder, min_interactions=min_interactions)
    return LOADERS[name](folder)


def check_data_files(
    name: str, folder: str | Path | None, amazon: AmazonConfig | None = None
) -> None:
    """Raise :class:`DataError` (one line) when ``name`` is not a data set, or the files its
    loader reads are not in ``folder``; nothing is read. ``ml-100k`` without ``folder`` comes
    from the offline assets (checked when they are fetched); a ``folder`` without its files
    raises :class:`tasks.data.assets.AssetError`, as loading it would."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "ml-100k":
        if folder is not None:
            from tasks.data.assets import movielens_100k

            movielens_100k(folder)  # its files, or an AssetError naming the missing ones
        return
    if folder is None:
        raise DataError(f"dataset {name!r} needs --data-dir pointing at its files")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    if name == "ml-1m":
        needed: tuple[tuple[str, ...], ...] = tuple((f,) for f in ML1M_FILES)
    else:
        needed = needed_files(amazon.build if amazon is not None else "kcore")
    for names in needed:
        if not any((folder / n).is_file() for n in names):
            also = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
            raise DataError(f"{folder / names[0]}: file not found{also}")
