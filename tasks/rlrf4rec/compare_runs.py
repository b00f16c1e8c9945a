"""Compare the policies of several runs: ``python -m tasks.rlrf4rec.compare_runs RUN RUN [...]``.

Each run measures one policy on the same data with the same seeds and settings (``python -m
flows.iterate --rounds 0 --policy-model M``, see the README's "The loop"). The first run is the
reference. For every run the comparison gives:

- Table I's KAR row (knowledge of the run's policy) next to base and the profile+history text,
  with the run's own paired CIs of KAR - base and KAR - profile;
- KAR of the run - KAR of the reference, paired over the same test lists (per-list metrics
  averaged over reranker seeds, bootstrap over lists): the figure that says whether a policy's
  knowledge beats the reference's. Runs whose test lists differ are refused; the base rows of
  the runs should agree too (same data and seeds) and the table gives their largest
  difference;
- the reward diagnostics of the reward model trained on the run's texts;
- the round-0 knowledge texts (one per user): length, share cut at the token budget, distinct-2,
  share naming a title of the user's history, how much of them restates the prompt's list of
  factors, and the generation cost;
- the same users' texts from every run, side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from models.stats import paired_bootstrap_ci
from tasks.common.io import atomic_path
from tasks.rlrf4rec.learning import history_titles, text_figures
from tasks.rlrf4rec.prompts import instruction

METRICS = ("map@5", "ndcg@5")
NAN = float("nan")
MIN_RESTATED_FACTORS = 5
SENTENCE_END = re.compile(r"(?<=[.:!?])\s+")


def load_results(run: Path) -> dict:
    """The run's ``results.json`` (``params``, ``results``, ``tables``)."""
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run} a finished run's folder?)")
    return json.loads(path.read_text())


