"""Data of the second pipeline (You et al., 3.1): one prompt window per user, ground truth, split.

Rules (docs/design.md, "The second pipeline"; the paper's section 3.1 and Figure 2):

- a user's ratings in time order (ties keep file order). A candidate cut-off is any distinct
  timestamp ``t`` of the user's ratings; the context is the ``context_size`` (10) most recent
  ratings strictly before ``t``; ``t`` is valid when the context holds at least ``k_min`` liked
  (rating >= ``like_min``, 3) or at least ``k_min`` hated (rating <= ``hate_max``, 2) ratings and
  at least ``min_ground_truth`` liked ratings come at or after ``t``;
- one valid cut-off per user is drawn at random (``windows_per_train_user`` distinct ones for
  train users); the ground truth is the next ``n_ground_truth`` (5) liked movies from ``t`` on;
- the prompt (:func:`tasks.direct.prompt.direct_prompt`, Figure 2) shows the context's liked and
  hated movies (each list capped to its most recent ``liked_cap`` / ``hated_cap``) with their
  genres, the user's demographics and a release-date cut-off: the data set's last rating day
  (the paper's "April 22nd, 1998" for ML-100K) or the window's own cut-off day;
- location: "City, ST" from an offline ZIP table when one is given (a CSV with columns ``zip``,
  ``city``, ``state``), otherwise the ZIP code itself;
- users with at least one valid cut-off are split 70/15/15 train/valid/test by a seeded
  permutation; ``rank`` orders the users of a split at random (seeded), so "the first N users
  of a split" is ``rank < N`` and smaller subsets nest in larger ones.

``you_et_al_exact`` (``--you-et-al-exact``) builds the windows as You et al.'s code does
(``baseline/baseline_LLM/main.py`` and ``generate_prompt.py`` of github.com/fanyuy2/LLM-RL4Rec,
and the instruction their SFT notebook appends), see :func:`you_et_al_cutoffs` and
:func:`you_et_al_prompt`: a rating is a valid cut-off once at least 5 ratings >= 4 or at least 5
ratings <= 2 came up to it (their cumulative count includes the cut-off rating itself); the
context is the 10 most recent ratings strictly before its timestamp, the ground truth the first
5 liked (>= 3) ratings strictly after it (at least 1); the prompt lists the movies newest first
and ends with "Do not repeat the movies given in the prompt. ...".

Titles, ground truth and context are kept as lists (parquet list columns), never joined with
commas: "American President, The (1995)" stays one title.

Artefacts under ``<out>/`` : ``windows.parquet`` (schema in :func:`build_windows`),
``items.parquet`` (the catalogue: ``item_id``, ``title``, ``genres``), ``ratings.parquet`` (all
ratings, for the reference recommenders) and ``meta.json``. ``window_id`` numbers the windows
(unique; the generator's key).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.common.io import atomic_dir
from tasks.data.schema import DataError, RatingData
from tasks.direct.prompt import direct_prompt, format_cutoff, movie_with_genres

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

WINDOW_SCHEMA = {
    "window_id": pl.Int64,
    "user_id": pl.Int64,
    "split": pl.Utf8,
    "rank": pl.Int64,
    "window_idx": pl.Int64,
    "cutoff_ts": pl.Int64,
    "context_item_ids": pl.List(pl.Int64),
    "context_ratings": pl.List(pl.Int64),
    "liked_item_ids": pl.List(pl.Int64),
    "hated_item_ids": pl.List(pl.Int64),
    "liked_titles": pl.List(pl.Utf8),
    "hated_titles": pl.List(pl.Utf8),
    "ground_truth_item_ids": pl.List(pl.Int64),
    "ground_truth_titles": pl.List(pl.Utf8),
    "history_item_ids": pl.List(pl.Int64),
    "gender": pl.Utf8,
    "age": pl.Int64,
    "occupation": pl.Utf8,
    "location": pl.Utf8,
    "release_cutoff": pl.Utf8,
    "prompt": pl.Utf8,
}


@dataclass(frozen=True)
class WindowConfig:
    """How prompt windows, ground truth and the split are built."""

    seed: int = 0
    context_size: int = 10
    k_min: int = 3
    like_min: int = 3
    hate_max: int = 2
    liked_cap: int = 5
    hated_cap: int = 5
    n_ground_truth: int = 5
    min_ground_truth: int = 5
    train_frac: float = 0.70
    valid_frac: float = 0.15
    windows_per_train_user: int = 1
    release_cutoff: str = "dataset"
    top_k: int = 5
    you_et_al_exact: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("context_size", self.context_size >= 1, ">= 1"),
            ("k_min", 1 <= self.k_min <= self.context_size, "in [1, context_size]"),
            ("hate_max", self.hate_max < self.like_min, "< like_min"),
            ("liked_cap", self.liked_cap >= 0, ">= 0"),
            ("hated_cap", self.hated_cap >= 0, ">= 0"),
            ("n_ground_truth", self.n_ground_truth >= 1, ">= 1"),
            ("min_ground_truth", 1 <= self.min_ground_truth <= self.n_ground_truth,
             "in [1, n_ground_truth]"),
            ("train_frac", 0 < self.train_frac < 1, "in (0, 1)"),
            ("valid_frac", 0 <= self.valid_frac < 1 - self.train_frac,
             "in [0, 1 - train_frac)"),
            ("windows_per_train_user", self.windows_per_train_user >= 1, ">= 1"),
            ("release_cutoff", self.release_cutoff in ("dataset", "window"),
             "'dataset' or 'window'"),
            ("top_k", self.top_k >= 1, ">= 1"),
        ]  # fmt: skip
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------- ZIP table


def load_zip_table(path: str | Path | None) -> dict[str, str]:
    """ZIP code -> "City, ST" from a CSV with columns ``zip``, ``city``, ``state``.

    No table (``None``) gives an empty mapping: the prompt then shows the ZIP code itself.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ZIP table not found (zip_table)")
    df = pl.read_csv(path, infer_schema=False)
    cols = {c.lower().strip(): c for c in df.columns}
    zip_col = cols.get("zip") or cols.get("zipcode") or cols.get("zip_code")
    if zip_col is None or "city" not in cols or "state" not in cols:
        raise DataError(f"{path}: ZIP table needs columns zip, city, state; has {df.columns}")
    out = {}
    for z, city, state in df.select(zip_col, cols["city"], cols["state"]).iter_rows():
        if z and city:
            out[str(z).strip().zfill(5)] = f"{city.strip().title()}, {str(state).strip()}"
    return out


