"""Measures of learning that do not depend on Table I: how a policy's texts score and read.

Every round's policy writes N texts for the validation users (who never enter a DPO pair);
the frozen reward model scores them like the train users' samples. This module turns those
scored samples into the per-round figures of the report (pure functions on polars frames):

- :func:`user_rewards` and :func:`paired_user_difference`: a split's reward (the mean over users
  of the mean over their samples) and the paired-by-user 95% Student-t interval of
  ``policy r - policy 0``;
- :func:`text_figures`: answer length, distinct-2, and the share of answers that name a title
  from the user's own history;
- :func:`kl_estimate` and :func:`implicit_rewards`: how far the policy moved from its reference
  (the mean per-token log-ratio on its own samples) and DPO's implicit reward on held-out pairs;
- :func:`heldout_pairs`: best/worst pairs of the validation users, for the implicit reward.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from models.stats import mean_ci

YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
MIN_TITLE_CHARS = 4  # shorter titles ("It", "Ran") match ordinary words


def user_rewards(scored: pl.DataFrame, reward_col: str) -> dict[int, float]:
    """Each user's mean reward over their samples: ``{user_id: mean}`` (null rewards left out)."""
    per_user = (
        scored.drop_nulls(reward_col)
        .group_by("user_id")
        .agg(pl.col(reward_col).mean())
        .sort("user_id")
    )
    return dict(zip(per_user["user_id"].to_list(), per_user[reward_col].to_list(), strict=True))


