"""Data preparation stage: load a data set, build the KAR reranking task, write parquet.

Artefacts, under ``<run>/data/`` (written to a temporary folder, then renamed into place):
``users.parquet``, ``items.parquet``, ``ratings.parquet``, ``history.parquet``,
``lists.parquet`` (schemas in :mod:`tasks.data.schema` and :mod:`tasks.data.lists`) and
``meta.json`` (data set, task settings, counts, and what the loader merged or dropped:
``counts.cleaning``, see :data:`tasks.data.schema.CLEANING`).

``out`` is the run folder: it must be a folder (or not exist yet) and must not be a prepared
``data`` folder itself (that would write ``data/data``). ``max_users`` must leave the test split
non-empty; a validation split it empties, or a ``max_users`` above the number of users, is
reported with a warning.

Amazon-Books is built as a ``min_interactions`` k-core of ``Books.json`` by default, or as KAR
builds it with ``amazon=AmazonConfig(build="kar")`` (``--amazon-build kar``): ``Books_5.json.gz``,
users with 60 and items with 40 ratings, and KAR's task settings for it (history cap 15, label
rating > 4, :func:`lists_config_for`).

Command line::

    python -m tasks.data prepare --dataset ml-100k --out runs/x
    python -m tasks.data prepare --dataset amazon-books --amazon-build kar --data-dir raw --out x
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.runlock import RunLockedError, run_lock
from tasks.data.amazon_books import AMAZON_BUILDS, AmazonConfig
from tasks.data.assets import AssetError
from tasks.data.datasets import DATASETS, load_dataset
from tasks.data.lists import ListsConfig, RerankLists, build_lists, lists_counts
from tasks.data.schema import CLEANING, DataError

log = logging.getLogger(__name__)

DATA_FILES = ("users", "items", "ratings", "history", "lists")

# KAR's task settings for Amazon-Books (preprocess_amz.py: lm_hist_max = 15;
# generate_data_and_prompt.py: rating_threshold = 4, label = rating > 4).
KAR_BOOKS_HISTORY_CAP = 15
KAR_BOOKS_POSITIVE_ABOVE = 4


def lists_config_for(dataset: str, amazon: AmazonConfig | None, cfg: ListsConfig) -> ListsConfig:
    """``cfg`` with KAR's Amazon-Books task settings (history cap 15, label rating > 4) when
    ``dataset`` is built the ``kar`` way; ``cfg`` unchanged otherwise."""
    if dataset == "amazon-books" and amazon is not None and amazon.build == "kar":
        return replace(
            cfg, history_cap=KAR_BOOKS_HISTORY_CAP, positive_above=KAR_BOOKS_POSITIVE_ABOVE
        )
    return cfg


@dataclass
class PreparedData:
    """The frames of a prepared run folder (see the module docstring)."""

    users: pl.DataFrame
    items: pl.DataFrame
    ratings: pl.DataFrame
    history: pl.DataFrame
    lists: pl.DataFrame
    meta: dict


def check_out(out: str | Path, name: str = "out") -> None:
    """Refuse an ``out`` that cannot be a run folder; ``name`` is the parameter, for messages.

    Nothing is created: the first missing folder on the way is created later, when writing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{name} {out} is a file, not a folder (the run folder to write into)")
    data = out / "data"
    if data.exists() and not data.is_dir():
        raise DataError(f"{name} {out}: {data} is a file, not a prepared data folder")
    if (out / "meta.json").is_file() and (out / "lists.parquet").is_file():
        raise DataError(
            f"{name} {out} is a prepared data folder itself, not its run folder; pass "
            f"{out.parent} (files go to <{name}>/data/)"
        )