def location_of(zipcode: str | None, table: dict[str, str]) -> str | None:
    """City and state where the table knows the ZIP code, otherwise the ZIP code itself."""
    if not zipcode:
        return None
    z = str(zipcode).strip()
    return table.get(z.zfill(5) if z.isdigit() else z, z)


# --------------------------------------------------------------------------- windows


def valid_cutoffs(ts: np.ndarray, ratings: np.ndarray, cfg: WindowConfig) -> np.ndarray:
    """Indices ``j`` (into the time-sorted ratings) of the valid cut-offs of one user.

    ``j`` is the first rating at the cut-off timestamp: the context is ``[j - C, j)``, the
    ground truth the first liked ratings at ``j`` and after.
    """
    n = len(ts)
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
    first = first[first > 0]
    liked = (ratings >= cfg.like_min).astype(np.int64)
    hated = (ratings <= cfg.hate_max).astype(np.int64)
    cl = np.r_[0, np.cumsum(liked)]
    ch = np.r_[0, np.cumsum(hated)]
    lo = np.maximum(first - cfg.context_size, 0)
    n_liked = cl[first] - cl[lo]
    n_hated = ch[first] - ch[lo]
    liked_after = cl[n] - cl[first]
    ok = ((n_liked >= cfg.k_min) | (n_hated >= cfg.k_min)) & (liked_after >= cfg.min_ground_truth)
    return first[ok]


