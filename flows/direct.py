"""The second pipeline (You et al.) as a Prefect flow: ``python -m flows.direct``.

The LLM reads a user's profile and the liked and hated movies of a 10-rating window and answers
five titles; each title is mapped to the catalogue with rapidfuzz (WRatio); the answer is scored
with NDCG@5, Precision@5 and Recall@5 against the user's next five liked movies. Stages, each
evaluated on the test users with the same decoding settings: Base (no training) -> SFT on the
ground-truth titles -> DPO on pairs of sampled answers ranked by NDCG@5 -> online RL (GRPO or
RLOO) with the NDCG@5 of the answer as the reward, and RLHF with a reward model trained on the
preference pairs. A most-popular and an item-kNN recommender give reference rows. The result is
the paper's Table 1 (``runs/<run>/report.md``, ``results.json`` and MLflow).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from prefect import flow

from flows.common import RESUME_NOTE, RunContext, params_flow, run_main, run_tracked
from flows.direct_params import STAGE_ORDER, DirectParams, StageConfigs
from flows.metric_shapes import log_training_curve
from flows.prefect_ui import progress, publish_report
from flows.tracking import tracker_for
from tasks.common.stage import Artefact, InputRef, measured_seconds, run_outside_prefect
from tasks.direct import report as direct_report
from tasks.direct import stages
from tasks.direct.scoring import load_direct
from tasks.llm import stages as llm_stages
from tasks.llm.policy import Policy

TRAINED = ("sft", "dpo", "rl", "rlhf", "reward_model")  # their per-step curves go to MLflow

DESCRIPTION = __doc__.split("\n\n")[0] + RESUME_NOTE


# --------------------------------------------------------------------------- stage results


@dataclass
class Results:
    """What the stages of every seed produced, for the report and MLflow."""

    per_seed: dict[str, dict[int, dict]]
    timings: dict[str, float]
    details: dict[str, dict]
    notes: list[str]
    examples: list
    test_windows: int = 0
    # per_user[stage][seed][user_id] = that test user's NDCG@5, Precision@5, Recall@5
    per_user: dict[str, dict[int, dict[str, dict[str, float]]]] = field(default_factory=dict)


@dataclass(frozen=True)
class SeedRun:
    """One seed's fixed values: parameters, typed configs, run context, its data and folder."""

    p: DirectParams
    cfg: StageConfigs
    ctx: RunContext
    seed: int
    first: bool
    data: Artefact
    out: Path

    def record(self, name: str, artefact: Artefact, results: Results) -> None:
        """Time, MLflow child run and report details of one finished stage."""
        results.timings[f"seed{self.seed}.{name}"] = measured_seconds(artefact)
        tracker = self.ctx.tracker
        child = tracker.start(
            f"seed{self.seed}.{name}", self.ctx.parent_run_id, tags={"stage": name}
        )
        logged = {k: v for k, v in artefact.stats.items() if isinstance(v, dict)}
        if name == "data":  # counts of the data: parameters, not metrics
            tracker.params(child, logged)
            logged = {}
        tracker.metrics(child, {"seconds": measured_seconds(artefact), **logged})
        if name in TRAINED and artefact.skipped is None:
            log_training_curve(tracker, child, artefact, name)
        tracker.end(child)
        progress_line(self.seed, name, artefact)
        if self.first:
            results.details[name] = _brief(artefact)


def progress_line(seed: int, name: str, artefact: Artefact) -> None:
    """A stage's line in the Prefect run log: windows, pairs kept, loss, test NDCG@5."""
    stats = artefact.stats
    metrics = stats.get("metrics", {}) if isinstance(stats.get("metrics"), dict) else {}
    counts = stats.get("counts", {}) if isinstance(stats.get("counts"), dict) else {}
    if artefact.skipped is not None:
        figures = f"skipped ({artefact.skipped})"
    elif name.endswith(".eval"):
        figures = (
            f"{metrics.get('answers')} test users, NDCG@5 {metrics.get('ndcg@5', float('nan')):.4f}"
        )
    elif name == "data":
        figures = ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict))
    elif name == "preferences":
        inner = stats.get("stats", {}) if isinstance(stats.get("stats"), dict) else {}
        figures = ", ".join(f"{k} {inner[k]}" for k in ("prompts", "pairs") if k in inner)
    elif "loss" in metrics:
        figures = f"loss {metrics['loss']:.4f} over {metrics.get('steps')} steps"
    else:
        figures = f"{artefact.seconds:.1f} s"
    progress("seed %d, %s: %s", seed, name, figures or f"{artefact.seconds:.1f} s")


