"""The second pipeline's report: the paper's Table 1 layout with our rows, the paper's numbers
beside, the mean and 95% CI over seeds, and a sample recommendation of every stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.stats import mean_ci
from tasks.common.io import atomic_path, write_json
from tasks.common.settings import settings_lines
from tasks.direct.windows import select

# The paper's Table 1 (MovieLens-100K, Llama-3.2-1B-Instruct), in %.
PAPER_TABLE1 = {
    "Base": {"ndcg@5": 0.624, "precision@5": 0.606, "recall@5": 0.512},
    "SFT": {"ndcg@5": 1.687, "precision@5": 1.818, "recall@5": 1.441},
    "DPO": {"ndcg@5": 1.726, "precision@5": 1.890, "recall@5": 1.497},
    "RLHF": {"ndcg@5": 1.821, "precision@5": 1.818, "recall@5": 1.489},
}
ROW_NAMES = {
    "base": "Base",
    "sft": "SFT",
    "dpo": "DPO",
    "rl": "RL (NDCG@5 reward)",
    "rlhf": "RLHF (reward model)",
    "popular": "Most popular",
    "item_knn": "Item-kNN",
}
PAPER_ROW = {"base": "Base", "sft": "SFT", "dpo": "DPO", "rl": "RLHF", "rlhf": "RLHF"}

METRICS = ("ndcg@5", "precision@5", "recall@5")
RATES = ("mapped_title_rate", "parse_failure_rate")


def summarise(per_seed: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Mean, 95% CI half-width and per-seed values of every metric of every row."""
    table: dict[str, dict[str, dict]] = {}
    for row, seeds in per_seed.items():
        table[row] = {}
        for metric in METRICS + RATES:
            values = [seeds[s].get(metric) for s in sorted(seeds)]
            values = [v for v in values if v is not None]
            mean, half = mean_ci(values) if values else (float("nan"), float("nan"))
            table[row][metric] = {
                "mean": mean,
                "ci95": half,
                "per_seed": {str(s): seeds[s].get(metric) for s in sorted(seeds)},
            }
    return table


def _pct(summary: dict, n_seeds: int) -> str:
    mean, half = summary["mean"], summary["ci95"]
    if mean is None or not math.isfinite(mean):
        return "-"
    if n_seeds > 1 and half is not None and math.isfinite(half):
        return f"{100 * mean:.3f} ± {100 * half:.3f}"
    return f"{100 * mean:.3f}"


def render_report(results: dict) -> str:
    """``report.md``: the paper's Table 1 layout with our rows, the paper's numbers beside."""
    table = results["table"]
    n_seeds = len(results["seeds"])
    ci = " (mean ± 95% CI over seeds)" if n_seeds > 1 else ""
    lines = [
        "# The second pipeline (You et al.) on " + results["dataset"],
        "",
        f"Policy `{results['policy']}`; {results['test_windows']} test users evaluated per seed; "
        f"seeds {', '.join(map(str, results['seeds']))}; profile `{results['profile']}`.",
        "",
        *settings_lines(results.get("settings", {})),
        f"## Table 1: metrics in %{ci}",
        "",
        "| Row | NDCG@5 | Precision@5 | Recall@5 | mapped-title rate | parse-failure rate "
        "| paper NDCG@5 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ("base", "sft", "dpo", "rl", "rlhf", "popular", "item_knn"):
        if row not in table:
            continue
        t = table[row]
        paper = PAPER_TABLE1.get(PAPER_ROW.get(row, ""), {}).get("ndcg@5")
        paper_txt = f"{paper:.3f}" if paper is not None else "-"
        if row == "rl":
            paper_txt += " (RLHF)"
        rates = [_pct(t[r], n_seeds) for r in RATES]
        if row in ("popular", "item_knn"):
            rates = ["n/a", "n/a"]
        lines.append(
            f"| {ROW_NAMES[row]} | "
            + " | ".join(_pct(t[m], n_seeds) for m in METRICS)
            + f" | {rates[0]} | {rates[1]} | {paper_txt} |"
        )
    lines += [
        "",
        "The paper's Table 1 (ML-100K, Llama-3.2-1B-Instruct, %): "
        + "; ".join(
            f"{row} NDCG@5 {v['ndcg@5']:.3f} / P@5 {v['precision@5']:.3f} / R@5 {v['recall@5']:.3f}"
            for row, v in PAPER_TABLE1.items()
        )
        + ".",
        "",
        "Mapped-title rate: distinct catalogue titles the answers' titles mapped to, over the "
        "titles parsed. Parse-failure rate: answers from which no title could be read. "
        "Duplicates after mapping count once; a title below the score cut-off is unmapped.",
    ]
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    stages = results.get("stages", {})
    if stages:
        lines += ["", "## Stage details (first seed)", ""]
        for name, info in stages.items():
            figures = ", ".join(f"{k} {v}" for k, v in info.items()) or "-"
            lines.append(f"- **{name}**: {figures}")
    timings = results.get("timings", {})
    if timings:
        lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines.append(f"| **wall (flow)** | {results.get('wall_seconds', 0.0):.1f} |")
    examples = results.get("examples") or []
    if examples:
        lines += ["", "## Sample recommendations (first test user, first seed)", ""]
        lines += ["| stage | answer (mapped titles) |", "|---|---|"]
        for stage, titles in examples:
            cell = "; ".join(t if t else "(unmapped/duplicate)" for t in titles) or "(none)"
            lines.append(f"| {stage} | {cell.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``report.md`` and ``results.json`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(render_report(results))
    write_json(plain(results), out / "results.json")
    return {"report": str(report), "results": str(out / "results.json")}


def example_rows(stage_paths: dict[str, str], windows: pl.DataFrame) -> list[tuple[str, list]]:
    """Ground truth and each stage's mapped answer for the first evaluated test window."""
    first = select(windows, "test", 1)
    if first.height == 0:
        return []
    wid = first["window_id"][0]
    out: list[tuple[str, list]] = [("ground truth", first["ground_truth_titles"][0].to_list())]
    for name, path in stage_paths.items():
        if not path or not Path(path).is_file():
            continue
        ans = pl.read_parquet(path).filter(pl.col("window_id") == wid)
        if ans.height:
            ids, matched = ans["item_ids"][0].to_list(), ans["matched"][0].to_list()
            shown = [m if i is not None else None for i, m in zip(ids, matched, strict=True)]
            out.append((name, shown))
    return out


def plain(obj: Any) -> Any:
    """JSON-safe copy (floats, ints, strings, lists, dicts; NaN kept as None)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return plain(obj.item())
    return str(obj)
