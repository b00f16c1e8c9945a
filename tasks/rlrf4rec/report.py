"""The run's report: Table I, Table II, the per-round curve (Fig. 4), as markdown, JSON and PNG.

Input is the ``results`` dict the flow assembles:

- ``table1[backbone][row][seed]`` = metrics dict (``map@5``, ``ndcg@5``, ...) on the test users,
  ``row`` in ``base`` (no knowledge), ``KAR`` (round-0 zero-shot knowledge), ``RLRF4Rec``
  (knowledge of the final policy);
- ``per_list[backbone][row][seed]`` = path of the per-list metrics parquet (for paired CIs);
- ``rounds`` = one dict per round with at least ``round``; optional ``reward`` (sample reward
  stats), ``pairs``, ``dpo``, ``generation`` and ``eval[backbone]`` (test metrics of that
  round's policy);
- ``data`` (optional) = the prepared data's counts, ``splits.test.users`` / ``.lists`` the test
  set every table is measured on.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from models.stats import paired_bootstrap_ci, seed_summary
from tasks.common.io import atomic_path, write_json
from tasks.common.settings import settings_lines

ROWS = ("base", "profile", "KAR", "RLRF4Rec")
# The profile row reads the profile-and-history text the policy reads, without an answer.
ROW_LABELS = {"profile": "profile+history text"}
KS = (1, 3, 5, 7)
HEADLINE = ("map@5", "ndcg@5")


def summarise(values: list[float]) -> dict:
    """Mean, std and the Student-t 95% CI over seeds (:func:`models.stats.seed_summary`)."""
    return seed_summary(values)


def paired_ci(base_paths: list[str], new_paths: list[str], metric: str) -> dict | None:
    """Paired bootstrap CI of ``new - base`` on per-list metrics averaged over seeds."""
    if not base_paths or not new_paths:
        return None

    def per_list(paths: list[str]) -> np.ndarray:
        frames = [pl.read_parquet(p).sort("list_id")[metric].to_numpy() for p in paths]
        return np.mean(np.stack(frames), axis=0)

    return paired_bootstrap_ci(per_list(new_paths), per_list(base_paths))


def _fmt(summary: dict) -> str:
    if summary.get("n", 1) > 1 and math.isfinite(summary.get("ci_low", math.nan)):
        half = (summary["ci_high"] - summary["ci_low"]) / 2
        return f"{summary['mean']:.4f} ± {half:.4f}"
    return f"{summary['mean']:.4f}"


def build_tables(results: dict) -> dict:
    """Summaries per backbone/row/metric and paired CIs of RLRF4Rec - KAR and KAR - base."""
    out: dict = {"table1": {}, "paired": {}}
    for backbone, rows in results.get("table1", {}).items():
        out["table1"][backbone] = {}
        for row, by_seed in rows.items():
            metrics = sorted({m for v in by_seed.values() for m in v})
            out["table1"][backbone][row] = {
                m: summarise([float(v[m]) for v in by_seed.values() if m in v]) for m in metrics
            }
        lists = results.get("per_list", {}).get(backbone, {})
        for new, base in (
            ("RLRF4Rec", "KAR"),
            ("KAR", "base"),
            ("RLRF4Rec", "base"),
            ("profile", "base"),
            ("KAR", "profile"),
            ("RLRF4Rec", "profile"),
        ):
            for metric in HEADLINE:
                ci = paired_ci(
                    list(lists.get(base, {}).values()), list(lists.get(new, {}).values()), metric
                )
                if ci is not None:
                    out["paired"].setdefault(backbone, {})[f"{new}-{base}:{metric}"] = ci
    return out


def markdown(results: dict, tables: dict, params: dict | None = None) -> str:
    """The report as markdown."""
    lines = ["# RLRF4Rec run report", ""]
    if params:
        keys = ("profile", "dataset", "policy_model", "encoder", "rounds", "n_samples", "seeds")
        lines.append(" · ".join(f"{k}: `{params[k]}`" for k in keys if k in params))
        lines.append("")
    lines += settings_lines(results.get("settings", {}).get("run", {}))
    lines += components_lines(results.get("settings", {}))
    seeds = {len(v) for b in results.get("table1", {}).values() for v in b.values()}
    n_seeds = max(seeds) if seeds else 0
    test_set = test_set_size(results)
    lines += [
        "## Table I: test users, reranking metrics",
        "",
        f"{test_set} Mean over {n_seeds} seed(s)"
        + (" ± half-width of the 95% CI." if n_seeds > 1 else "."),
        "",
    ]
    metric_cols = [f"map@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
    lines.append("| backbone | knowledge | " + " | ".join(m.upper() for m in metric_cols) + " |")
    lines.append("|---|---|" + "---|" * len(metric_cols))
    for backbone, rows in tables["table1"].items():
        for row in ROWS:
            if row not in rows:
                continue
            cells = [_fmt(rows[row][m]) if m in rows[row] else "" for m in metric_cols]
            label = ROW_LABELS.get(row, row)
            lines.append(f"| {backbone.upper()} | {label} | " + " | ".join(cells) + " |")
    if tables["paired"]:
        lines += ["", "Paired bootstrap over test lists (difference, 95% CI):", ""]
        lines.append("| backbone | comparison | difference | 95% CI |")
        lines.append("|---|---|---|---|")
        for backbone, comps in tables["paired"].items():
            for name, ci in comps.items():
                lines.append(
                    f"| {backbone.upper()} | {name} | {ci['mean_diff']:+.4f} | "
                    f"[{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}] |"
                )
    first = next(iter(tables["table1"]), None)
    if first:
        rows = tables["table1"][first]
        lines += ["", f"## Table II: ablation ({first.upper()}, NDCG@5)", "", test_set, ""]
        lines += ["| method | NDCG@5 |", "|---|---|"]
        for label, row in (
            ("RLRF4Rec", "RLRF4Rec"),
            ("RLRF4Rec (w/o knowledge)", "base"),
            ("RLRF4Rec (w/o DPO) = round-0 knowledge", "KAR"),
        ):
            if row in rows and "ndcg@5" in rows[row]:
                lines.append(f"| {label} | {_fmt(rows[row]['ndcg@5'])} |")
    rounds = results.get("rounds", [])
    if rounds:
        lines += ["", "## Per round (Fig. 4)", ""]
        lines += [
            "Reward and pairs: the round's sampled train users; degenerate: the share of the "
            f"round's texts cut at the token budget; test NDCG@5 / MAP@5: {_lower(test_set)}",
            "",
        ]
        lines.append(
            "| round | reward NDCG@5 mean | users tied on NDCG@5 | pairs kept | dropped | "
            "chosen-rejected margin | DPO loss | reward acc. | mean tokens | degenerate | "
            "tokens/s | test NDCG@5 | test MAP@5 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rounds:
            rew = r.get("reward", {})
            pairs = r.get("pairs", {})
            dpo = r.get("dpo", {})
            gen = r.get("generation", {})
            ev = next(iter(r.get("eval", {}).values()), {})
            dropped = sum(pairs.get(k, 0) for k in ("dropped_tie", "dropped_margin"))
            lines.append(
                f"| {r['round']} | {_num(rew.get('ndcg_at_5_mean'))} |"
                f" {_tied(rew)} | {pairs.get('pairs', '')} |"
                f" {dropped if pairs else ''} | {_num(pairs.get('margin_mean'))} |"
                f" {_num(dpo.get('loss'))} | {_num(dpo.get('rewards/accuracies'))} |"
                f" {_num(gen.get('mean_tokens'), 1)} | {_share(gen.get('degenerate_share'))} |"
                f" {_num(gen.get('tokens_per_s'), 1)} |"
                f" {_num(ev.get('ndcg@5'))} | {_num(ev.get('map@5'))} |"
            )
        skipped = skipped_rounds(rounds)
        if skipped:
            lines += [""] + [f"- Round {r}: DPO skipped ({why}); the policy stays as it was."
                             for r, why in skipped]  # fmt: skip
        lines += ["", "![per-round curve](fig4_rounds.png)"]
    lines += learning_section(results)
    lines += diagnostics_section(results.get("reward_diagnostics"))
    timings = results.get("timings")
    if timings:
        lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
        for name, sec in timings.items():
            lines.append(f"| {name} | {sec:.1f} |")
    lines += stages_section(results.get("stages") or [])
    return "\n".join(lines) + "\n"


def stages_section(stages: list[dict]) -> list[str]:
    """Which stages this start ran (and why) and which it served from their manifests, with
    the seconds each took when it was made."""
    if not stages:
        return []
    ran = [s for s in stages if not s.get("cached")]
    served = [s for s in stages if s.get("cached")]
    lines = [
        "",
        "## Stages of this start",
        "",
        f"{len(ran)} ran, {len(served)} served from their manifests (made in "
        f"{sum(float(s.get('seconds') or 0) for s in served):.1f} s by an earlier start). "
        "Seconds: what the stage took when it was made.",
        "",
        "| stage | output | this start | seconds |",
        "|---|---|---|---|",
    ]
    for s in stages:
        state = "served (made earlier)" if s.get("cached") else f"ran: {s.get('why') or ''}"
        lines.append(
            f"| {s['stage']} | `{s['out']}` | {state} | {float(s.get('seconds') or 0):.1f} |"
        )
    return lines


def test_set_size(results: dict) -> str:
    """``Test set: 94 users, 470 lists.`` from the prepared data's counts (else ``""``)."""
    test = results.get("data", {}).get("splits", {}).get("test", {})
    if not test:
        return ""
    return f"Test set: {test.get('users', '?')} users, {test.get('lists', '?')} lists."