# --------------------------------------------------------------------------- the flow


def run_direct(params: DirectParams) -> dict:
    from flows.provenance import mlflow_run_url

    p = params.resolved()
    result = run_tracked(p, direct_pipeline)
    parent = result["mlflow_run_id"]
    publish_report(  # on the flow run a deployment starts, not its subflow
        result["report"],
        key=f"direct-{p.run_name}",
        mlflow_url=mlflow_run_url(tracker_for(p.experiment), parent),
        mlflow_run_id=parent,
    )
    return result


direct_flow = params_flow(
    DirectParams,
    run_direct,
    "rlrf4rec-direct",
    "The second pipeline: Base, SFT, DPO, online RL and RLHF rows of Table 1.",
)


@flow(
    name="rlrf4rec-direct-pipeline",
    validate_parameters=False,
    flow_run_name="{p.run_name}: pipeline",
)
def direct_pipeline(p: DirectParams, ctx: RunContext) -> dict:
    """Base -> SFT -> DPO / online RL / RLHF, each evaluated, for every seed; the report."""
    t_start = time.perf_counter()
    seeds = p.seeds or [0]
    results = Results(per_seed={}, timings={}, details={}, notes=[], examples=[])
    for seed in seeds:
        run_seed(prepare_seed(p, ctx, seed, first=seed == seeds[0], results=results), results)
    if p.format_bonus:
        results.notes.append(
            f"NDCG@5 ties in the DPO pairing and the RL reward are broken by a format bonus of "
            f"{p.format_bonus} x (distinct mapped titles / 5); it never outweighs an NDCG@5 "
            "difference. The paper profile has none."
        )
    return report(p, ctx, results, t_start)


def prepare_seed(
    p: DirectParams, ctx: RunContext, seed: int, *, first: bool, results: Results
) -> SeedRun:
    """The seed's windows and its reference recommenders (most popular, item-kNN)."""
    cfg = StageConfigs.of(p, seed)
    out = ctx.run_dir / "direct" / f"seed_{seed}"
    data = seed_data(p, cfg, out)
    run = SeedRun(p, cfg, ctx, seed, first, data, out)
    run.record("data", data, results)
    if first:
        from flows.provenance import log_dataset

        log_dataset(ctx.tracker, ctx.parent_run_id, data.path, name=p.dataset)
    baselines = stages.baselines(
        data, cfg=cfg.baselines, max_eval_users=_users(p.max_eval_users), out=out / "baselines"
    )
    run.record("baselines", baselines, results)
    for name in ("popular", "item_knn"):
        results.per_seed.setdefault(name, {})[seed] = baselines.stats["metrics"][name]
    return run


def seed_data(p: DirectParams, cfg: StageConfigs, out: Path, *, now: bool = False) -> Artefact:
    """The seed's windows under ``<out>/data``: the flow's Prefect task, or with ``now`` the
    same stage run here, outside Prefect (see :func:`prepare_data_first`)."""
    args = {
        "data_dir": InputRef.of(p.data_dir) if p.data_dir else None,
        "windows": cfg.windows,
        "zip_table": InputRef.of(p.zip_table) if p.zip_table else None,
        "out": out / "data",
    }
    if now:
        return run_outside_prefect(stages.direct_data, p.dataset, **args)
    return stages.direct_data(p.dataset, **args)


def prepare_data_first(p: DirectParams) -> None:
    """The first seed's windows before Prefect starts, for ``p`` resolved (the command line):
    a fault in the data's content is one line; the flow's task is then served from the
    stage's manifest."""
    seed = (p.seeds or [0])[0]
    seed_data(p, StageConfigs.of(p, seed), p.run_dir() / "direct" / f"seed_{seed}", now=True)


