"""Does the reward read the text? Four measures of a reward model on one round's samples.

A DPO pair is only as good as the reward's preference between two texts of one user. These
figures say whether that preference exists and holds (pure functions here; the flow's
``reward-diagnostics`` stage and ``bench/bench_reward_diagnostics.py`` run them):

- **text sensitivity** (:func:`sensitivity`): every sample's input (its knowledge vector, or its
  text for a text reward) replaced by one of another user's samples (:func:`swap_users`, a
  seeded derangement of the users), and separately zeroed (an empty text): the share of
  rewards that change and the mean absolute change. A reward that ignores its input scores 0.
- **spread** (:func:`spread`): the mean within-user standard deviation of the reward over the
  standard deviation of the users' mean rewards: how far a user's own texts move the reward,
  on the scale of the differences between users.
- **reliability** (:func:`reliability`): a second reward model trained with another seed on the
  same data scores the same samples. The share of same-user sample pairs both order the same
  way (a tie in either counts one half, so a reward that ties everything scores 0.5, chance),
  and the share of users whose best sample both agree on (ties: the chance that random
  tie-breaks in both pick the same sample, so all-ties scores 1/N, chance).
- **knowledge ablation** (:func:`tasks.rlrf4rec.learning.paired_user_difference`): the reward
  model's validation NDCG@5 with each validation user's own round-0 vector against another
  user's, paired per user with a Student-t 95% interval.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from tasks.rlrf4rec.reranker import TrainConfig

CHANGE_TOL = 1e-9  # a reward "changes" when it moves by more than float noise


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (``n >= 2``)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def swap_users(frame: pl.DataFrame, column: str, seed: int) -> pl.DataFrame:
    """``frame`` with each sample's ``column`` taken from a sample of another user.

    Users are deranged (user ``u`` -> ``d(u) != u``); sample ``i`` of ``u`` takes the value of
    sample ``i mod n(d(u))`` of ``d(u)`` (samples in ``sample_idx`` order). Rows, ``user_id``
    and ``sample_idx`` keep their order.

    Args:
        frame: ``user_id``, ``sample_idx``, ``column`` (a vector or a text), >= 2 users.
        column: the input to swap.
        seed: the derangement's seed.
    """
    users = frame["user_id"].unique().sort().to_list()
    donor = dict(zip(users, np.asarray(users)[derangement(len(users), seed)].tolist(), strict=True))
    by_user = (
        frame.sort("user_id", "sample_idx")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col(column))
    )
    values = dict(zip(by_user["user_id"].to_list(), by_user[column].to_list(), strict=True))
    rank = frame.select(
        pl.col("sample_idx").rank("ordinal").over("user_id").cast(pl.Int64) - 1
    ).to_series()
    swapped = [
        values[donor[u]][r % len(values[donor[u]])]
        for u, r in zip(frame["user_id"].to_list(), rank.to_list(), strict=True)
    ]
    return frame.with_columns(pl.Series(column, swapped, dtype=frame.schema[column]))


def sensitivity(own: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How rewards move when their input is replaced.

    Args:
        own, other: ``[n]`` the same samples' rewards with their own and the replaced input.

    Returns:
        ``changed_share`` (share with ``|other - own| > 1e-9``), ``mean_abs_change``, ``n``.
    """
    own, other = np.asarray(own, np.float64), np.asarray(other, np.float64)
    if own.shape != other.shape:
        raise ValueError(f"reward arrays differ in shape: {own.shape} vs {other.shape}")
    keep = np.isfinite(own) & np.isfinite(other)
    delta = np.abs(other[keep] - own[keep])
    if not delta.size:
        return {"changed_share": float("nan"), "mean_abs_change": float("nan"), "n": 0}
    return {
        "changed_share": float((delta > CHANGE_TOL).mean()),
        "mean_abs_change": float(delta.mean()),
        "n": int(delta.size),
    }


