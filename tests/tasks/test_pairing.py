from __future__ import annotations

import polars as pl
import pytest

from tasks.pairing import build_pairs


def _samples(rewards: dict[int, list[float]], empty: dict[int, list[bool]] | None = None):
    rows = []
    for uid, rs in rewards.items():
        for i, r in enumerate(rs):
            blank = (empty or {}).get(uid, [False] * len(rs))[i]
            text = "  " if blank else f"u{uid}s{i}"
            rows.append({"user_id": uid, "sample_idx": i, "text": text, "reward": r})
    return pl.DataFrame(rows)


PROMPTS = pl.DataFrame({"user_id": [1, 2, 3], "prompt": ["p1", "p2", "p3"]})


def test_best_worst_drops_ties_and_small_margins() -> None:
    samples = _samples({1: [0.2, 0.9, 0.5, 0.1], 2: [0.4, 0.4, 0.4], 3: [0.50, 0.52]})
    pairs, stats = build_pairs(samples, PROMPTS, "best_worst", min_margin=0.05)
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"], row["prompt"]) == ("u1s1", "u1s3", "p1")
    assert row["margin"] == pytest.approx(0.8)
    assert (stats.users, stats.pairs, stats.dropped_tie, stats.dropped_margin) == (3, 1, 1, 1)
    assert stats.margin_mean == pytest.approx(0.8)


def test_all_pairs_counts() -> None:
    # rewards 0.3, 0.1, 0.3: ordered pairs with a positive margin: (0,1), (2,1); one tie (0,2)
    samples = _samples({1: [0.3, 0.1, 0.3]})
    pairs, stats = build_pairs(samples, PROMPTS, "all_pairs")
    got = sorted(zip(pairs["chosen_idx"], pairs["rejected_idx"], strict=True))
    assert got == [(0, 1), (2, 1)]
    assert stats.dropped_tie == 1


def test_mu_2sigma_rejects_near_target() -> None:
    # mean 0.5, std 0.2828: target -0.066; nearest to it (excluding best) is 0.1 at index 3
    samples = _samples({1: [0.5, 0.9, 0.5, 0.1]})
    pairs, _ = build_pairs(samples, PROMPTS, "mu_2sigma")
    assert pairs.row(0, named=True)["chosen_idx"] == 1
    assert pairs.row(0, named=True)["rejected_idx"] == 3


def test_empty_never_chosen() -> None:
    samples = _samples({1: [0.9, 0.5, 0.1]}, {1: [True, False, False]})
    pairs, _ = build_pairs(samples, PROMPTS, "best_worst")
    assert pairs.row(0, named=True)["chosen_idx"] == 1
    all_bad = _samples({2: [0.9, 0.1]}, {2: [True, True]})
    pairs, stats = build_pairs(all_bad, PROMPTS, "best_worst")
    assert pairs.height == 0 and stats.dropped_no_candidate == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="strategy"):
        build_pairs(_samples({1: [0.1, 0.2]}), PROMPTS, "best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs(_samples({1: [0.1, 0.2]}), PROMPTS, min_margin=-1)
