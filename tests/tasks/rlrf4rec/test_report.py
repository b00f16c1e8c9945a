from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.rlrf4rec.report import build_tables, write_report


def _per_list(path: Path, values: list[float]) -> str:
    pl.DataFrame(
        {"list_id": list(range(len(values))), "map@5": values, "ndcg@5": values}
    ).write_parquet(path)
    return str(path)


def test_tables_and_files(tmp_path: Path) -> None:
    m = lambda x: {"map@5": x, "ndcg@5": x + 0.1}  # noqa: E731
    results = {
        "table1": {"dlcm": {
            "base": {"1": m(0.50), "2": m(0.52)},
            "KAR": {"1": m(0.55), "2": m(0.57)},
            "RLRF4Rec": {"1": m(0.60), "2": m(0.62)},
        }},
        "per_list": {"dlcm": {
            "KAR": {"1": _per_list(tmp_path / "k1.parquet", [0.5, 0.5, 0.5, 0.5])},
            "RLRF4Rec": {"1": _per_list(tmp_path / "r1.parquet", [0.6, 0.6, 0.7, 0.5])},
        }},
        "rounds": [
            {"round": 0},
            {"round": 1, "reward": {"ndcg_at_5_mean": 0.4, "tied_users": 3, "users": 10},
             "pairs": {"pairs": 5, "dropped_tie": 1},
             "eval": {"dlcm": {"map@5": 0.6, "ndcg@5": 0.7}}},
        ],
        "timings": {"prepare": 1.5},
        "settings": {"reward": "ndcg@5+auc", "knowledge_encoding": "answer"},
        "learning": [
            {"policy": 0, "heldout": {"reward": 0.40, "users": 9}, "train": {"reward": 0.41},
             "text": {"mean_words": 60.0, "distinct_2": 0.8, "history_title_share": 0.3},
             "examples": [{"user_id": 7, "text": "Likes  noir.", "reward": 0.5}]},
            {"policy": 1,
             "heldout": {"reward": 0.42, "users": 9,
                         "vs_policy_0": {"diff": 0.02, "ci_low": 0.01, "ci_high": 0.03}},
             "train": {"reward": 0.41,
                       "vs_policy_0": {"diff": 0.0, "ci_low": -0.01, "ci_high": 0.01}},
             "text": {"mean_words": 50.0, "distinct_2": 0.7, "history_title_share": 0.5},
             "drift": {"kl_per_token": 0.012, "heldout_pair_accuracy": 0.75,
                       "heldout_pair_margin": 0.001},
             "examples": [{"user_id": 7, "text": "Likes noir.", "reward": 0.6}]},
        ],
    }  # fmt: skip
    tables = build_tables(results)
    rl = tables["table1"]["dlcm"]["RLRF4Rec"]["map@5"]
    assert rl["mean"] == pytest.approx(0.61) and rl["n"] == 2
    assert rl["ci_low"] < 0.61 < rl["ci_high"]
    diff = tables["paired"]["dlcm"]["RLRF4Rec-KAR:map@5"]
    assert diff["mean_diff"] == pytest.approx(0.1)
    out = write_report(results, tmp_path / "out", {"profile": "quick", "rounds": 1})
    text = Path(out["report"]).read_text()
    assert "| DLCM | RLRF4Rec | " in text and "0.6100 ± " in text
    assert "RLRF4Rec-KAR:map@5 | +0.1000" in text
    assert "Table II" in text and "| 1 | 0.4000 | 3 of 10 | 5 | 1 |" in text
    # the learning section: held-out reward with its paired CI, drift, texts and examples
    assert "Reward `ndcg@5+auc`, knowledge encoding `answer`" in text
    assert (
        "| 1 | 0.4200 | +0.0200 [+0.0100, +0.0300] | 0.4100 | +0.0000 [-0.0100, +0.0100] |" in text
    )
    assert "| 0.01200 | 0.750 |" in text
    assert "- policy 0, user 7, reward 0.5000: Likes noir." in text
    assert Path(out["learning_plot"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(Path(out["results"]).read_text())
    assert saved["params"]["profile"] == "quick"


def test_report_states_the_test_set_degenerate_texts_and_skipped_rounds(tmp_path: Path) -> None:
    results = {
        "table1": {"dlcm": {"KAR": {"1": {"map@5": 0.5, "ndcg@5": 0.6}}}},
        "rounds": [
            {"round": 0, "generation": {"degenerate_share": 0.25}},
            {"round": 1, "generation": {"degenerate_share": 0.5},
             "dpo": {"skipped": 1, "skipped_reason": "no preference pairs"}},
        ],
        "data": {"splits": {"test": {"users": 94, "lists": 470}}},
    }  # fmt: skip
    out = write_report(results, tmp_path, {"profile": "quick"})
    text = Path(out["report"]).read_text()
    assert "Test set: 94 users, 470 lists. Mean over 1 seed(s)." in text
    assert text.count("94 users, 470 lists") >= 3  # Table I, Table II and the per-round table
    assert "| 25.0% |" in text and "| 50.0% |" in text
    assert "- Round 1: DPO skipped (no preference pairs)" in text


def test_one_round_plots_integer_ticks() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.rlrf4rec.report import integer_rounds

    fig, ax = plt.subplots()
    ax.plot([1], [0.5], marker="o")
    integer_rounds([ax], [1])
    fig.canvas.draw()
    assert list(ax.get_xticks()) == [1]
    fig2, ax2 = plt.subplots()
    ax2.plot([0, 1, 2], [0.5, 0.6, 0.7])
    integer_rounds([ax2], [0, 1, 2])
    assert list(ax2.get_xticks()) == [0, 1, 2]
    plt.close(fig)
    plt.close(fig2)