def paired_user_difference(
    now: Mapping[int, float], then: Mapping[int, float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean over the users in both of ``now[u] - then[u]`` with its Student-t interval.

    Returns:
        ``diff``, ``ci_low``, ``ci_high``, ``n`` (users in both); a single user gives a zero-width
        interval, no common user NaNs.
    """
    users = sorted(set(now) & set(then))
    diffs = [now[u] - then[u] for u in users]
    mean, half = mean_ci(diffs, confidence)
    return {"diff": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(users)}


def _bigrams(text: str) -> list[tuple[str, str]]:
    words = text.lower().split()
    return list(zip(words, words[1:], strict=False))


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct bigrams over all bigrams of ``texts`` (lower-cased, split on whitespace);
    0 when there is no bigram."""
    grams = [g for t in texts for g in _bigrams(t)]
    return len(set(grams)) / len(grams) if grams else 0.0


def history_titles(history: pl.DataFrame, items: pl.DataFrame) -> dict[int, list[str]]:
    """Each user's history titles, lower-cased, without the ``(year)``, at least
    :data:`MIN_TITLE_CHARS` long: ``{user_id: [title, ...]}``."""
    joined = history.select("user_id", "item_id").join(
        items.select("item_id", "title"), on="item_id", how="inner"
    )
    out: dict[int, list[str]] = {}
    for uid, title in joined.select("user_id", "title").iter_rows():
        bare = YEAR.sub("", str(title)).strip().lower()
        if len(bare) >= MIN_TITLE_CHARS:
            out.setdefault(uid, []).append(bare)
    return out


def names_history_title(text: str, titles: Sequence[str]) -> bool:
    """Whether ``text`` names one of ``titles`` (whole words, case-insensitive)."""
    low = text.lower()
    return any(re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", low) for t in titles if t in low)


def text_figures(samples: pl.DataFrame, titles: Mapping[int, Sequence[str]]) -> dict[str, float]:
    """What the texts look like: ``mean_tokens`` (policy tokens), ``mean_words``, ``distinct_2``,
    ``history_title_share`` (share of texts naming a title of their user's history)."""
    texts = samples["text"].to_list()
    if not texts:
        return {
            "mean_tokens": 0.0,
            "mean_words": 0.0,
            "distinct_2": 0.0,
            "history_title_share": 0.0,
        }
    users = samples["user_id"].to_list()
    named = [names_history_title(t, titles.get(u, ())) for u, t in zip(users, texts, strict=True)]
    return {
        "mean_tokens": float(samples["n_tokens"].mean()) if "n_tokens" in samples.columns else 0.0,
        "mean_words": float(np.mean([len(t.split()) for t in texts])),
        "distinct_2": distinct_2(texts),
        "history_title_share": float(np.mean(named)),
    }


def kl_estimate(
    policy_logps: Sequence[float], ref_logps: Sequence[float], n_tokens: Sequence[int]
) -> float:
    """Mean per-token log-ratio ``sum(log pi - log pi_ref) / sum(tokens)`` over texts the policy
    sampled itself: a Monte-Carlo estimate of ``KL(pi || pi_ref)`` per token (nats).

    Args:
        policy_logps, ref_logps: summed log-probabilities of each text under the policy and its
            reference.
        n_tokens: the number of scored tokens of each text.
    """
    if not (len(policy_logps) == len(ref_logps) == len(n_tokens)):
        raise ValueError("policy_logps, ref_logps and n_tokens must have the same length")
    total = float(np.sum(n_tokens))
    if total <= 0:
        return float("nan")
    return float(np.sum(np.asarray(policy_logps) - np.asarray(ref_logps)) / total)


def implicit_rewards(
    chosen: tuple[Sequence[float], Sequence[float]],
    rejected: tuple[Sequence[float], Sequence[float]],
    beta: float,
) -> dict[str, float]:
    """DPO's implicit reward ``beta * (log pi - log pi_ref)`` on held-out pairs.

    Args:
        chosen, rejected: ``(policy logps, reference logps)`` of the pairs' chosen and rejected
            texts (summed over their tokens).
        beta: DPO's beta.

    Returns:
        ``accuracy`` (share of pairs whose chosen text gets the larger implicit reward; a tie
        counts half), ``margin`` (mean of chosen minus rejected implicit reward), ``pairs``.
    """
    rc = beta * (np.asarray(chosen[0]) - np.asarray(chosen[1]))
    rr = beta * (np.asarray(rejected[0]) - np.asarray(rejected[1]))
    if rc.shape != rr.shape:
        raise ValueError("chosen and rejected must hold the same number of pairs")
    if rc.size == 0:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    wins = (rc > rr).astype(np.float64) + 0.5 * (rc == rr)
    return {
        "accuracy": float(wins.mean()),
        "margin": float((rc - rr).mean()),
        "pairs": int(rc.size),
    }


def heldout_pairs(scored: pl.DataFrame, prompts: pl.DataFrame, reward_col: str) -> pl.DataFrame:
    """Best/worst pairs of the scored samples (:func:`tasks.pairing.build_pairs`), users with
    tied samples left out: ``user_id, prompt, chosen, rejected, margin``."""
    from tasks.pairing import PairingConfig, build_pairs

    pairs, _ = build_pairs(scored, prompts, PairingConfig(reward_col=reward_col))
    return pairs.select("user_id", "prompt", "chosen", "rejected", "margin")


def example_texts(scored: pl.DataFrame, users: Sequence[int], reward_col: str) -> list[dict]:
    """The first sample of each of ``users`` with its reward (the report's examples)."""
    rows = scored.filter(pl.col("user_id").is_in(list(users))).sort("user_id", "sample_idx")
    first = rows.unique("user_id", keep="first", maintain_order=True)
    return [
        {"user_id": int(u), "text": t, "reward": float(r)}
        for u, t, r in first.select("user_id", "text", reward_col).iter_rows()
    ]


def drift_figures(ratios: pl.DataFrame, beta: float) -> dict[str, float]:
    """KL estimate on the ``own`` rows and implicit rewards on the ``chosen``/``rejected`` rows
    of a :func:`tasks.llm.stages.log_ratios` frame (``kind``, ``user_id``, ``logp_policy``,
    ``logp_ref``, ``n_tokens``)."""
    own = ratios.filter(pl.col("kind") == "own")
    chosen = ratios.filter(pl.col("kind") == "chosen").sort("user_id")
    rejected = ratios.filter(pl.col("kind") == "rejected").sort("user_id")
    if chosen["user_id"].to_list() != rejected["user_id"].to_list():
        raise ValueError("log-ratio frame: chosen and rejected rows name different users")
    pairs = implicit_rewards(
        (chosen["logp_policy"].to_list(), chosen["logp_ref"].to_list()),
        (rejected["logp_policy"].to_list(), rejected["logp_ref"].to_list()),
        beta,
    )
    return {
        "kl_per_token": kl_estimate(
            own["logp_policy"].to_list(), own["logp_ref"].to_list(), own["n_tokens"].to_list()
        ),
        "kl_texts": own.height,
        "heldout_pair_accuracy": pairs["accuracy"],
        "heldout_pair_margin": pairs["margin"],
        "heldout_pairs": pairs["pairs"],
    }


def policy_record(
    index: int,
    scored: pl.DataFrame,
    round0: pl.DataFrame,
    *,
    reward_col: str,
    titles: Mapping[int, Sequence[str]],
    train_scored: pl.DataFrame | None = None,
) -> dict:
    """Policy ``index``'s figures from the scored samples it wrote (``scored``: ``user_id``,
    ``split``, ``text``, ``n_tokens`` and the reward columns) against policy 0's (``round0``):
    ``heldout`` (validation users) and ``train`` reward with, from policy 1 on, the paired
    difference to policy 0 (``vs_policy_0``),
    and the text figures of its validation samples. ``train_scored`` replaces the train rows of
    ``scored`` when given."""

    def split(frame: pl.DataFrame, name: str) -> pl.DataFrame:
        return frame.filter(pl.col("split") == name)

    record: dict = {"policy": index}
    for name, now, then in (
        ("heldout", split(scored, "valid"), split(round0, "valid")),
        (
            "train",
            split(train_scored if train_scored is not None else scored, "train"),
            split(round0, "train"),
        ),
    ):
        mine = user_rewards(now, reward_col)
        record[name] = {
            "reward": float(np.mean(list(mine.values()))) if mine else float("nan"),
            "users": len(mine),
            "samples": now.height,
        }
        if index > 0:
            record[name]["vs_policy_0"] = paired_user_difference(
                mine, user_rewards(then, reward_col)
            )
    record["text"] = text_figures(split(scored, "valid"), titles)
    return record


__all__ = [
    "distinct_2",
    "drift_figures",
    "example_texts",
    "heldout_pairs",
    "history_titles",
    "implicit_rewards",
    "kl_estimate",
    "names_history_title",
    "paired_user_difference",
    "policy_record",
    "text_figures",
    "user_rewards",
]
