"""The second pipeline's report: the paper's Table 1 layout with our rows, the paper's numbers
beside, the mean and 95% CI over seeds, the paired per-user 95% CI of each stage against the one
before it, and two example answers of every stage for the same two test users.
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
RATES = ("mapped_title_rate", "parse_failure_rate", "repeat_share")
# Each trained stage against the stage it starts from: the paired differences of the report.
DIFFERENCES = (("sft", "base"), ("dpo", "sft"), ("rl", "sft"), ("rlhf", "sft"))


def paired_differences(
    per_user: dict[str, dict[int, dict[str, dict[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and paired 95% CI of each stage minus the stage before it, per metric.

    ``per_user[stage][seed][user]`` holds that user's metrics (one test window per user). The
    differences are taken user by user within a seed (the same test windows), pooled over the
    seeds, and summarised with the Student-t interval of their mean (:func:`models.stats.mean_ci`
    on the differences: the paired t interval). Returns ``{"sft-base": {"ndcg@5": {"mean",
    "ci95", "ci_low", "ci_high", "n"}, ...}, ...}`` for the pairs both of whose stages ran.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for stage, before in DIFFERENCES:
        if stage not in per_user or before not in per_user:
            continue
        row: dict[str, dict[str, float]] = {}
        for metric in METRICS:
            diffs = []
            for seed in sorted(set(per_user[stage]) & set(per_user[before])):
                a, b = per_user[stage][seed], per_user[before][seed]
                diffs += [a[u][metric] - b[u][metric] for u in sorted(set(a) & set(b))]
            mean, half = mean_ci(diffs)
            row[metric] = {
                "mean": mean,
                "ci95": half,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "n": len(diffs),
            }
        out[f"{stage}-{before}"] = row
    return out


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
        "| repeats the prompt | paper NDCG@5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
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
            rates = ["n/a"] * len(RATES)
        lines.append(
            f"| {ROW_NAMES[row]} | "
            + " | ".join(_pct(t[m], n_seeds) for m in METRICS)
            + " | "
            + " | ".join(rates)
            + f" | {paper_txt} |"
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
        "Repeats the prompt: answers with at least one title that maps (before exclusion) to a "
        "movie of their own prompt. Duplicates after mapping count once; a title below the "
        "score cut-off is unmapped.",
    ]
    lines += _setup_lines(results)
    diffs = results.get("differences") or {}
    if diffs:
        lines += [
            "",
            "## Each stage against the stage it starts from (paired per test user, in %)",
            "",
            "Mean difference and 95% CI (paired t over the test users"
            + (", pooled over the seeds" if n_seeds > 1 else "")
            + "); an interval that holds 0 shows no difference at this size.",
            "",
            "| Difference | NDCG@5 | Precision@5 | Recall@5 | users |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in diffs.items():
            stage, before = name.split("-")
            cells = [_diff(row[m]) for m in METRICS]
            n = row[METRICS[0]]["n"]
            label = f"{ROW_NAMES[stage]} - {ROW_NAMES[before]}"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {n} |")
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
        lines += ["", "## Example answers (two test users, first seed)", ""]
        for ex in examples:
            lines += [f"Test user {ex['user_id']}:", "", "| stage | answer (mapped titles) |"]
            lines.append("|---|---|")
            for stage, titles in ex["rows"]:
                cell = "; ".join(t if t else "(unmapped/duplicate)" for t in titles) or "(none)"
                lines.append(f"| {stage} | {cell.replace('|', '/')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _diff(summary: dict) -> str:
    mean, low, high = summary["mean"], summary["ci_low"], summary["ci_high"]
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{100 * mean:+.3f} [{100 * low:+.3f}, {100 * high:+.3f}]"


def _setup_lines(results: dict) -> list[str]:
    """How this run departs from or follows You et al.: the lines under Table 1."""
    setup = results.get("setup") or {}
    if not setup:
        return []
    windows = (
        "You et al.'s code (--you-et-al-exact: a cut-off once 5 ratings >= 4 or 5 ratings <= 2 "
        "came up to it, ground truth strictly after it, movies newest first, their prompt with "
        "its 'Do not repeat' line)"
        if setup.get("you_et_al_exact")
        else "this project's rules (docs/design.md, section 3)"
    )
    exclusion = (
        "titles of the prompt's window and of every earlier rating of the user are excluded at "
        "mapping (a departure from You et al.; --no-exclude-context maps as they do)"
        if setup.get("exclude_context")
        else "titles map onto the whole catalogue, seen movies included (You et al.)"
    )
    rm = {
        "answer": "the answers alone (You et al.)",
        "prompt_answer": "the (prompt, answer) conversations",
    }.get(setup.get("rm_input", ""), str(setup.get("rm_input")))
    return [
        "",
        "## Setup",
        "",
        f"- Windows and prompt: {windows}.",
        f"- Mapping: {exclusion}.",
        "- DPO: pairs sampled from the SFT policy "
        f"(n {setup.get('n_samples')}, temperature {setup.get('temperature')}, top-p "
        f"{setup.get('top_p')}, pairing {setup.get('pairing')}); reference: the SFT policy.",
        f"- Online RL and RLHF: start from the SFT policy, KL coefficient {setup.get('rl_beta')} "
        "towards the SFT policy"
        + (" (no KL term)" if not setup.get("rl_beta") else "")
        + f"; RLHF's reward model reads {rm}.",
    ]


def write_report(results: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``report.md`` and ``results.json`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(render_report(results))
    write_json(plain(results), out / "results.json")
    return {"report": str(report), "results": str(out / "results.json")}


def example_rows(
    stage_paths: dict[str, str], windows: pl.DataFrame, n_users: int = 2
) -> list[dict]:
    """Ground truth and each stage's mapped answer for the first ``n_users`` test windows."""
    out: list[dict] = []
    test = select(windows, "test", n_users)
    answers = {
        name: pl.read_parquet(path)
        for name, path in stage_paths.items()
        if path and Path(path).is_file()
    }
    for row in test.head(n_users).iter_rows(named=True):
        rows: list[tuple[str, list]] = [("ground truth", list(row["ground_truth_titles"]))]
        for name, frame in answers.items():
            ans = frame.filter(pl.col("window_id") == row["window_id"])
            if ans.height:
                ids, matched = ans["item_ids"][0].to_list(), ans["matched"][0].to_list()
                shown = [m if i is not None else None for i, m in zip(ids, matched, strict=True)]
                rows.append((name, shown))
        out.append({"user_id": row["user_id"], "rows": rows})
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
