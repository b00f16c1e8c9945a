"""Build DPO preference pairs from N scored samples per user.

Strategies:

- ``best_worst`` (RLRF4Rec, Algorithm 1): chosen = the highest-reward sample, rejected = the
  lowest; one pair per user.
- ``all_pairs`` (You et al.): every ordered pair of samples whose rewards differ by at least
  the margin.
- ``mu_2sigma``: chosen = the best sample, rejected = the sample whose reward is nearest to
  ``mean - 2 * std`` of that user's rewards (a rejected answer that is bad but typical, not an
  outlier such as an empty string).

A pair whose reward difference is zero is a tie; one below ``min_margin`` is a small margin;
both are dropped and counted. Empty or whitespace-only samples are never chosen (they may be
rejected); samples cut at the token limit may be chosen (short budgets cut most answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

Strategy = Literal["best_worst", "all_pairs", "mu_2sigma"]

PAIR_SCHEMA = {
    "user_id": pl.Int64,
    "prompt": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_idx": pl.Int32,
    "rejected_idx": pl.Int32,
    "chosen_reward": pl.Float64,
    "rejected_reward": pl.Float64,
    "margin": pl.Float64,
}


@dataclass(frozen=True)
class PairingConfig:
    """How pairs are built: the strategy, the smallest margin kept, the reward column."""

    strategy: Strategy = "best_worst"
    min_margin: float = 0.0
    reward_col: str = "ndcg_at_5"


@dataclass(frozen=True)
class PairStats:
    """What pairing kept and dropped."""

    users: int
    pairs: int
    dropped_tie: int
    dropped_margin: int
    dropped_no_candidate: int
    margin_mean: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def build_pairs(
    samples: pl.DataFrame,
    prompts: pl.DataFrame,
    strategy: Strategy = "best_worst",
    min_margin: float = 0.0,
    reward_col: str = "reward",
) -> tuple[pl.DataFrame, PairStats]:
    """Pairs from scored samples.

    Args:
        samples: ``user_id``, ``sample_idx``, ``text`` and ``reward_col``.
        prompts: ``user_id``, ``prompt`` (the user message the samples answer).
        strategy: see the module docstring.
        min_margin: pairs whose reward difference is below this are dropped (ties, where the
            difference is exactly zero, are always dropped).
        reward_col: the column holding the reward (e.g. NDCG@5 of the sample's knowledge).

    Returns:
        ``(pairs, stats)``; pairs follow :data:`PAIR_SCHEMA`, in user order.
    """
    if strategy not in ("best_worst", "all_pairs", "mu_2sigma"):
        raise ValueError(f"strategy must be best_worst, all_pairs or mu_2sigma, got {strategy!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    prompt_of = dict(zip(prompts["user_id"].to_list(), prompts["prompt"].to_list(), strict=True))
    grouped = samples.sort(["user_id", "sample_idx"]).group_by("user_id", maintain_order=True)
    rows: list[dict] = []
    ties = small = none = users = 0
    for (uid,), group in grouped:
        users += 1
        idx = group["sample_idx"].to_numpy()
        text = group["text"].to_list()
        reward = group[reward_col].to_numpy().astype(np.float64)
        ok = np.array([bool(t.strip()) for t in text])
        candidates = _select(strategy, reward, ok)
        if not candidates:
            none += 1
            continue
        for c, r in candidates:
            margin = reward[c] - reward[r]
            if margin <= 0:
                ties += 1
                continue
            if margin < min_margin:
                small += 1
                continue
            rows.append(
                {
                    "user_id": uid,
                    "prompt": prompt_of[uid],
                    "chosen": text[c],
                    "rejected": text[r],
                    "chosen_idx": int(idx[c]),
                    "rejected_idx": int(idx[r]),
                    "chosen_reward": float(reward[c]),
                    "rejected_reward": float(reward[r]),
                    "margin": float(margin),
                }
            )
    pairs = pl.DataFrame(rows, schema=PAIR_SCHEMA)
    stats = PairStats(
        users=users,
        pairs=pairs.height,
        dropped_tie=ties,
        dropped_margin=small,
        dropped_no_candidate=none,
        margin_mean=float(pairs["margin"].mean()) if pairs.height else 0.0,
    )
    return pairs, stats


def _select(strategy: Strategy, reward: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """(chosen, rejected) positions for one user; ties in reward go to the lower position."""
    if not ok.any() or len(reward) < 2:
        return []
    masked = np.where(ok, reward, -np.inf)
    best = int(np.argmax(masked))
    if strategy == "best_worst":
        return [(best, int(np.argmin(reward)))]
    if strategy == "mu_2sigma":
        target = reward.mean() - 2 * reward.std()
        others = [i for i in range(len(reward)) if i != best]
        rejected = min(others, key=lambda i: (abs(reward[i] - target), i))
        return [(best, rejected)]
    pairs = []
    for c in range(len(reward)):
        if not ok[c]:
            continue
        for r in range(len(reward)):
            if r != c and reward[c] >= reward[r]:
                pairs.append((c, r))
    # A tie between two usable samples appears twice (c, r) and (r, c): count it once.
    seen: set[tuple[int, int]] = set()
    unique = []
    for c, r in pairs:
        key = (min(c, r), max(c, r)) if reward[c] == reward[r] else (c, r)
        if key not in seen:
            seen.add(key)
            unique.append((c, r))
    return unique
