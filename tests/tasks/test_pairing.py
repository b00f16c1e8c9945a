from __future__ import annotations

import polars as pl
import pytest

from tasks.pairing import PAIR_SCHEMA, PairingConfig, build_pairs, pair_schema


def _samples(rewards: dict[int, list[float]], empty: dict[int, list[bool]] | None = None):
    rows = []
    for uid, rs in rewards.items():
        for i, r in enumerate(rs):
            blank = (empty or {}).get(uid, [False] * len(rs))[i]
            text = "  " if blank else f"u{uid}s{i}"
            rows.append({"user_id": uid, "sample_idx": i, "text": text, "reward": r})
    return pl.DataFrame(rows)


def _cfg(strategy="best_worst", **kw) -> PairingConfig:
    return PairingConfig(strategy, reward_col="reward", **kw)


PROMPTS = pl.DataFrame({"user_id": [1, 2, 3], "prompt": ["p1", "p2", "p3"]})


def test_best_worst_drops_ties_and_small_margins() -> None:
    samples = _samples({1: [0.2, 0.9, 0.5, 0.1], 2: [0.4, 0.4, 0.4], 3: [0.50, 0.52]})
    pairs, stats = build_pairs(samples, PROMPTS, _cfg("best_worst", min_margin=0.05))
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert (row["chosen"], row["rejected"], row["prompt"]) == ("u1s1", "u1s3", "p1")
    assert row["margin"] == pytest.approx(0.8)
    assert (stats.users, stats.pairs, stats.dropped_tie, stats.dropped_margin) == (3, 1, 1, 1)
    assert stats.margin_mean == pytest.approx(0.8)


def test_all_pairs_counts() -> None:
    # rewards 0.3, 0.1, 0.3: ordered pairs with a positive margin: (0,1), (2,1); one tie (0,2)
    samples = _samples({1: [0.3, 0.1, 0.3]})
    pairs, stats = build_pairs(samples, PROMPTS, _cfg("all_pairs"))
    got = sorted(zip(pairs["chosen_idx"], pairs["rejected_idx"], strict=True))
    assert got == [(0, 1), (2, 1)]
    assert stats.dropped_tie == 1


def test_mu_2sigma_rejects_near_target() -> None:
    # mean 0.5, std 0.2828: target -0.066; nearest to it (excluding best) is 0.1 at index 3
    samples = _samples({1: [0.5, 0.9, 0.5, 0.1]})
    pairs, _ = build_pairs(samples, PROMPTS, _cfg("mu_2sigma"))
    assert pairs.row(0, named=True)["chosen_idx"] == 1
    assert pairs.row(0, named=True)["rejected_idx"] == 3