# You et al.'s code: thresholds of the cut-off rule (their defaults) and their prompt's tail.
YOU_ET_AL_LIKED = 4
YOU_ET_AL_HATED = 2
YOU_ET_AL_COUNT = 5
YOU_ET_AL_INSTRUCTION = (
    " Do not repeat the movies given in the prompt. Recommend movies based on the preference "
    "given. "
)


def you_et_al_cutoffs(ts: np.ndarray, ratings: np.ndarray, cfg: WindowConfig) -> np.ndarray:
    """Valid cut-offs as You et al.'s code finds them, as indices ``j`` like :func:`valid_cutoffs`.

    A rating (time order) is a valid point when, counting it and every earlier rating, at least
    5 are >= 4 or at least 5 are <= 2; its timestamp ``t`` is the cut-off and ``j`` the first
    rating at ``t``. The context is the ratings strictly before ``t`` (``[j - C, j)``) and the
    ground truth the liked (>= ``like_min``) ratings strictly after ``t``: a cut-off needs at
    least ``min_ground_truth`` of them (1 in their code, which drops a user whose drawn cut-off
    has none; here such cut-offs are never drawn).
    """
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.cumsum(ratings >= YOU_ET_AL_LIKED)
    neg = np.cumsum(ratings <= YOU_ET_AL_HATED)
    valid_ts = np.unique(ts[(pos >= YOU_ET_AL_COUNT) | (neg >= YOU_ET_AL_COUNT)])
    first = np.searchsorted(ts, valid_ts, side="left")
    after = np.searchsorted(ts, valid_ts, side="right")
    liked = np.r_[0, np.cumsum(ratings >= cfg.like_min)]
    ok = (liked[n] - liked[after]) >= cfg.min_ground_truth
    return first[ok].astype(np.int64)


def you_et_al_prompt(profile: dict, liked: Sequence[str], hated: Sequence[str], cutoff: int) -> str:
    """You et al.'s prompt text (``generate_prompt`` of their code plus the instruction their SFT
    notebook appends): ``liked`` / ``hated`` as display strings, newest first, shown as Python
    lists; gender as ``male`` / ``female``; age as the number."""
    gender = {"M": "male", "F": "female"}.get(profile.get("gender") or "", "unknown gender")
    age = profile.get("age")
    location = profile.get("location") or "an unknown location"
    occupation = profile.get("occupation") or "an unknown occupation"
    prompt = f"I am a {gender}, aged {age}, from {location}, working as {occupation}."
    if liked:
        prompt += f"I have previously watched and liked the movies: {[str(t) for t in liked]}."
    if hated:
        prompt += f"\nI have watched and HATED the movies: {[str(t) for t in hated]}."
    prompt += (
        f"Please provide recommendations for movies released before {format_cutoff(cutoff)}, "
        "based on my history.\n"
        "Based on my profile, recommend the top 5 movies I am most likely to watch next.\n"
        "Please provide the output in a list of strings format, containing only the movie "
        "titles.\n"
        "Make sure to strictly adhere to the output format given below. Strictly do not generate "
        "any additional information other than the movie names.\n"
        "Format:  ['movie_name', 'movie_name', ... 'movie_name']\n"
        "Make sure to limit the recommendations to movies available in the MovieLens dataset."
    )
    return prompt + YOU_ET_AL_INSTRUCTION


