"""The learning measures, against values worked out by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tasks.rlrf4rec.learning import (
    distinct_2,
    drift_figures,
    example_texts,
    history_titles,
    implicit_rewards,
    kl_estimate,
    names_history_title,
    paired_user_difference,
    policy_record,
    text_figures,
    user_rewards,
)


def test_user_rewards_average_each_users_samples() -> None:
    scored = pl.DataFrame({"user_id": [2, 1, 1, 2, 3], "reward": [0.6, 0.4, 0.6, 0.6, None]})
    assert user_rewards(scored, "reward") == pytest.approx({1: 0.5, 2: 0.6})


def test_paired_difference_three_users() -> None:
    # diffs 0.1, 0.0, 0.2 (user 4 has no partner): mean 0.1, sd 0.1,
    # half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    now = {1: 0.5, 2: 0.6, 3: 0.9}
    then = {1: 0.4, 2: 0.6, 3: 0.7, 4: 0.1}
    got = paired_user_difference(now, then)
    assert got["n"] == 3
    assert got["diff"] == pytest.approx(0.1)
    assert got["ci_low"] == pytest.approx(0.1 - 0.248414, abs=1e-6)
    assert got["ci_high"] == pytest.approx(0.1 + 0.248414, abs=1e-6)
    assert math.isnan(paired_user_difference({1: 0.5}, {2: 0.5})["diff"])


def test_kl_estimate_per_token() -> None:
    # log-ratios 2 (4 tokens) and -1 (2 tokens): (2 - 1) / 6 tokens
    assert kl_estimate([-10.0, -6.0], [-12.0, -5.0], [4, 2]) == pytest.approx(1 / 6)
    assert kl_estimate([-3.0], [-3.0], [5]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        kl_estimate([-1.0], [-1.0, -2.0], [1])


def test_implicit_rewards_on_pairs() -> None:
    # beta 0.1: chosen rewards 0.1 * (1, -1), rejected 0.1 * (0, 1)
    got = implicit_rewards(([-5.0, -8.0], [-6.0, -7.0]), ([-9.0, -4.0], [-9.0, -5.0]), beta=0.1)
    assert got["pairs"] == 2
    assert got["accuracy"] == pytest.approx(0.5)  # the first pair is ordered, the second not
    assert got["margin"] == pytest.approx((0.1 - 0.0 + (-0.1 - 0.1)) / 2)
    tie = implicit_rewards(([-1.0], [-1.0]), ([-2.0], [-2.0]), beta=0.1)
    assert tie["accuracy"] == 0.5  # an unmoved policy is at chance


def test_distinct_2() -> None:
    # bigrams (a b) (b a) (a b) | (a b) (b c): 3 distinct of 5
    assert distinct_2(["a b a b", "A b c"]) == pytest.approx(3 / 5)
    assert distinct_2(["one", ""]) == 0.0


def test_history_titles_and_matching() -> None:
    history = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 12]})
    items = pl.DataFrame(
        {"item_id": [10, 11, 12], "title": ["Toy Story (1995)", "It (1990)", "Heat (1995)"]}
    )
    titles = history_titles(history, items)
    assert titles == {1: ["toy story"], 2: ["heat"]}  # "It" is too short to match safely
    assert names_history_title("I loved Toy Story, a lot.", titles[1])
    assert not names_history_title("Toy Storyline is not a film.", titles[1])
    assert not names_history_title("Action films with heat", titles[1])


def test_text_figures() -> None:
    samples = pl.DataFrame(
        {
            "user_id": [1, 2],
            "text": ["likes Toy Story a lot", "likes westerns"],
            "n_tokens": [6, 3],
        }
    )
    got = text_figures(samples, {1: ["toy story"], 2: ["heat"]})
    assert got["mean_tokens"] == 4.5
    assert got["mean_words"] == 3.5
    assert got["history_title_share"] == 0.5
    # (likes toy) (toy story) (story a) (a lot) | (likes westerns): 5 distinct of 5
    assert got["distinct_2"] == 1.0


def _scored(rewards: dict[tuple[int, str], list[float]]) -> pl.DataFrame:
    rows = []
    for (user, split), values in rewards.items():
        for k, v in enumerate(values):
            rows.append(
                {
                    "user_id": user,
                    "split": split,
                    "sample_idx": k,
                    "text": f"u{user} text {k}",
                    "n_tokens": 3,
                    "reward": v,
                }  # fmt: skip
            )
    return pl.DataFrame(rows)


def test_policy_record_pairs_users_with_policy_0() -> None:
    before = _scored({(1, "valid"): [0.2, 0.4], (2, "valid"): [0.5, 0.5], (3, "train"): [0.1]})
    after = _scored({(1, "valid"): [0.4, 0.6], (2, "valid"): [0.6, 0.6], (3, "train"): [0.3]})
    assert (
        "vs_policy_0"
        not in policy_record(0, before, before, reward_col="reward", titles={})["heldout"]
    )
    got = policy_record(1, after, before, reward_col="reward", titles={})
    held = got["heldout"]
    assert held["users"] == 2 and held["samples"] == 4
    assert held["reward"] == pytest.approx((0.5 + 0.6) / 2)
    assert held["vs_policy_0"]["diff"] == pytest.approx((0.2 + 0.1) / 2)
    assert got["train"]["vs_policy_0"]["diff"] == pytest.approx(0.2)
    # the last policy's train reward comes from other texts when given
    other = _scored({(3, "train"): [0.05]})
    last = policy_record(2, after, before, reward_col="reward", titles={}, train_scored=other)
    assert last["train"]["vs_policy_0"]["diff"] == pytest.approx(-0.05)
    examples = example_texts(after, [2], "reward")
    assert examples == [{"user_id": 2, "text": "u2 text 0", "reward": 0.6}]


def test_drift_figures() -> None:
    ratios = pl.DataFrame(
        {
            "kind": ["own", "own", "chosen", "rejected"],
            "user_id": [1, 2, 1, 1],
            "logp_policy": [-10.0, -6.0, -5.0, -9.0],
            "logp_ref": [-12.0, -5.0, -6.0, -9.0],
            "n_tokens": [4, 2, 3, 3],
        }
    )
    got = drift_figures(ratios, beta=0.1)
    assert got["kl_per_token"] == pytest.approx(1 / 6)
    assert got["heldout_pairs"] == 1 and got["heldout_pair_accuracy"] == 1.0
    assert got["heldout_pair_margin"] == pytest.approx(0.1)
