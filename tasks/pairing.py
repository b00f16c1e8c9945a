"""DPO preference pairs from N scored samples per prompt: the one pairing of both pipelines.

RLRF4Rec pairs the knowledge samples of a user (key ``user_id``, reward ``ndcg_at_5`` of the
reranker), the second pipeline the answers to a train window (key ``window_id``, reward the
``reward`` column of :func:`tasks.direct.scoring.score_answers`: NDCG@5 plus its format bonus).

Strategies:

- ``best_worst`` (RLRF4Rec, Algorithm 1): chosen = the highest-reward sample, rejected = the
  lowest; one pair per prompt.
- ``all_pairs`` (You et al.): every one of the n-choose-2 pairs of samples, the higher reward
  chosen.
- ``mu_2sigma``: chosen = the best sample, rejected = the sample whose reward is nearest to
  ``mean - 2 * std`` of that prompt's rewards (a rejected answer that is bad but typical, not an
  outlier such as an empty string).

Rules, the same for every strategy:

- a pair needs a reward difference ``> 0`` (else it is a tie) and ``>= min_margin`` (a pair at
  exactly the margin is kept);
- identical texts never form a pair;
- empty or whitespace-only samples are never chosen (they may be rejected); samples cut at the
  token limit may be chosen (short budgets cut most answers);
- ``max_pairs_per_prompt`` keeps a prompt's pairs with the largest margins.

A prompt's pairs come out largest margin first (ties of margin in sample order), prompts in
key order. Every dropped candidate is counted in :class:`PairStats`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

Strategy = Literal["best_worst", "all_pairs", "mu_2sigma"]
STRATEGIES = ("best_worst", "all_pairs", "mu_2sigma")
KEYS = ("user_id", "window_id")


def pair_schema(key: str = "user_id") -> dict[str, pl.DataType]:
    """The columns of a pairs frame: the key, the texts, their sample indices and rewards."""
    return {
        key: pl.Int64,
        "prompt": pl.Utf8,
        "chosen": pl.Utf8,
        "rejected": pl.Utf8,
        "chosen_idx": pl.Int32,
        "rejected_idx": pl.Int32,
        "chosen_reward": pl.Float64,
        "rejected_reward": pl.Float64,
        "margin": pl.Float64,
    }


PAIR_SCHEMA = pair_schema()


@dataclass(frozen=True)
class PairingConfig:
    """How pairs are built (see the module docstring for the rules).

    Attributes:
        strategy: ``best_worst``, ``all_pairs`` or ``mu_2sigma``.
        min_margin: the smallest reward difference kept (kept at exactly this value).
        reward_col: the samples' column holding the reward.
        key: the column naming the prompt a sample answers (``user_id`` or ``window_id``).
        max_pairs_per_prompt: keep at most this many pairs of a prompt (largest margins).
    """

    strategy: Strategy = "best_worst"
    min_margin: float = 0.0
    reward_col: str = "ndcg_at_5"
    key: Literal["user_id", "window_id"] = "user_id"
    max_pairs_per_prompt: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy must be best_worst, all_pairs or mu_2sigma, got {self.strategy!r}"
            )
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if self.key not in KEYS:
            raise ValueError(f"key must be user_id or window_id, got {self.key!r}")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be >= 1, got {self.max_pairs_per_prompt}")

    @classmethod
    def direct(
        cls,
        strategy: Strategy = "all_pairs",
        min_margin: float = 0.0,
        max_pairs_per_prompt: int | None = None,
    ) -> PairingConfig:
        """The second pipeline's pairing: answers per window, on the ``reward`` column."""
        return cls(strategy, min_margin, "reward", "window_id", max_pairs_per_prompt)


@dataclass(frozen=True)
class PairStats:
    """What pairing kept and dropped (``users`` counts prompts, whatever the key)."""

    users: int
    pairs: int
    dropped_tie: int
    dropped_margin: int
    dropped_no_candidate: int
    margin_mean: float
    dropped_identical: int = 0
    dropped_cap: int = 0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def build_pairs(
    samples: pl.DataFrame, prompts: pl.DataFrame, cfg: PairingConfig | None = None
) -> tuple[pl.DataFrame, PairStats]:
    """Pairs from scored samples.

    Args:
        samples: ``cfg.key``, ``sample_idx``, ``text`` and ``cfg.reward_col``.
        prompts: ``cfg.key``, ``prompt`` (the user message the samples answer).
        cfg: strategy, margin, columns and cap (the defaults are RLRF4Rec's).

    Returns:
        ``(pairs, stats)``; pairs follow :func:`pair_schema` of ``cfg.key``, in key order.
    """
    cfg = cfg or PairingConfig()
    key = cfg.key
    prompt_of = dict(zip(prompts[key].to_list(), prompts["prompt"].to_list(), strict=True))
    grouped = samples.sort([key, "sample_idx"]).group_by(key, maintain_order=True)
    rows: list[dict] = []
    ties = small = none = same = capped = users = 0
    for (kid,), group in grouped:
        users += 1
        idx = group["sample_idx"].to_numpy()
        text = group["text"].to_list()
        reward = group[cfg.reward_col].to_numpy().astype(np.float64)
        ok = np.array([bool(t.strip()) for t in text])
        candidates = _select(cfg.strategy, reward, ok)
        if not candidates:
            none += 1
            continue
        kept: list[tuple[float, int, int]] = []
        for c, r in candidates:
            margin = reward[c] - reward[r]
            if margin <= 0:
                ties += 1
            elif text[c] == text[r]:
                same += 1
            elif margin < cfg.min_margin:
                small += 1
            else:
                kept.append((float(margin), c, r))
        kept.sort(key=lambda p: -p[0])  # stable: equal margins stay in sample order
        if cfg.max_pairs_per_prompt is not None and len(kept) > cfg.max_pairs_per_prompt:
            capped += len(kept) - cfg.max_pairs_per_prompt
            kept = kept[: cfg.max_pairs_per_prompt]
        for margin, c, r in kept:
            rows.append(
                {
                    key: kid,
                    "prompt": prompt_of[kid],
                    "chosen": text[c],
                    "rejected": text[r],
                    "chosen_idx": int(idx[c]),
                    "rejected_idx": int(idx[r]),
                    "chosen_reward": float(reward[c]),
                    "rejected_reward": float(reward[r]),
                    "margin": margin,
                }
            )
    pairs = pl.DataFrame(rows, schema=pair_schema(key))
    stats = PairStats(
        users=users,
        pairs=pairs.height,
        dropped_tie=ties,
        dropped_margin=small,
        dropped_no_candidate=none,
        margin_mean=float(pairs["margin"].mean()) if pairs.height else 0.0,
        dropped_identical=same,
        dropped_cap=capped,
    )
    return pairs, stats


def _select(strategy: Strategy, reward: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """(chosen, rejected) positions of one prompt's candidates; ties go to the lower position.

    A candidate's chosen sample is never empty; whether it is kept is :func:`build_pairs`' call.
    """
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
    out = []
    for a, b in itertools.combinations(range(len(reward)), 2):
        # the higher reward is chosen; on a tie, a usable sample before an empty one
        c, r = (a, b) if (reward[a], ok[a]) >= (reward[b], ok[b]) else (b, a)
        if ok[c]:
            out.append((c, r))
    return out