def split_users(user_ids: Sequence[int], cfg: WindowConfig) -> dict[int, str]:
    """Seeded 70/15/15 split of the users (sorted ids, then a permutation)."""
    ids = np.sort(np.asarray(list(user_ids), dtype=np.int64))
    rng = np.random.default_rng([cfg.seed, 1])
    perm = rng.permutation(len(ids))
    n_train = int(round(cfg.train_frac * len(ids)))
    n_valid = int(round(cfg.valid_frac * len(ids)))
    out = {}
    for rank, idx in enumerate(perm):
        out[int(ids[idx])] = (
            "train" if rank < n_train else ("valid" if rank < n_train + n_valid else "test")
        )
    return out


def build_windows(
    data: RatingData, cfg: WindowConfig, zip_table: dict[str, str] | None = None
) -> pl.DataFrame:
    """One row per (user, window) with the columns of ``WINDOW_SCHEMA``.

    Lists are in time order (oldest first); ``liked_titles`` / ``hated_titles`` are the
    prompt's display strings (title and genres), ``ground_truth_titles`` plain catalogue
    titles; ``history_item_ids`` every item the user rated before the cut-off (the reference
    recommenders exclude them).
    """
    zip_table = zip_table or {}
    items = data.items
    title = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
    genres = dict(zip(items["item_id"].to_list(), items["genres"].to_list(), strict=True))
    users = {row["user_id"]: row for row in data.users.iter_rows(named=True)}
    ratings = (
        data.ratings.with_row_index("_order")
        .sort(["user_id", "timestamp", "_order"])
        .group_by("user_id", maintain_order=True)
        .agg("item_id", "rating", "timestamp")
    )
    if ratings.height == 0:
        raise DataError(f"{data.name}: no ratings")
    last_ts = int(data.ratings["timestamp"].max())
    per_user: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for uid, it, rt, ts in ratings.iter_rows():
        it_a = np.asarray(it, dtype=np.int64)
        rt_a = np.asarray(rt, dtype=np.int64)
        ts_a = np.asarray(ts, dtype=np.int64)
        cut = (you_et_al_cutoffs if cfg.you_et_al_exact else valid_cutoffs)(ts_a, rt_a, cfg)
        if len(cut):
            per_user[int(uid)] = (it_a, rt_a, ts_a, cut)
    if not per_user:
        raise DataError(
            f"{data.name}: no user has a valid window (k_min={cfg.k_min}, "
            f"min_ground_truth={cfg.min_ground_truth}, context_size={cfg.context_size})"
        )
    split = split_users(list(per_user), cfg)
    rank_rng = np.random.default_rng([cfg.seed, 2])
    ranks: dict[int, int] = {}
    for name in SPLITS:
        members = sorted(u for u, s in split.items() if s == name)
        for r, idx in enumerate(rank_rng.permutation(len(members))):
            ranks[members[idx]] = r
    rows = []
    for uid in sorted(per_user):
        it_a, rt_a, ts_a, cut = per_user[uid]
        rng = np.random.default_rng([cfg.seed, 3, uid])
        n_win = cfg.windows_per_train_user if split[uid] == "train" else 1
        chosen = np.sort(rng.choice(cut, size=min(n_win, len(cut)), replace=False))
        user = users.get(uid, {})
        for w, j in enumerate(chosen.tolist()):
            lo = max(0, j - cfg.context_size)
            ctx_items = it_a[lo:j].tolist()
            ctx_ratings = rt_a[lo:j].tolist()
            liked = [i for i, r in zip(ctx_items, ctx_ratings, strict=True) if r >= cfg.like_min]
            hated = [i for i, r in zip(ctx_items, ctx_ratings, strict=True) if r <= cfg.hate_max]
            liked = liked[max(0, len(liked) - cfg.liked_cap) :] if cfg.liked_cap else []
            hated = hated[max(0, len(hated) - cfg.hated_cap) :] if cfg.hated_cap else []
            # the ground truth from the cut-off on (default) or strictly after it (You et al.)
            start = int(np.searchsorted(ts_a, ts_a[j], side="right")) if cfg.you_et_al_exact else j
            future = it_a[start:][rt_a[start:] >= cfg.like_min][: cfg.n_ground_truth].tolist()
            if cfg.you_et_al_exact:  # newest first, as their prompt lists them
                liked, hated = liked[::-1], hated[::-1]
            cutoff_ts = int(ts_a[j])
            location = location_of(user.get("zip"), zip_table)
            release_ts = last_ts if cfg.release_cutoff == "dataset" else cutoff_ts
            liked_txt = [movie_with_genres(title[i], genres[i]) for i in liked]
            hated_txt = [movie_with_genres(title[i], genres[i]) for i in hated]
            profile = {
                "gender": user.get("gender"),
                "age": user.get("age"),
                "occupation": user.get("occupation"),
                "location": location,
            }
            rows.append(
                {
                    "window_id": len(rows),
                    "user_id": uid,
                    "split": split[uid],
                    "rank": ranks[uid],
                    "window_idx": w,
                    "cutoff_ts": cutoff_ts,
                    "context_item_ids": ctx_items,
                    "context_ratings": ctx_ratings,
                    "liked_item_ids": liked,
                    "hated_item_ids": hated,
                    "liked_titles": liked_txt,
                    "hated_titles": hated_txt,
                    "ground_truth_item_ids": future,
                    "ground_truth_titles": [title[i] for i in future],
                    "history_item_ids": it_a[:j].tolist(),
                    **profile,
                    "release_cutoff": format_cutoff(release_ts),
                    "prompt": you_et_al_prompt(profile, liked_txt, hated_txt, release_ts)
                    if cfg.you_et_al_exact
                    else direct_prompt(
                        profile, liked_txt, hated_txt, release_ts, cfg.top_k, data.name
                    ),
                }
            )
    return pl.DataFrame(rows, schema=WINDOW_SCHEMA)