def spread(scored: pl.DataFrame, col: str) -> dict[str, float]:
    """Within-user over between-user spread of reward ``col`` (users with >= 2 samples).

    Returns:
        ``within_sd`` (mean over users of the sd of their samples' rewards), ``between_sd``
        (sd of the users' mean rewards), ``ratio`` (within / between), ``users``.
    """
    per_user = (
        scored.drop_nulls(col)
        .filter(pl.col(col).is_not_nan())
        .group_by("user_id")
        .agg(pl.col(col).std().alias("sd"), pl.col(col).mean().alias("mean"), pl.len().alias("n"))
        .filter(pl.col("n") >= 2)
    )
    if per_user.height < 2:
        return {"within_sd": float("nan"), "between_sd": float("nan"), "ratio": float("nan"),
                "users": per_user.height}  # fmt: skip
    within, between = float(per_user["sd"].mean()), float(per_user["mean"].std())
    return {
        "within_sd": within,
        "between_sd": between,
        "ratio": within / between if between > 0 else float("nan"),
        "users": per_user.height,
    }


def reliability(a: pl.DataFrame, b: pl.DataFrame, col: str) -> dict[str, float]:
    """Agreement of two reward models on the same samples (see the module docstring).

    Args:
        a, b: ``user_id``, ``sample_idx``, ``col``: the same samples scored by two models.

    Returns:
        ``pair_agreement`` over ``pairs`` same-user sample pairs, ``best_agreement`` over
        ``users`` users with >= 2 samples.
    """
    both = (
        a.select("user_id", "sample_idx", pl.col(col).alias("_a"))
        .join(
            b.select("user_id", "sample_idx", pl.col(col).alias("_b")),
            on=["user_id", "sample_idx"],
            how="inner",
        )  # fmt: skip
        .drop_nulls()
        .sort("user_id", "sample_idx")
    )
    agree, pairs, best, users = 0.0, 0, 0.0, 0
    for _, group in both.group_by("user_id", maintain_order=True):
        ra, rb = group["_a"].to_numpy(), group["_b"].to_numpy()
        if len(ra) < 2:
            continue
        i, j = np.triu_indices(len(ra), k=1)
        da = np.sign(ra[i] - ra[j]) * (np.abs(ra[i] - ra[j]) > CHANGE_TOL)
        db = np.sign(rb[i] - rb[j]) * (np.abs(rb[i] - rb[j]) > CHANGE_TOL)
        agree += float(np.where((da == 0) | (db == 0), 0.5, (da == db).astype(float)).sum())
        pairs += len(i)
        top_a = set(np.flatnonzero(ra >= ra.max() - CHANGE_TOL).tolist())
        top_b = set(np.flatnonzero(rb >= rb.max() - CHANGE_TOL).tolist())
        best += len(top_a & top_b) / (len(top_a) * len(top_b))
        users += 1
    return {
        "pair_agreement": agree / pairs if pairs else float("nan"),
        "pairs": pairs,
        "best_agreement": best / users if users else float("nan"),
        "users": users,
    }


