"""Data preparation stage: load a data set, build the KAR reranking task, write parquet.

Artefacts, under ``<run>/data/`` (written to a temporary folder, then renamed into place):
``users.parquet``, ``items.parquet``, ``ratings.parquet``, ``history.parquet``,
``lists.parquet`` (schemas in :mod:`tasks.data.datasets` and :mod:`tasks.rlrf4rec.lists`) and
``meta.json`` (data set, task settings, counts).

Command line::

    python -m tasks.data prepare --dataset ml-100k --out runs/x
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.runlock import RunLockedError, run_lock
from tasks.data.assets import AssetError
from tasks.data.datasets import DATASETS, DataError, load_dataset
from tasks.rlrf4rec.lists import ListsConfig, RerankLists, build_lists, lists_counts

log = logging.getLogger(__name__)

DATA_FILES = ("users", "items", "ratings", "history", "lists")


@dataclass
class PreparedData:
    """The frames of a prepared run folder (see the module docstring)."""

    users: pl.DataFrame
    items: pl.DataFrame
    ratings: pl.DataFrame
    history: pl.DataFrame
    lists: pl.DataFrame
    meta: dict


def prepare(
    dataset: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    cfg: ListsConfig | None = None,
    min_interactions: int = 5,
    max_users: int | None = None,
) -> dict:
    """Prepare ``dataset`` into ``<out>/data`` and return its counts.

    ``max_users`` keeps a seeded random subset of the users (their lists are exactly those of
    the full preparation). Nothing is written when loading or building fails; an existing
    ``<out>/data`` is replaced only once the new one is complete.
    """
    cfg = cfg or ListsConfig()
    data = load_dataset(dataset, data_dir, min_interactions=min_interactions)
    rerank = build_lists(data, cfg)
    if max_users:
        rerank = subset_users(rerank, max_users, cfg.seed)
    counts = lists_counts(rerank, data)
    meta = {
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "min_interactions": min_interactions,
        "max_users": max_users,
        "task": asdict(cfg),
        "counts": counts,
    }
    with atomic_dir(Path(out) / "data") as tmp:
        data.users.write_parquet(tmp / "users.parquet")
        data.items.write_parquet(tmp / "items.parquet")
        data.ratings.write_parquet(tmp / "ratings.parquet")
        rerank.history.write_parquet(tmp / "history.parquet")
        # rerank.users carries the split and per-user counts; it supersedes data.users.
        rerank.users.write_parquet(tmp / "users.parquet")
        rerank.lists.write_parquet(tmp / "lists.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def subset_users(rerank: RerankLists, max_users: int, seed: int) -> RerankLists:
    """Keep ``max_users`` users drawn at random (seeded), with their histories and lists."""
    ids = np.sort(rerank.users["user_id"].to_numpy())
    if max_users >= len(ids):
        return rerank
    keep = np.sort(np.random.default_rng(seed + 2).choice(ids, max_users, replace=False))
    keep_list = keep.tolist()
    return RerankLists(
        users=rerank.users.filter(pl.col("user_id").is_in(keep_list)),
        history=rerank.history.filter(pl.col("user_id").is_in(keep_list)),
        lists=rerank.lists.filter(pl.col("user_id").is_in(keep_list)),
    )


def load_prepared(run_dir: str | Path) -> PreparedData:
    """Read the frames of ``<run_dir>/data`` written by :func:`prepare`."""
    folder = Path(run_dir) / "data"
    if not (folder / "meta.json").is_file():
        raise DataError(f"{folder}: not a prepared data folder (no meta.json); run prepare first")
    frames = {name: pl.read_parquet(folder / f"{name}.parquet") for name in DATA_FILES}
    return PreparedData(**frames, meta=json.loads((folder / "meta.json").read_text()))


def format_counts(counts: dict) -> str:
    """Human-readable summary of :func:`tasks.rlrf4rec.lists.lists_counts`."""
    lines = [
        f"dataset           {counts['dataset']}",
        f"users             {counts['users']:,} ({counts['users_with_lists']:,} with lists)",
        f"items             {counts['items']:,}",
        f"ratings           {counts['ratings']:,} ({counts['history_ratings']:,} in histories)",
        f"lists             {counts['lists']:,} "
        f"({counts['no_positive_share']:.1%} with no positive)",
    ]
    for split, c in counts["splits"].items():
        lines.append(
            f"  {split:<6} users {c['users']:>6,}  lists {c['lists']:>8,}  "
            f"no positive {c['no_positive_share']:.1%}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.data",
        description="Prepare a ratings data set into the KAR reranking task (parquet).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="load a data set, build histories, lists and splits, write <out>/data/*.parquet",
    )
    p.add_argument("--dataset", choices=DATASETS, default="ml-100k", help="data set to load")
    p.add_argument("--out", required=True, help="run folder; files go to <out>/data/")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the data set's files (ml-100k: u.data/u.item/u.user, optional; "
        "ml-1m: ratings.dat/movies.dat/users.dat; amazon-books: Books.json, meta_Books.json)",
    )
    p.add_argument("--seed", type=int, default=42, help="one seed for split and negatives")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of users in test")
    p.add_argument(
        "--valid-frac", type=float, default=0.1, help="share of non-test users for validation"
    )
    p.add_argument(
        "--max-users", type=int, default=None, help="keep a seeded random subset of users"
    )
    p.add_argument(
        "--min-interactions",
        type=int,
        default=5,
        help="amazon-books: keep users and items with at least this many ratings",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, value in (("--test-frac", args.test_frac), ("--valid-frac", args.valid_frac)):
        if not 0.0 <= value < 1.0:
            print(f"error: {name} must be in [0, 1), got {value}", file=sys.stderr)
            return 2
    cfg = ListsConfig(seed=args.seed, test_frac=args.test_frac, valid_frac=args.valid_frac)
    try:
        # A flow may be writing this run folder: take its lock, as the flows do.
        with run_lock(args.out):
            counts = prepare(
                args.dataset, args.out, args.data_dir, cfg, args.min_interactions, args.max_users
            )
    except (DataError, AssetError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_counts(counts))
    print(f"written to {Path(args.out) / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
