"""Scoring the second pipeline's answers: mapping, metrics, the reward, SFT examples, pair stats."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tasks.direct.scoring import (
    MAX_FORMAT_BONUS,
    NDCGReward,
    check_format_bonus,
    pair_stats,
    reward_of,
    score_answers,
    sft_examples,
)
from tasks.direct.title_mapping import Catalogue, MappingConfig, parse_answer
from tasks.pairing import PairingConfig, build_pairs

ITEMS = pl.DataFrame(
    {
        "item_id": [1, 2, 3, 4, 5, 6, 7],
        "title": [
            "Jaws (1975)",
            "Alien (1979)",
            "Psycho (1960)",
            "American President, The (1995)",
            "Heat (1995)",
            "Fargo (1996)",
            "Clerks (1994)",
        ],
    }
)

PROSE = "I am sorry, but I cannot recommend any movies because I do not know enough about you."


def windows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "window_id": [0, 1],
            "user_id": [10, 11],
            "prompt": ["p0", "p1"],
            "ground_truth_item_ids": [[1, 4], [5]],
            "ground_truth_titles": [["Jaws (1975)", "American President, The (1995)"], ["Heat"]],
            "context_item_ids": [[7], [6]],
        }
    )


def test_score_answers_and_reward():
    cat = Catalogue.from_items(ITEMS)
    samples = pl.DataFrame(
        {
            "window_id": [0, 0, 1],
            "sample_idx": [0, 1, 0],
            "text": ["['The American President', 'Jaws']", PROSE, "1. Fargo\n2. Heat"],
        }
    )
    scored, summary = score_answers(samples, windows(), cat)
    assert scored["ndcg"].to_list() == pytest.approx([1.0, 0.0, 1 / math.log2(3)])
    assert scored["reward"].to_list() == scored["ndcg"].to_list()  # no format bonus
    assert scored["format"].to_list() == ["list", "failed", "numbered"]
    assert scored["item_ids"].to_list()[0] == [4, 1]
    assert summary["parse_failures"] == 1 and summary["titles_parsed"] == 4
    # Fargo is in user 11's window: a repeat of the prompt, excluded at mapping by default
    assert summary["context_hits"] == 0 and summary["repeat_share"] == pytest.approx(1 / 3)
    assert scored["n_repeats"].to_list() == [0, 0, 1] and scored["item_ids"][2][0] != 6
    off = MappingConfig(exclude_context=False)
    assert score_answers(samples, windows(), cat, off)[1]["context_hits"] == 1
    reward = NDCGReward(cat)
    extra = {"ground_truth_item_ids": [[1, 4], [1, 4]], "context_item_ids": [[7], [7]]}
    values = reward(["p", "p"], ["['Jaws', 'Alien']", [{"role": "assistant", "content": "x"}]],
                    extra)  # fmt: skip
    assert values[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert values[1] == 0.0 or values[1] < 1.0


def test_format_bonus_breaks_ties_only():
    assert reward_of(0.5, 3) == 0.5
    assert reward_of(0.0, 5, format_bonus=MAX_FORMAT_BONUS) == pytest.approx(MAX_FORMAT_BONUS)
    assert reward_of(0.0, 9, 5, 0.005) == pytest.approx(0.005)  # at most k slots count
    check_format_bonus(MAX_FORMAT_BONUS)
    with pytest.raises(ValueError, match="format_bonus"):
        check_format_bonus(0.01)
    with pytest.raises(ValueError, match="format_bonus"):
        NDCGReward(Catalogue.from_items(ITEMS), format_bonus=-0.001)


def test_sft_examples_keep_titles_whole():
    ex = sft_examples(windows())
    assert ex.columns == ["prompt", "completion"]
    assert parse_answer(ex["completion"][0]).titles == [
        "Jaws (1975)",
        "American President, The (1995)",
    ]


def test_pair_stats_reads_the_shared_pair_schema():
    scored = pl.DataFrame(
        {
            "window_id": [0, 0, 0, 1, 1],
            "sample_idx": [0, 1, 2, 0, 1],
            "text": ["a", "b", "c", "x", "y"],
            "ndcg": [1.0, 0.0, 0.0, 0.0, 0.0],
            "reward": [1.0, 0.004, 0.0, 0.0, 0.0],
        }
    )
    pairs, _ = build_pairs(scored, windows(), PairingConfig.direct())
    stats = pair_stats(scored, pairs)
    assert stats["pairs"] == 3 and stats["prompts"] == 2 and stats["prompts_with_pairs"] == 1
    assert stats["prompts_all_zero"] == 1 and stats["answers"] == 5
    assert stats["mean_margin"] == pytest.approx((1.0 + 0.996 + 0.004) / 3)
    assert stats["pairs_ndcg_decided"] == 2  # (b, c) differ by the format bonus alone
    empty = pair_stats(scored, pairs.clear())
    assert empty["pairs"] == 0 and empty["mean_margin"] == 0.0


@pytest.mark.parametrize(
    "titles",
    [
        ["Devil's Advocate, The (1997)", "American President, The (1995)", "Jaws (1975)"],
        ["Pink Floyd - The Wall (1982)", "'Til There Was You (1997)", "M*A*S*H (1970)"],
        ["JLG/JLG - autoportrait de décembre (1994)", "I Can't Sleep (J'ai pas sommeil) (1994)",
         "Forbidden Christ, The (Cristo proibito, Il) (1950)", 'Dr. Strangelove or: How I '
         "Learned to Stop Worrying and Love the Bomb (1963)", "unknown"],
    ],
)  # fmt: skip
def test_the_parser_reads_the_sft_target_back_to_exactly_its_titles(titles):
    """SFT teaches the answer format: the parser must read every target back unchanged (real
    ML-100K titles with apostrophes, commas, dashes and parentheses)."""
    frame = windows().head(1).with_columns(pl.Series("ground_truth_titles", [titles]))
    target = sft_examples(frame)["completion"][0]
    parsed = parse_answer(target)
    assert parsed.titles == titles and parsed.fmt == "list"