def test_empty_never_chosen() -> None:
    samples = _samples({1: [0.9, 0.5, 0.1]}, {1: [True, False, False]})
    pairs, _ = build_pairs(samples, PROMPTS, _cfg("best_worst"))
    assert pairs.row(0, named=True)["chosen_idx"] == 1
    all_bad = _samples({2: [0.9, 0.1]}, {2: [True, True]})
    pairs, stats = build_pairs(all_bad, PROMPTS, _cfg("best_worst"))
    assert pairs.height == 0 and stats.dropped_no_candidate == 1
    # all_pairs: the empty sample 0 (best reward) is only ever rejected
    pairs, _ = build_pairs(samples, PROMPTS, _cfg("all_pairs"))
    assert 0 not in pairs["chosen_idx"].to_list() and pairs.height == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="strategy"):
        build_pairs(_samples({1: [0.1, 0.2]}), PROMPTS, _cfg("best"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs(_samples({1: [0.1, 0.2]}), PROMPTS, _cfg(min_margin=-1))
    with pytest.raises(ValueError, match="key"):
        PairingConfig(key="item_id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        PairingConfig(max_pairs_per_prompt=0)


# --------------------------------------------------------------------------- shared rules


def test_defaults_are_rlrf4rec_and_schema_is_unchanged() -> None:
    cfg = PairingConfig()
    assert (cfg.strategy, cfg.min_margin, cfg.reward_col, cfg.key) == (
        "best_worst", 0.0, "ndcg_at_5", "user_id",
    )  # fmt: skip
    samples = _samples({1: [0.2, 0.9]}).rename({"reward": "ndcg_at_5"})
    pairs, _ = build_pairs(samples, PROMPTS)
    assert pairs.schema == pl.Schema(PAIR_SCHEMA)
    assert list(PAIR_SCHEMA) == [
        "user_id", "prompt", "chosen", "rejected", "chosen_idx", "rejected_idx",
        "chosen_reward", "rejected_reward", "margin",
    ]  # fmt: skip


def test_a_pair_at_exactly_the_margin_is_kept() -> None:
    samples = _samples({1: [1.0, 0.5, 0.75]})
    for strategy in ("best_worst", "all_pairs"):
        pairs, stats = build_pairs(samples, PROMPTS, _cfg(strategy, min_margin=0.5))
        assert (pairs.height, pairs["margin"][0]) == (1, 0.5), strategy
    _, stats = build_pairs(samples, PROMPTS, _cfg("all_pairs", min_margin=0.5))
    assert stats.dropped_margin == 2  # (0, 2) and (2, 1), 0.25 each


def test_identical_texts_never_pair() -> None:
    samples = _samples({1: [0.9, 0.1, 0.5]}).with_columns(
        pl.when(pl.col("sample_idx") == 1).then(pl.lit("u1s0")).otherwise("text").alias("text")
    )
    pairs, stats = build_pairs(samples, PROMPTS, _cfg("best_worst"))
    assert pairs.height == 0 and stats.dropped_identical == 1
    pairs, stats = build_pairs(samples, PROMPTS, _cfg("all_pairs"))
    assert sorted(zip(pairs["chosen_idx"], pairs["rejected_idx"], strict=True)) == [(0, 2), (2, 1)]
    assert stats.dropped_identical == 1


def test_max_pairs_per_prompt_keeps_the_largest_margins() -> None:
    samples = _samples({1: [0.5, 0.0, 0.5, 1.0]})
    pairs, stats = build_pairs(samples, PROMPTS, _cfg("all_pairs", max_pairs_per_prompt=2))
    assert pairs["margin"].to_list() == [1.0, 0.5]
    assert pairs.select("chosen_idx", "rejected_idx").rows() == [(3, 1), (0, 1)]
    assert stats.dropped_cap == 3 and stats.dropped_tie == 1


def test_direct_pipeline_pairs_per_window() -> None:
    """The second pipeline: answers per ``window_id``, the ``reward`` column, all_pairs."""
    scored = pl.DataFrame(
        [
            {"window_id": w, "user_id": 10 + w, "sample_idx": i, "text": t, "reward": s}
            for w, answers in {
                0: [("a", 0.5), ("b", 0.0), ("c", 0.5), ("d", 1.0)],
                1: [("x", 0.0), ("x", 0.0), ("y", 0.0)],  # all equal: no pair
            }.items()
            for i, (t, s) in enumerate(answers)
        ]
    )
    windows = pl.DataFrame({"window_id": [0, 1], "prompt": ["p0", "p1"]})
    cfg = PairingConfig.direct()
    assert (cfg.strategy, cfg.reward_col, cfg.key) == ("all_pairs", "reward", "window_id")
    pairs, _ = build_pairs(scored, windows, cfg)
    assert pairs.schema == pl.Schema(pair_schema("window_id"))
    # 6 pairs of 4 answers; (a, c) tie -> 5; the higher chosen; largest gap, then sample order
    assert pairs.select("chosen", "rejected").rows() == [
        ("d", "b"), ("a", "b"), ("d", "a"), ("c", "b"), ("d", "c"),
    ]  # fmt: skip
    assert (pairs["chosen_reward"] > pairs["rejected_reward"]).all()
    assert pairs["prompt"].unique().to_list() == ["p0"]
    bw, _ = build_pairs(scored, windows, PairingConfig.direct("best_worst"))
    assert bw.select("chosen", "rejected").rows() == [("d", "b")]
    margin, _ = build_pairs(scored, windows, PairingConfig.direct(min_margin=0.6))
    assert margin.select("chosen", "rejected").rows() == [("d", "b")]
    capped, _ = build_pairs(scored, windows, PairingConfig.direct(max_pairs_per_prompt=2))
    assert capped.height == 2 and capped["chosen"].to_list()[0] == "d"