def _lower(text: str) -> str:
    return (text[0].lower() + text[1:]) if text else "the test users."


def skipped_rounds(rounds: list[dict]) -> list[tuple[int, str]]:
    """``(round, why)`` of every round whose DPO was skipped."""
    out = []
    for r in rounds:
        dpo = r.get("dpo", {})
        if dpo.get("skipped"):
            out.append((r["round"], str(dpo.get("skipped_reason") or "no reason recorded")))
    return out


def _share(v: object) -> str:
    if isinstance(v, int | float) and math.isfinite(v):
        return f"{100 * v:.1f}%"
    return ""


def _tied(reward: dict) -> str:
    if "tied_users" not in reward or not reward.get("users"):
        return ""
    return f"{reward['tied_users']} of {reward['users']}"


def components_lines(settings: dict) -> list[str]:
    """One line naming the encoder, the item knowledge, the reranker settings and the decoding
    of the knowledge texts the rerankers read (empty for results without them)."""
    if "item_knowledge" not in settings:
        return []
    items, rr = settings["item_knowledge"], settings["reranker"]
    dec = settings["knowledge_decoding"]
    source = items["source"]
    if source == "llm":
        what = (
            f"the base policy's greedy answers to KAR's item prompt (at most "
            f"{items['max_new_tokens']} tokens, mean {items['mean_tokens']:.0f}, "
            f"{100 * items['degenerate_share']:.0f}% cut at the budget), answer only"
        )
    elif source == "title":
        what = "title and genres"
    else:
        what = f"the file `{source}`"
    if items.get("from_knowledge") and items.get("from_title"):
        what += (
            f"; {items['from_knowledge']} of {items['items']} items from it, the other "
            f"{items['from_title']} from title and genres"
        )
    temperature = dec["temperature"]
    decoding = "greedy" if temperature == 0 else f"temperature {temperature}, top-p {dec['top_p']}"
    return [
        f"Encoder `{settings['encoder']}`. Item knowledge: {what}. Rerankers: "
        f"`{rr['settings']}` settings (arch `{rr['arch']}`, dropout {rr['dropout']}, up to "
        f"{rr['epochs']} epochs, lr {rr['lr']}, batch {rr['batch_size']} lists). Knowledge texts "
        f"of the KAR and RLRF4Rec rows: {decoding}, at most {dec['max_new_tokens']} tokens.",
        "",
    ]


