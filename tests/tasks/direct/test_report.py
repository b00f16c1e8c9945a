"""The second pipeline's report: Table 1 layout, mean and CI over seeds, JSON-safe results."""

from __future__ import annotations

import json
import math

import pytest

from tasks.direct.report import plain, render_report, summarise, write_report


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