def per_list(run: Path, backbone: str, row: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(list_ids [lists], values [lists])``: ``metric`` of one Table I row on the test lists,
    averaged over the reranker seeds found in ``eval/<backbone>/<row>/seed*/``."""
    paths = sorted((run / "eval" / backbone / row).glob("seed*/per_list.parquet"))
    if not paths:
        raise FileNotFoundError(f"{run / 'eval' / backbone / row}: no seed*/per_list.parquet")
    frames = [pl.read_parquet(p).sort("list_id") for p in paths]
    ids = frames[0]["list_id"].to_numpy()
    for p, f in zip(paths[1:], frames[1:], strict=True):
        if not np.array_equal(f["list_id"].to_numpy(), ids):
            raise ValueError(f"{p}: its lists differ from {paths[0]}'s")
    return ids, np.mean(np.stack([f[metric].to_numpy() for f in frames]), axis=0)


def cross_run(
    reference: Path, other: Path, backbone: str, *, row: str = "KAR", metric: str = "ndcg@5"
) -> dict[str, float]:
    """Paired bootstrap CI of ``row`` in ``other`` minus ``row`` in ``reference`` over the test
    lists, plus ``base_max_abs_diff``: the largest per-list difference of their base rows."""
    ref_ids, ref_values = per_list(reference, backbone, row, metric)
    ids, values = per_list(other, backbone, row, metric)
    if not np.array_equal(ids, ref_ids):
        raise ValueError(
            f"{other} and {reference} are not measured on the same test lists "
            f"({ids.size} and {ref_ids.size} lists): same data and seed needed"
        )
    ci = paired_bootstrap_ci(values, ref_values)
    _, base_ref = per_list(reference, backbone, "base", metric)
    _, base_other = per_list(other, backbone, "base", metric)
    ci["base_max_abs_diff"] = float(np.max(np.abs(base_other - base_ref)))
    return ci


def prompt_factors(dataset: str) -> list[str]:
    """The factors the analysis instruction asks about, lower-cased ("genre", "director",
    "actors", "time period", ...): its "factors like ..." list split at commas, slashes and
    "and"."""
    found = re.search(r"factors like ([^()]*)", instruction(dataset, "kar"))
    if found is None:
        raise ValueError(f"the {dataset} instruction names no 'factors like ...' list")
    terms = re.split(r",|/|\band\b", found.group(1).lower())
    return [t.strip(" .") for t in terms if t.strip(" .")]


def restated_words(text: str, factors: Sequence[str]) -> int:
    """Words of ``text`` up to and including its first sentence that names at least
    :data:`MIN_RESTATED_FACTORS` of ``factors`` (the prompt's list read back); 0 without one."""
    sentences = SENTENCE_END.split(text)
    for k, sentence in enumerate(sentences):
        low = sentence.lower()
        if sum(f in low for f in factors) >= MIN_RESTATED_FACTORS:
            return sum(len(s.split()) for s in sentences[: k + 1])
    return 0


def knowledge_figures(run: Path, dataset: str = "ml-100k") -> dict[str, float]:
    """The round-0 knowledge texts (``round_00/samples.parquet``): ``texts``, ``cut_share`` (cut
    at the token budget), ``restating_share`` (share of texts that read the prompt's factor
    list back, :func:`restated_words`), ``restated_word_share`` (those words over all words),
    plus :func:`tasks.rlrf4rec.learning.text_figures`."""
    samples = pl.read_parquet(run / "round_00" / "samples.parquet")
    titles = history_titles(
        pl.read_parquet(run / "data" / "history.parquet"),
        pl.read_parquet(run / "data" / "items.parquet"),
    )
    out: dict[str, float] = {"texts": float(samples.height)}
    out["cut_share"] = float((samples["finish_reason"] == "length").mean())
    factors = prompt_factors(dataset)
    texts = samples["text"].to_list()
    restated = [restated_words(t, factors) for t in texts]
    words = sum(len(t.split()) for t in texts)
    out["restating_share"] = float(np.mean([r > 0 for r in restated])) if texts else 0.0
    out["restated_word_share"] = sum(restated) / words if words else 0.0
    out.update(text_figures(samples, titles))
    return out


def examples(run: Path, users: Sequence[int]) -> dict[int, str]:
    """The round-0 knowledge text of each of ``users`` (first sample)."""
    samples = pl.read_parquet(run / "round_00" / "samples.parquet")
    picked = samples.filter(pl.col("user_id").is_in(list(users))).sort("user_id", "sample_idx")
    return dict(
        picked.unique("user_id", keep="first", maintain_order=True)
        .select("user_id", "text")
        .iter_rows()
    )


def _ci(ci: dict | None) -> str:
    if not ci:
        return "n/a"
    return f"{ci['mean_diff']:+.4f} [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table1(runs: Sequence[Path], loaded: Sequence[dict], names: Sequence[str]) -> list[str]:
    lines = [
        "## Table I: KAR with each policy's knowledge (MAP@5 / NDCG@5)",
        "",
        "| policy | backbone | base | profile+history | KAR | KAR - base | KAR - profile |"
        " KAR - reference KAR | base rows differ by (max per list) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, data, name in zip(runs, loaded, names, strict=True):
        table1, paired = data["tables"]["table1"], data["tables"]["paired"]
        for backbone in sorted(table1):
            rows = table1[backbone]
            cells = [
                " / ".join(f"{rows[r][m]['mean']:.4f}" if r in rows else "n/a" for m in METRICS)
                for r in ("base", "profile", "KAR")
            ]
            cells += [
                " / ".join(_ci(paired[backbone].get(f"KAR-{b}:{m}")) for m in METRICS)
                for b in ("base", "profile")
            ]
            if run == runs[0]:
                cells += ["(reference)", ""]
            else:
                cis = [cross_run(runs[0], run, backbone, metric=m) for m in METRICS]
                cells += [
                    " / ".join(_ci(c) for c in cis),
                    f"{max(c['base_max_abs_diff'] for c in cis):.2g}",
                ]
            lines.append(f"| {name} | {backbone.upper()} | " + " | ".join(cells) + " |")
    n_lists = per_list(runs[0], sorted(loaded[0]["tables"]["table1"])[0], "KAR", "ndcg@5")[0].size
    test = loaded[0]["results"].get("data", {}).get("splits", {}).get("test", {})
    return lines + ["", f"{test.get('users', '?')} test users, {n_lists} lists."]


def _diagnostics(loaded: Sequence[dict], names: Sequence[str]) -> list[str]:
    lines = [
        "## Reward diagnostics (NDCG@5 reward of a reward model trained on the policy's texts)",
        "",
        "| policy | samples | changed, another user's text | mean abs. change | spread |"
        " pairs ordered alike (2nd seed) | knowledge ablation |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, name in zip(loaded, names, strict=True):
        diag = data["results"].get("reward_diagnostics") or {}
        col = diag.get("columns", {}).get("ndcg_at_5", {})
        swapped = col.get("swapped", {})
        abl = diag.get("knowledge_ablation")
        ablation = (
            f"{abl['diff']:+.4f} [{abl['ci_low']:+.4f}, {abl['ci_high']:+.4f}] ({abl['n']} users)"
            if abl
            else "n/a"
        )
        lines.append(
            f"| {name} | {swapped.get('n', 'n/a')} | {_pct(swapped.get('changed_share'))}"
            f" | {swapped.get('mean_abs_change', NAN):.4f}"
            f" | {col.get('spread', {}).get('ratio', NAN):.3f}"
            f" | {_pct(col.get('reliability', {}).get('pair_agreement'))} | {ablation} |"
        )
    return lines


def _texts(runs: Sequence[Path], loaded: Sequence[dict], names: Sequence[str]) -> list[str]:
    lines = [
        "## Round-0 knowledge texts and their cost",
        "",
        "| policy | texts | words | tokens | cut at the budget | distinct-2 |"
        " names a history title | restates the prompt's factors (texts / words) | seconds |"
        " generated tokens | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, data, name in zip(runs, loaded, names, strict=True):
        fig = knowledge_figures(run, data["params"].get("dataset", "ml-100k"))
        rounds = data["results"].get("rounds", [])
        gen = next((r.get("generation", {}) for r in rounds if r.get("round") == 0), {})
        # runs before generation_seconds: their sample_seconds, the same figure without a resume
        seconds = gen.get("generation_seconds", gen.get("sample_seconds", NAN))
        lines.append(
            f"| {name} | {fig['texts']:.0f} | {fig['mean_words']:.1f} | {fig['mean_tokens']:.1f}"
            f" | {_pct(fig['cut_share'])} | {fig['distinct_2']:.3f}"
            f" | {_pct(fig['history_title_share'])}"
            f" | {_pct(fig['restating_share'])} / {_pct(fig['restated_word_share'])}"
            f" | {seconds:.0f}"
            f" | {gen.get('generated_tokens', 'n/a')} | {gen.get('tokens_per_s', NAN):.1f} |"
        )
    return lines


def _examples(runs: Sequence[Path], names: Sequence[str], users: Sequence[int]) -> list[str]:
    lines = ["## The same users' knowledge"]
    texts = [examples(r, users) for r in runs]
    for user in users:
        lines += ["", f"### User {user}"]
        for name, by_user in zip(names, texts, strict=True):
            lines += ["", f"- **{name}**: " + by_user.get(user, "(no text)").replace("\n", " ")]
    return lines


def render(runs: Sequence[Path], users: Sequence[int]) -> str:
    """The comparison as markdown (see the module docstring)."""
    if len(runs) < 2:
        raise ValueError(f"need at least two runs to compare, got {len(runs)}")
    loaded = [load_results(r) for r in runs]
    names = [
        f"{d['params'].get('policy_model', '?')} ({r.name})"
        for r, d in zip(runs, loaded, strict=True)
    ]
    sections = [
        [
            f"Reference: {names[0]}. Per-list metrics averaged over reranker seeds; paired "
            "bootstrap 95% CIs over the test lists."
        ],
        _table1(runs, loaded, names),
        _diagnostics(loaded, names),
        _texts(runs, loaded, names),
    ]
    if users:
        sections.append(_examples(runs, names, users))
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.rlrf4rec.compare_runs",
        description="Compare the policies of finished runs (same data, seed and settings; "
        "typically `python -m flows.iterate --rounds 0 --policy-model M`). The first run is the "
        "reference that every other run's KAR row is compared with, list by list.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument(
        "--users",
        type=int,
        nargs="*",
        default=[1, 2],
        help="user ids whose knowledge texts are shown side by side (default 1 2)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    try:
        text = render(args.runs, args.users)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare_runs: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