def _diff(d: dict | None) -> str:
    if not d or not math.isfinite(d.get("diff", math.nan)):
        return ""
    return f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def learning_section(results: dict) -> list[str]:
    """The held-out reward per policy, with what the policy writes and how far it moved."""
    records = results.get("learning") or []
    if not records:
        return []
    settings = results.get("settings", {})
    first = records[0]
    lines = [
        "",
        "## Learning: what each round's policy writes, scored by the frozen reward model",
        "",
        f"Reward `{settings.get('reward', 'ndcg@5')}`"
        + (" (a diagnostic, not the paper's reward)" if settings.get("reward") == "genres" else "")
        + ", knowledge encoding "
        f"`{settings.get('knowledge_encoding', 'kar')}`, round train users: "
        f"{settings.get('round_train_users', 'all')}. Policy r wrote round r+1's samples (the "
        "last policy: N more texts per validation user, and its knowledge text per train user). "
        f"Held-out: {first['heldout']['users']} validation users, who never enter a DPO pair; "
        "differences to policy 0 are paired by user, with the Student-t 95% CI. KL: mean "
        "per-token log-ratio of the policy to the base model on its own validation texts "
        "(nats); pair accuracy: DPO's implicit reward on the best/worst pairs of the previous "
        "policy's validation texts.",
        "",
        "| policy | held-out reward | vs policy 0 | train reward | vs policy 0 | KL/token | "
        "pair acc. | pair margin | words | distinct-2 | names a history title |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        held, train, text = rec["heldout"], rec["train"], rec["text"]
        drift = rec.get("drift", {})
        later = bool(rec["policy"])
        lines.append(
            f"| {rec['policy']} | {_num(held['reward'])} |"
            f" {_diff(held['vs_policy_0']) if later else ''} |"
            f" {_num(train['reward'])} | {_diff(train['vs_policy_0']) if later else ''} |"
            f" {_num(drift.get('kl_per_token'), 5)} |"
            f" {_num(drift.get('heldout_pair_accuracy'), 3)} |"
            f" {_num(drift.get('heldout_pair_margin'), 5)} | {_num(text['mean_words'], 1)} |"
            f" {_num(text['distinct_2'], 3)} | {_num(text['history_title_share'], 3)} |"
        )
    lines += ["", "Example texts (the same two validation users every round):", ""]
    for rec in records:
        for ex in rec.get("examples", []):
            text = " ".join(ex["text"].split())
            lines.append(
                f"- policy {rec['policy']}, user {ex['user_id']}, reward {ex['reward']:.4f}: "
                f"{text[:400]}{'…' if len(text) > 400 else ''}"
            )
    lines += ["", "![held-out reward](learning.png)"]
    return lines


COLUMN_NAMES = {
    "ndcg_at_5": "NDCG@5",
    "map_at_5": "MAP@5",
    "soft_auc": "soft-AUC",
    "ndcg_at_5_auc": "NDCG@5 + soft-AUC",
    "genre_share": "genre share (diagnostic)",
}


def diagnostics_section(diag: dict | None) -> list[str]:
    """Does the reward read the text? (:mod:`tasks.rlrf4rec.reward_diagnostics`)"""
    if not diag:
        return []
    seconds = diag.get("seconds", {})
    lines = [
        "",
        "## Does the reward read the text? (reward diagnostics)",
        "",
        f"Round 1's {diag.get('samples')} samples of {diag.get('users')} train and validation "
        "users (policy 0), scored by the frozen reward model. *Another user's*: each sample's "
        "vector replaced by a sample vector of another user (a seeded derangement of the "
        "users); *zeroed*: the vector set to zeros (for the genre share: another user's text, "
        "and an empty text). *Spread*: mean within-user sd of the reward over the sd of the "
        "users' mean rewards. *Reliability*: a second reward model trained with the next seed "
        "on the same data scores the same samples: the share of same-user sample pairs both "
        "order alike (a tie counts 1/2: chance is 0.5) and of users whose best sample both "
        "pick (chance is 1/N). A reward that reads the text changes for most samples, by more "
        "than 0.01, with a spread of 0.1 or more and 75% or more of pairs ordered alike. "
        f"Cost: {_num(seconds.get('total'), 1)} s, of which {_num(seconds.get('second_model'), 1)}"
        " s train the second model.",
        "",
        "| reward | changed, another user's | mean abs. change | changed, zeroed | "
        "mean abs. change | within / between sd | pairs ordered alike | same best sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for col, fig in diag.get("columns", {}).items():
        swapped, zeroed = fig.get("swapped", {}), fig.get("zeroed", {})
        rel = fig.get("reliability", {})
        lines.append(
            f"| {COLUMN_NAMES.get(col, col)} | {_share(swapped.get('changed_share'))} |"
            f" {_num(swapped.get('mean_abs_change'))} | {_share(zeroed.get('changed_share'))} |"
            f" {_num(zeroed.get('mean_abs_change'))} | {_num(fig.get('spread', {}).get('ratio'))} |"
            f" {_share(rel.get('pair_agreement'))} | {_share(rel.get('best_agreement'))} |"
        )
    ab = diag.get("knowledge_ablation", {})
    if ab.get("n"):
        lines += [
            "",
            f"Knowledge ablation of the reward model: validation NDCG@5 with each user's own "
            f"round-0 vector {_num(ab.get('own'))}, with another user's {_num(ab.get('shuffled'))}:"
            f" {_diff(ab)} ({ab['n']} validation users, paired, Student-t 95% CI).",
        ]
    return lines


def plot_learning(results: dict, path: Path) -> Path | None:
    """Held-out and train reward per policy, with the paired 95% CI of the difference to
    policy 0 drawn around policy 0's level."""
    records = results.get("learning") or []
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, color in (("heldout", "tab:blue"), ("train", "tab:orange")):
        xs = [r["policy"] for r in records]
        ys = [r[name]["reward"] for r in records]
        base = ys[0]
        lo = [base + r[name]["vs_policy_0"]["ci_low"] if r["policy"] else base for r in records]
        hi = [base + r[name]["vs_policy_0"]["ci_high"] if r["policy"] else base for r in records]
        ax.plot(xs, ys, marker="o", color=color, label=f"{name} users")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("policy (round)")
    ax.set_ylabel(f"reward ({results.get('settings', {}).get('reward', 'ndcg@5')})")
    ax.set_title("reward of each policy's texts (frozen reward model)")
    ax.legend()
    return _save(fig, [ax], path, rounds=[r["policy"] for r in records])


def _num(v: object, digits: int = 4) -> str:
    if isinstance(v, int | float) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return ""


def plot_rounds(results: dict, path: Path) -> Path | None:
    """Fig. 4: test NDCG@5 / MAP@5 per round (where evaluated) and the mean sample reward."""
    rounds = results.get("rounds", [])
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes[:2], HEADLINE, strict=True):
        for backbone in sorted({b for r in rounds for b in r.get("eval", {})}):
            xs = [r["round"] for r in rounds if backbone in r.get("eval", {})]
            ys = [r["eval"][backbone][metric] for r in rounds if backbone in r.get("eval", {})]
            ax.plot(xs, ys, marker="o", label=backbone.upper())
        ax.set_title(f"test {metric.upper()}")
        ax.set_xlabel("round")
        ax.legend()
    xs = [r["round"] for r in rounds if r.get("reward")]
    ys = [r["reward"]["ndcg_at_5_mean"] for r in rounds if r.get("reward")]
    axes[2].plot(xs, ys, marker="o", color="tab:green")
    axes[2].set_title("mean sample reward (NDCG@5)")
    axes[2].set_xlabel("round")
    test = results.get("data", {}).get("splits", {}).get("test", {})
    if test:
        fig.suptitle(
            f"Fig. 4 per round; test panels: {test.get('users')} users, {test.get('lists')} lists"
        )
    return _save(fig, axes, path, rounds=[r["round"] for r in rounds])


def _save(fig, axes, path: Path, rounds: list[int] | None = None) -> Path:
    """:func:`integer_rounds` on ``axes``, then ``fig`` as a PNG at ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    integer_rounds(axes, rounds)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def integer_rounds(axes, rounds: list[int] | None = None) -> None:
    """Integer round ticks on ``axes``: each of ``rounds`` when there are few (one round shows
    as ``1``, not ``0.96 .. 1.04``), else integers only."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ticks = sorted(set(rounds or []))
    for ax in axes:
        if ticks and len(ticks) <= 12:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            if len(ticks) == 1:
                ax.set_xlim(ticks[0] - 0.5, ticks[0] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def write_report(results: dict, out_dir: Path, params: dict | None = None) -> dict:
    """Write ``report.md``, ``results.json`` and ``fig4_rounds.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    tables = build_tables(results)
    plot = plot_rounds(results, out_dir / "fig4_rounds.png")
    learning_plot = plot_learning(results, out_dir / "learning.png")
    text = markdown(results, tables, params)
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(text)
    write_json({"results": results, "tables": tables, "params": params}, out_dir / "results.json")
    return {
        "report": str(out_dir / "report.md"),
        "results": str(out_dir / "results.json"),
        "plot": str(plot) if plot else None,
        "learning_plot": str(learning_plot) if learning_plot else None,
        "tables": tables,
    }