def diagnose(
    model_dir: Path,
    run_dir: Path,
    *,
    round0: pl.DataFrame,
    vectors: pl.DataFrame,
    scored: pl.DataFrame,
    items: pl.DataFrame | None,
    cfg: TrainConfig,
    n_folds: int,
    reward_col: str,
    seed: int,
    second_model: Path,
    ablation_vectors: pl.DataFrame | None = None,
) -> dict:
    """The four measures of a cross-fitted reward model on one round's samples.

    Args:
        model_dir: the reward model (:func:`tasks.rlrf4rec.reward.train_reward_model`).
        run_dir: the run folder holding ``data/``.
        round0: ``user_id``, ``vector``: the vectors it was trained on (several per user
            with ``cfg.knowledge_draws``).
        vectors: ``user_id``, ``sample_idx``, ``vector``: the round's sample vectors.
        scored: the round's scored samples (``user_id``, ``sample_idx``, ``text``, the reward
            columns, ``genre_share``).
        items: the item vectors the reward model reads (None: none).
        cfg, n_folds: how the reward model was trained (the second model changes the seed).
        reward_col: the pairing reward's column.
        seed: the derangements' seed.
        second_model: where the second-seed reward model is written.
        ablation_vectors: ``user_id``, ``vector``: the validation users' own vectors of the
            knowledge ablation, in the encoding the reward reads (default: ``round0``'s first
            vector of each user).

    Returns:
        ``columns`` (per reward column: ``swapped`` and ``zeroed`` sensitivity, ``spread``,
        ``reliability``; ``genre_share`` has no second model), ``knowledge_ablation``
        (``own``, ``shuffled``, ``diff``, ``ci_low``, ``ci_high``, ``n``), ``samples``, ``users``,
        ``seconds`` (``total``, ``second_model``).
    """
    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec.genre_reward import genre_share, top_genres
    from tasks.rlrf4rec.learning import paired_user_difference, user_rewards
    from tasks.rlrf4rec.reward import RANKER_REWARDS, score_samples, train_reward_model

    started = time.perf_counter()
    cols = ["ndcg_at_5"] + ([reward_col] if reward_col in RANKER_REWARDS[1:] else [])
    vec = vectors.select("user_id", "sample_idx", "vector")
    dim = len(vec["vector"][0]) if vec.height else 0

    def scores(model: Path, frame: pl.DataFrame, **kw) -> pl.DataFrame:
        return score_samples(model, run_dir, frame, items, **kw)

    own = scores(model_dir, vec)
    swapped = scores(model_dir, swap_users(vec, "vector", seed))
    zeros = pl.Series("vector", [[0.0] * dim] * vec.height, dtype=vec.schema["vector"])
    zeroed = scores(model_dir, vec.with_columns(zeros))
    t0 = time.perf_counter()
    train_reward_model(run_dir, second_model, replace(cfg, seed=cfg.seed + 1), round0, items,
                       n_folds=n_folds)  # fmt: skip
    second_seconds = time.perf_counter() - t0
    second = scores(second_model, vec)
    figures: dict = {"columns": {}}
    for col in cols:
        figures["columns"][col] = {
            "swapped": sensitivity(own[col].to_numpy(), swapped[col].to_numpy()),
            "zeroed": sensitivity(own[col].to_numpy(), zeroed[col].to_numpy()),
            "spread": spread(own, col),
            "reliability": reliability(own, second, col),
        }
    data = load_prepared(run_dir)
    if "genre_share" in scored.columns and "text" in scored.columns:
        top = top_genres(data.lists, data.items)
        texts = scored.select("user_id", "sample_idx", "text")
        users = texts["user_id"].to_list()
        mine = genre_share(users, texts["text"].to_list(), top)
        other = genre_share(users, swap_users(texts, "text", seed)["text"].to_list(), top)
        figures["columns"]["genre_share"] = {
            "swapped": sensitivity(mine, other),
            "zeroed": sensitivity(mine, genre_share(users, [""] * len(users), top)),
            "spread": spread(scored, "genre_share"),
        }
    valid_users = data.users.filter(pl.col("split") == "valid")["user_id"].implode()
    ablate = ablation_vectors if ablation_vectors is not None else round0
    r0 = (
        ablate.unique("user_id", keep="first", maintain_order=True)
        .select("user_id", "vector")
        .filter(pl.col("user_id").is_in(valid_users))
    ).with_columns(pl.lit(0, dtype=pl.Int64).alias("sample_idx"))
    ablation: dict = {"n": 0}
    if r0.height >= 2:
        a_own = user_rewards(scores(model_dir, r0, splits=("valid",)), "ndcg_at_5")
        a_shuffled = user_rewards(
            scores(model_dir, swap_users(r0, "vector", seed), splits=("valid",)), "ndcg_at_5"
        )
        ablation = {
            "own": float(np.mean(list(a_own.values()))),
            "shuffled": float(np.mean(list(a_shuffled.values()))),
            **paired_user_difference(a_own, a_shuffled),
        }
    figures["knowledge_ablation"] = ablation
    figures["samples"] = own.drop_nulls("ndcg_at_5").height
    figures["users"] = own.drop_nulls("ndcg_at_5")["user_id"].n_unique()
    figures["reward"] = reward_col
    figures["seconds"] = {"total": time.perf_counter() - started, "second_model": second_seconds}
    return figures


__all__ = [
    "diagnose",
    "derangement",
    "reliability",
    "sensitivity",
    "spread",
    "swap_users",
]