def run_seed(run: SeedRun, results: Results) -> None:
    """Base, then each training stage asked for, each evaluated on the test windows."""
    p, cfg, out = run.p, run.cfg, run.out
    wanted = [s for s in STAGE_ORDER if s in (p.stages or [])]
    answers = {"base": evaluate(run, "base", Policy(run.ctx.policy), results)}
    start = Policy(run.ctx.policy)  # the policy the later stages start from (SFT's)
    if "sft" in wanted:
        sft = stages.sft(
            run.data,
            run.ctx.policy,
            cfg=cfg.sft,
            max_train_users=_users(p.max_train_users),
            out=out / "sft" / "model",
        )
        run.record("sft", sft, results)
        start = start.after(sft)
        answers["sft"] = evaluate(run, "sft", start, results)
    if run.first:
        results.details["references"] = stage_references(cfg, start)
    prefs = None
    if "dpo" in wanted or "rlhf" in wanted:
        prefs = stages.preferences(
            run.data,
            start,
            sampling=cfg.pref_sampling,
            backend=p.backend,
            max_train_users=_users(p.max_pref_users),
            mapping=cfg.mapping,
            format_bonus=cfg.format_bonus,
            pairing=cfg.pairing,
            out=out / "preferences",
        )
        run.record("preferences", prefs, results)
    if "dpo" in wanted and prefs is not None:
        dpo = llm_stages.dpo(start, prefs, cfg=cfg.dpo, out=out / "dpo" / "model")
        run.record("dpo", dpo, results)
        answers.update(_evaluated_or_noted(run, "dpo", start, dpo, results))
    if "rl" in wanted:
        rl = online_rl(run, start, None, "rl")
        run.record("rl", rl, results)
        answers["rl"] = evaluate(run, "rl", start.after(rl), results)
    if "rlhf" in wanted and prefs is not None:
        rm = stages.reward_model(
            run.ctx.policy, prefs, cfg=cfg.reward_model, out=out / "rlhf" / "reward_model"
        )
        run.record("reward_model", rm, results)
        if rm.skipped is None:
            rlhf = online_rl(run, start, rm, "rlhf")
            run.record("rlhf", rlhf, results)
            answers["rlhf"] = evaluate(run, "rlhf", start.after(rlhf), results)
        else:
            results.notes.append(f"seed {run.seed}: RLHF skipped ({rm.skipped}).")
    if run.first:
        windows, _ = load_direct(run.data.path)
        results.examples = direct_report.example_rows(answers, windows)
        results.test_windows = results.per_seed["base"][run.seed].get("answers", 0)


def stage_references(cfg: StageConfigs, start: Policy) -> dict[str, str | None]:
    """The reference policy of DPO and of online RL / RLHF when they start from ``start``: the
    adapter of the SFT policy (TRL's frozen copy of it), ``base`` without SFT, None for RL
    without a KL term (``rl_beta`` 0)."""
    from tasks.llm.dpo import dpo_reference
    from tasks.llm.online_rl import rl_reference

    return {"dpo": dpo_reference(cfg.dpo, start.adapter), "rl": rl_reference(cfg.rl, start.adapter)}


def online_rl(run: SeedRun, start: Policy, reward_model: Artefact | None, name: str) -> Artefact:
    """Online RL from ``start`` with the NDCG@5 reward, or a reward model's score (RLHF)."""
    return stages.online_rl(
        run.data,
        start,
        cfg=run.cfg.rl,
        max_train_users=_users(run.p.max_rl_users),
        mapping=run.cfg.mapping,
        reward_model=reward_model,
        format_bonus=run.cfg.format_bonus,
        out=run.out / name / "model",
    )


def evaluate(run: SeedRun, name: str, policy: Policy, results: Results) -> str:
    """Evaluate one stage's policy on the test windows; return the answers' path."""
    ev = stages.evaluate(
        run.data,
        policy,
        name=name,
        sampling=run.cfg.eval_sampling,
        backend=run.p.backend,
        max_eval_users=_users(run.p.max_eval_users),
        mapping=run.cfg.mapping,
        out=run.out / name / "eval",
    )
    run.record(f"{name}.eval", ev, results)
    results.per_seed.setdefault(name, {})[run.seed] = ev.stats["metrics"]
    results.per_user.setdefault(name, {})[run.seed] = per_user_metrics(ev.path)
    run.ctx.tracker.metrics(run.ctx.parent_run_id, {f"seed{run.seed}.{name}": ev.stats["metrics"]})
    return ev.path


def per_user_metrics(answers_path: str) -> dict[str, dict[str, float]]:
    """Each evaluated test user's NDCG@5, Precision@5 and Recall@5 (one window per test user)."""
    frame = pl.read_parquet(answers_path, columns=["user_id", "ndcg", "precision", "recall"])
    return {
        str(u): {"ndcg@5": n, "precision@5": p, "recall@5": r} for u, n, p, r in frame.iter_rows()
    }


