"""The second pipeline's report: Table 1 layout, mean and CI over seeds, JSON-safe results."""

from __future__ import annotations

import json
import math

import pytest

from tasks.direct.report import (
    paired_differences,
    plain,
    render_report,
    summarise,
    write_report,
)


def _table() -> dict:
    per_seed = {
        "base": {
            0: {
                "ndcg@5": 0.01,
                "precision@5": 0.02,
                "recall@5": 0.02,
                "mapped_title_rate": 0.5,
                "parse_failure_rate": 0.1,
            }
        },  # fmt: skip
        "sft": {0: {"ndcg@5": 0.02}, 1: {"ndcg@5": 0.04}},
        "popular": {0: {"ndcg@5": 0.05, "precision@5": 0.05, "recall@5": 0.05}},
    }
    return summarise(per_seed)


def test_report_layout():
    table = _table()
    assert table["sft"]["ndcg@5"]["mean"] == pytest.approx(0.03)
    # two seeds: t(0.975, df=1) = tan(0.475 pi) = 12.7062, sample std 0.01414214
    t = math.tan(0.475 * math.pi)
    assert table["sft"]["ndcg@5"]["ci95"] == pytest.approx(t * 0.01414214 / math.sqrt(2))
    text = render_report({"dataset": "ml-100k", "policy": "m", "profile": "quick",
                          "seeds": [0, 1], "test_windows": 3, "table": table})  # fmt: skip
    assert "| Base | 1.000 ± 0.000 | 2.000 ± 0.000 | 2.000 ± 0.000 | 50.000" in text
    assert "| SFT | 3.000 ± 12.706 |" in text and "| 1.687 |" in text
    assert "| Most popular | 5.000" in text and "n/a" in text


def test_write_report_is_json_safe(tmp_path):
    results = {"dataset": "ml-100k", "policy": "m", "profile": "quick", "seeds": [0],
               "test_windows": 1, "table": _table(), "notes": ["a note"]}  # fmt: skip
    paths = write_report(results, tmp_path)
    assert "## Notes" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"]["sft"]["precision@5"]["mean"] is None  # NaN written as null
    assert set(paths) == {"report", "results"}
    assert plain({1: (float("nan"), 2)}) == {"1": [None, 2]}


def _user(ndcg: float) -> dict:
    return {"ndcg@5": ndcg, "precision@5": ndcg / 2, "recall@5": 0.0}


def test_paired_differences_by_hand():
    """Each stage minus the stage it starts from, user by user, pooled over seeds."""
    per_user = {
        "base": {0: {"1": _user(0.0), "2": _user(0.2), "3": _user(0.0)}, 1: {"1": _user(0.5)}},
        "sft": {0: {"1": _user(0.3), "2": _user(0.2), "3": _user(0.1)}, 1: {"1": _user(0.5)}},
        "dpo": {0: {"1": _user(0.3), "2": _user(0.5), "3": _user(0.1)}},
    }
    diffs = paired_differences(per_user)
    assert set(diffs) == {"sft-base", "dpo-sft"}  # no RL row ran
    # SFT - Base: 0.3, 0.0, 0.1 (seed 0) and 0.0 (seed 1): mean 0.1; deviations 0.2, -0.1, 0,
    # -0.1 -> sample variance 0.06 / 3 = 0.02, sd 0.141421, se 0.0707107; t(0.975, 3) = 3.182446
    sft = diffs["sft-base"]["ndcg@5"]
    assert sft["n"] == 4 and sft["mean"] == pytest.approx(0.1)
    assert sft["ci95"] == pytest.approx(3.182446 * 0.0707107, rel=1e-5)
    assert sft["ci_low"] == pytest.approx(0.1 - 0.225032, abs=1e-6)
    # DPO - SFT (seed 0 only): 0, 0.3, 0: mean 0.1, variance 0.06 / 2 = 0.03, se 0.1; t = 4.302653
    dpo = diffs["dpo-sft"]["ndcg@5"]
    assert dpo["n"] == 3 and dpo["ci95"] == pytest.approx(0.4302653, rel=1e-6)
    assert diffs["dpo-sft"]["precision@5"]["mean"] == pytest.approx(0.05)  # halves, as built
    text = render_report({"dataset": "ml-100k", "policy": "m", "profile": "study",
                          "seeds": [0, 1], "test_windows": 3, "table": _table(),
                          "differences": diffs})  # fmt: skip
    assert "| SFT - Base | +10.000 [-12.503, +32.503] |" in text
    assert "| DPO - SFT | +10.000 [-33.027, +53.027] |" in text and "| 3 |" in text


def test_report_states_the_setup_and_two_example_users():
    examples = [
        {
            "user_id": 7,
            "rows": [("ground truth", ["Jaws (1975)"]), ("sft", ["Alien (1979)", None])],
        },
        {"user_id": 9, "rows": [("ground truth", ["Heat (1995)"]), ("sft", [])]},
    ]
    setup = {"you_et_al_exact": True, "exclude_context": True, "n_samples": 5,
             "temperature": 0.6, "top_p": 0.9, "pairing": "all_pairs", "rl_beta": 0.04,
             "rm_input": "answer"}  # fmt: skip
    text = render_report({"dataset": "ml-100k", "policy": "m", "profile": "study", "seeds": [0],
                          "test_windows": 2, "table": _table(), "examples": examples,
                          "setup": setup})  # fmt: skip
    assert "Test user 7:" in text and "Test user 9:" in text
    assert "| sft | Alien (1979); (unmapped/duplicate) |" in text and "| sft | (none) |" in text
    assert "You et al.'s code (--you-et-al-exact" in text and "are excluded at mapping" in text
    assert "KL coefficient 0.04 towards the SFT policy" in text
    assert "reads the answers alone (You et al.)" in text
    assert "| repeats the prompt |" in text
    off = render_report({"dataset": "ml-100k", "policy": "m", "profile": "quick", "seeds": [0],
                         "test_windows": 2, "table": _table(),
                         "setup": {**setup, "you_et_al_exact": False, "exclude_context": False,
                                   "rm_input": "prompt_answer"}})  # fmt: skip
    assert "this project's rules" in off and "seen movies included (You et al.)" in off
    assert "the (prompt, answer) conversations" in off