def window_counts(windows: pl.DataFrame, data: RatingData) -> dict:
    """Users, windows and list sizes per split."""
    out: dict = {
        "dataset": data.name,
        "users_total": data.users.height,
        "users_with_window": windows["user_id"].n_unique(),
        "windows": windows.height,
        "splits": {},
    }
    for name in SPLITS:
        part = windows.filter(pl.col("split") == name)
        out["splits"][name] = {
            "users": part["user_id"].n_unique(),
            "windows": part.height,
            "mean_liked": float(part["liked_item_ids"].list.len().mean() or 0.0),
            "mean_hated": float(part["hated_item_ids"].list.len().mean() or 0.0),
            "mean_ground_truth": float(part["ground_truth_item_ids"].list.len().mean() or 0.0),
        }
    return out


def prepare_direct(
    data: RatingData,
    out: str | Path,
    cfg: WindowConfig,
    zip_table: str | Path | None = None,
) -> dict:
    """Build the windows of ``data`` and write them under ``out`` (atomically); return counts."""
    windows = build_windows(data, cfg, load_zip_table(zip_table))
    counts = window_counts(windows, data)
    meta = {
        "window_config": asdict(cfg),
        "zip_table": str(zip_table) if zip_table else None,
        "counts": counts,
    }
    with atomic_dir(Path(out)) as tmp:
        windows.write_parquet(tmp / "windows.parquet")
        data.items.select("item_id", "title", "genres").write_parquet(tmp / "items.parquet")
        data.ratings.write_parquet(tmp / "ratings.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info(
        "direct data: %d windows of %d users (train %d, valid %d, test %d)",
        counts["windows"],
        counts["users_with_window"],
        *(counts["splits"][s]["users"] for s in SPLITS),
    )
    return counts


def select(windows: pl.DataFrame, split: str, max_users: int | None = None) -> pl.DataFrame:
    """The windows of ``split``, limited to the first ``max_users`` users by ``rank``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    part = windows.filter(pl.col("split") == split)
    if max_users is not None:
        part = part.filter(pl.col("rank") < max_users)
    return part.sort(["rank", "window_idx"])
