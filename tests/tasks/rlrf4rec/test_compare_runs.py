"""Comparing two runs' policies on tiny run folders, against values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.rlrf4rec.compare_runs import (
    cross_run,
    knowledge_figures,
    main,
    prompt_factors,
    restated_words,
)

LISTS = [10, 11, 12, 13]


def _per_list(path: Path, values: list[float], lists: list[int] = LISTS) -> None:
    path.mkdir(parents=True)
    pl.DataFrame(
        {"list_id": lists, "user_id": [1] * len(lists), "map@5": values, "ndcg@5": values}
    ).write_parquet(path / "per_list.parquet")


def _run(
    root: Path, name: str, kar: list[list[float]], texts: list[str], lists: list[int] = LISTS
) -> Path:
    """A run folder with base, profile and KAR rows (one parquet per seed), round-0 texts of
    users 1 and 2, their histories, and a results.json like the flow's."""
    run = root / name
    for backbone in ("dlcm",):
        _per_list(run / "eval" / backbone / "base" / "seed1", [0.5] * len(lists), lists)
        _per_list(run / "eval" / backbone / "profile" / "seed1", [0.6] * len(lists), lists)
        for seed, values in enumerate(kar, start=1):
            _per_list(run / "eval" / backbone / "KAR" / f"seed{seed}", values, lists)
    (run / "round_00").mkdir()
    pl.DataFrame(
        {
            "user_id": [1, 2],
            "sample_idx": [0, 0],
            "text": texts,
            "n_tokens": [4, 8],
            "finish_reason": ["stop", "length"],
        }
    ).write_parquet(run / "round_00" / "samples.parquet")
    (run / "data").mkdir()
    pl.DataFrame({"user_id": [1, 2], "item_id": [100, 101]}).write_parquet(
        run / "data" / "history.parquet"
    )
    pl.DataFrame({"item_id": [100, 101], "title": ["Heat (1995)", "Fargo (1996)"]}).write_parquet(
        run / "data" / "items.parquet"
    )
    row = {"mean": 0.5}
    ci = {"mean_diff": 0.01, "ci_low": 0.0, "ci_high": 0.02}
    results = {
        "params": {"policy_model": name},
        "results": {"rounds": [{"round": 0, "generation": {"sample_seconds": 2.0}}]},
        "tables": {
            "table1": {"dlcm": {r: {"map@5": row, "ndcg@5": row} for r in ("base", "KAR")}},
            "paired": {"dlcm": {f"KAR-base:{m}": ci for m in ("map@5", "ndcg@5")}},
        },
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_cross_run_pairs_seed_means_list_by_list(tmp_path: Path) -> None:
    # reference KAR: seeds [.5 .5 .5 .5] and [.7 .7 .7 .7] -> .6 per list;
    # other KAR: one seed [.6 .7 .8 .9] -> diffs 0, .1, .2, .3, mean .15
    ref = _run(tmp_path, "ref", [[0.5] * 4, [0.7] * 4], ["a", "b"])
    other = _run(tmp_path, "other", [[0.6, 0.7, 0.8, 0.9]], ["a", "b"])
    got = cross_run(ref, other, "dlcm", metric="ndcg@5")
    assert got["n"] == 4
    assert got["mean_diff"] == pytest.approx(0.15)
    # bootstrap means of four diffs in [0, .3] lie in [0, .3]
    assert 0.0 <= got["ci_low"] < 0.15 < got["ci_high"] <= 0.3
    assert got["base_max_abs_diff"] == 0.0


def test_cross_run_refuses_runs_on_other_lists(tmp_path: Path) -> None:
    ref = _run(tmp_path, "ref", [[0.5] * 4], ["a", "b"])
    other = _run(tmp_path, "other", [[0.5] * 4], ["a", "b"], lists=[10, 11, 12, 14])
    with pytest.raises(ValueError, match="same test lists"):
        cross_run(ref, other, "dlcm")


def test_knowledge_figures_count_cut_texts_and_history_titles(tmp_path: Path) -> None:
    # user 1 names "heat" (its own history), user 2 names "heat" (not its history: fargo)
    run = _run(tmp_path, "r", [[0.5] * 4], ["They love Heat a lot", "Heat and more heat x y z"])
    fig = knowledge_figures(run)
    assert fig["texts"] == 2
    assert fig["cut_share"] == 0.5
    assert fig["history_title_share"] == 0.5
    assert fig["mean_words"] == pytest.approx((5 + 7) / 2)
    assert fig["mean_tokens"] == pytest.approx(6.0)


def test_prompt_factors_are_the_movie_instructions_list() -> None:
    assert prompt_factors("ml-100k") == [
        "genre", "director", "actors", "time period", "country", "character", "plot", "theme",
        "mood", "tone", "critical acclaim", "award", "production quality", "soundtrack",
    ]  # fmt: skip


def test_restated_words_count_up_to_the_sentence_that_reads_the_factor_list_back() -> None:
    factors = prompt_factors("ml-100k")
    # sentence 1: 4 words; sentence 2 names genre, director, plot, mood, soundtrack (5): 8 words
    text = "Here is my analysis. I weigh genre, director, plot, mood and soundtrack. Likes heat."
    assert restated_words(text, factors) == 4 + 8
    # four factors are not a restatement
    assert restated_words("I weigh genre, director, plot and mood. Likes heat.", factors) == 0


def test_knowledge_figures_share_of_texts_and_words_restating_the_prompt(tmp_path: Path) -> None:
    restating = "Factors: genre, plot, theme, mood, tone. Heat."  # 7 words, the first 6 restated
    run = _run(tmp_path, "r", [[0.5] * 4], [restating, "They love Fargo a lot"])  # 5 words
    fig = knowledge_figures(run)
    assert fig["restating_share"] == 0.5
    assert fig["restated_word_share"] == pytest.approx(6 / (7 + 5))


def test_main_writes_the_comparison_and_names_a_missing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = _run(tmp_path, "ref", [[0.5] * 4], ["ref text one", "ref text two"])
    other = _run(tmp_path, "other", [[0.6] * 4], ["other text one", "other text two"])
    out = tmp_path / "cmp.md"
    assert main([str(ref), str(other), "--users", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "+0.1000 [+0.1000, +0.1000]" in text  # other KAR - ref KAR, every list +0.1
    assert "ref text two" in text and "other text two" in text and "ref text one" not in text
    assert main([str(ref), str(tmp_path / "missing")]) == 2
    assert "missing/results.json: no such file" in capsys.readouterr().err