def check_writable(out: str | Path, name: str = "out") -> None:
    """Create ``out`` if needed and check a file can be written there (before any work)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename or out
        raise DataError(f"{name} {out}: cannot write to {where} ({exc.strerror or exc})") from None


def prepare(
    dataset: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    cfg: ListsConfig | None = None,
    min_interactions: int = 5,
    max_users: int | None = None,
    amazon: AmazonConfig | None = None,
) -> dict:
    """Prepare ``dataset`` into ``<out>/data`` and return its counts.

    ``max_users`` keeps a seeded random subset of the users (their lists are exactly those of
    the full preparation); 0 or None keeps all. ``amazon`` chooses how Amazon-Books is built
    (:class:`tasks.data.amazon_books.AmazonConfig`); without ``cfg`` the ``kar`` build takes KAR's
    task settings (:func:`lists_config_for`). Nothing is written when loading or building
    fails; an existing ``<out>/data`` is replaced only once the new one is complete.
    """
    cfg = cfg or lists_config_for(dataset, amazon, ListsConfig())
    if max_users is not None and max_users < 0:
        raise DataError(f"max_users must be >= 0 (0 keeps all users), got {max_users}")
    if cfg.seed < 0:
        raise DataError(f"seed must be >= 0, got {cfg.seed}")
    if min_interactions < 1:
        raise DataError(f"min_interactions must be >= 1, got {min_interactions}")
    check_out(out)
    data = load_dataset(dataset, data_dir, min_interactions=min_interactions, amazon=amazon)
    rerank = build_lists(data, cfg)
    _check_test_split(rerank, cfg)
    if max_users:
        rerank = _checked_subset(rerank, max_users, cfg)
    counts = lists_counts(rerank, data)
    counts["cleaning"] = {k: int(data.cleaning.get(k, 0)) for k in CLEANING}
    meta = {
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir else None,
        "min_interactions": min_interactions,
        "max_users": max_users,
        "amazon": asdict(amazon or AmazonConfig()) if dataset == "amazon-books" else None,
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


def _split_sizes(users: pl.DataFrame) -> dict[str, int]:
    return {s: int((users["split"] == s).sum()) for s in ("train", "valid", "test")}


def _check_test_split(rerank: RerankLists, cfg: ListsConfig) -> None:
    """Refuse a split with no test user: Table I is measured on the test users."""
    full = _split_sizes(rerank.users)
    if not full["test"]:
        sizes = ", ".join(f"{full[s]} {s}" for s in ("train", "valid", "test"))
        raise DataError(
            f"test_frac {cfg.test_frac} leaves the test split empty ({sizes} of "
            f"{rerank.users.height} users with lists, seed {cfg.seed}); raise --test-frac"
        )


def _checked_subset(rerank: RerankLists, max_users: int, cfg: ListsConfig) -> RerankLists:
    """:func:`subset_users`, refusing a subset with no test user (the full data has some)."""
    total = rerank.users.height
    if max_users > total:
        log.warning(
            "--max-users %d is more than the %d users with lists: all of them are kept",
            max_users,
            total,
        )
    full = _split_sizes(rerank.users)
    subset = subset_users(rerank, max_users, cfg.seed)
    kept = _split_sizes(subset.users)
    sizes = ", ".join(f"{kept[s]} {s}" for s in ("train", "valid", "test"))
    if full["test"] and not kept["test"]:
        raise DataError(
            f"--max-users {max_users} leaves the test split empty ({sizes} of {total} users "
            f"with lists, seed {cfg.seed}); raise --max-users"
        )
    if full["valid"] and not kept["valid"]:
        log.warning(
            "--max-users %d leaves the valid split empty (%s of %d users with lists, seed %d): "
            "nothing to select checkpoints on; raise --max-users",
            max_users,
            sizes,
            total,
            cfg.seed,
        )
    return subset


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
    """Human-readable summary of :func:`tasks.data.lists.lists_counts`."""
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
    for key, n in counts.get("cleaning", {}).items():
        if n:
            lines.append(f"cleaning          {n:,} {CLEANING.get(key, key)}")
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
        "ml-1m: ratings.dat/movies.dat/users.dat; amazon-books: Books.json, meta_Books.json; "
        "its kar build: Books_5.json.gz, meta_Books.json.gz)",
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
        help="amazon-books (kcore build): keep users and items with at least this many ratings",
    )
    p.add_argument(
        "--amazon-build",
        choices=AMAZON_BUILDS,
        default="kcore",
        help="amazon-books: kcore (Books.json, --min-interactions k-core) or kar (as KAR builds "
        "it: Books_5.json.gz, users with 60 and items with 40 ratings, brand and second-level "
        "category, history cap 15, label rating > 4)",
    )
    return parser


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, in one line, before any work (None: nothing)."""
    if not 0.0 < args.test_frac < 1.0:
        return (
            f"--test-frac must be in (0, 1), got {args.test_frac}: the test users are the ones "
            "Table I is measured on"
        )
    if not 0.0 <= args.valid_frac < 1.0:
        return f"--valid-frac must be in [0, 1), got {args.valid_frac}"
    if args.max_users is not None and args.max_users < 0:
        return f"--max-users must be >= 0 (0 keeps all users), got {args.max_users}"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.min_interactions < 1:
        return f"--min-interactions must be >= 1, got {args.min_interactions}"
    try:
        check_out(args.out, "--out")
        check_writable(args.out, "--out")
    except DataError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    new_folder = not Path(args.out).exists()
    problem = _argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    code = _prepare_command(args)
    if code and new_folder:
        remove_if_only_lock(Path(args.out))
    return code


def remove_if_only_lock(folder: Path) -> None:
    """Remove ``folder``, made by a command that failed, when it holds only its ``.lock``."""
    try:
        if {p.name for p in folder.iterdir()} <= {".lock"}:
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass  # it is not ours to clean any further


def _prepare_command(args: argparse.Namespace) -> int:
    """``prepare`` under the run folder's lock; the exit status (1 and one line on failure)."""
    amazon = AmazonConfig(build=args.amazon_build)
    cfg = lists_config_for(
        args.dataset,
        amazon,
        ListsConfig(seed=args.seed, test_frac=args.test_frac, valid_frac=args.valid_frac),
    )
    try:
        # A flow may be writing this run folder: take its lock, as the flows do.
        with run_lock(args.out):
            counts = prepare(
                args.dataset,
                args.out,
                args.data_dir,
                cfg,
                args.min_interactions,
                args.max_users,
                amazon=amazon,
            )
    except (DataError, AssetError, RunLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up while writing: nothing was replaced
        print(
            f"error: cannot write {exc.filename or args.out}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    print(format_counts(counts))
    print(f"written to {Path(args.out) / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