def _evaluated_or_noted(
    run: SeedRun, name: str, start: Policy, trained: Artefact, results: Results
) -> dict[str, str]:
    if trained.skipped is not None:
        results.notes.append(f"seed {run.seed}: {name.upper()} skipped ({trained.skipped}).")
        return {}
    return {name: evaluate(run, name, start.after(trained), results)}


def report(p: DirectParams, ctx: RunContext, results: Results, t_start: float) -> dict:
    """``report.md`` and ``results.json``, with Table 1's means in MLflow."""
    table = direct_report.summarise(results.per_seed)
    differences = direct_report.paired_differences(results.per_user)
    wall = time.perf_counter() - t_start
    out = {
        "dataset": p.dataset,
        "policy": p.policy_model,
        "profile": p.profile,
        "seeds": p.seeds or [0],
        "test_windows": results.test_windows,
        "table": table,
        "differences": differences,
        "setup": setup_of(p),
        "per_seed": {row: {str(s): m for s, m in v.items()} for row, v in results.per_seed.items()},
        "per_user": {
            row: {str(s): users for s, users in v.items()} for row, v in results.per_user.items()
        },
        "stages": results.details,
        "timings": results.timings,
        "wall_seconds": wall,
        "notes": results.notes,
        "examples": results.examples,
        "params": p.model_dump(),
        "settings": ctx.settings,
    }
    paths = direct_report.write_report(out, ctx.run_dir)
    tracker = ctx.tracker
    for row, metrics in table.items():
        tracker.metrics(ctx.parent_run_id, {f"{row}.{m}": s["mean"] for m, s in metrics.items()})
    tracker.metrics(ctx.parent_run_id, {"wall_seconds": wall})
    for path in paths.values():
        tracker.artifact(ctx.parent_run_id, path)
    return {"run_dir": str(ctx.run_dir), **paths, "wall_seconds": wall}


def setup_of(p: DirectParams) -> dict[str, Any]:
    """The settings the report states (window mode, exclusion, sampling, KL, reward model)."""
    cfg = StageConfigs.of(p, seed=0)
    return {
        "you_et_al_exact": p.you_et_al_exact,
        "exclude_context": cfg.mapping.exclude_context,
        "n_samples": cfg.pref_sampling.n,
        "temperature": cfg.pref_sampling.temperature,
        "top_p": cfg.pref_sampling.top_p,
        "pairing": p.pairing,
        "dpo_reference": cfg.dpo.ref,
        "rl_beta": cfg.rl.beta,
        "rm_input": cfg.reward_model.rm_input,
        "sft_epochs": cfg.sft.epochs,
    }


def _users(n: int | None) -> int | None:
    return n or None


BRIEF_KEYS = (
    "windows",
    "answers",
    "ndcg@5",
    "mapped_title_rate",
    "parse_failure_rate",
    "titles_parsed",
    "context_hits",
    "duplicates",
    "loss",
    "steps",
    "n_examples",
    "n_pairs",
    "n_prompts",
    "reward",
    "accuracy",
    "rewards/accuracies",
    "pairs",
    "prompts",
    "prompts_with_pairs",
    "prompts_all_zero",
    "repeat_share",
    "answers_repeating_prompt",
    "beta",
    "reference",
    "rm_input",
    "mean_ndcg",
    "mean_best_ndcg",
    "backend",
    "generated_tokens",
    "tokens_per_s",
    "skipped",
)


def _brief(artefact: Artefact) -> dict:
    """The few reportable figures of a stage's artefact (flat)."""
    flat: dict = {}
    for part in ("counts", "metrics", "stats", "generation"):
        value = artefact.stats.get(part)
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, dict)})
    for key in ("reference", "rm_input"):  # a trainer's reference policy, the RM's input
        if isinstance(artefact.stats.get(key), str):
            flat[key] = artefact.stats[key]
    if artefact.skipped:
        flat["skipped"] = artefact.skipped
    out = {k: flat[k] for k in BRIEF_KEYS if k in flat and flat[k] is not None}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    return run_main(
        DirectParams, direct_flow, argv, description=DESCRIPTION, prepare_first=prepare_data_first
    )


if __name__ == "__main__":
    sys.exit(main())
