"""Table I (base / KAR / RLRF4Rec per backbone and seed on the test users), Fig. 4, and the
run's report with its MLflow and Prefect records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.iterate_learning import Learning
from flows.iterate_params import IterateParams
from flows.iterate_steps import Knowledge, Loop, Round
from flows.prefect_ui import progress, publish_report
from flows.tracking import tracker_for
from tasks.common.stage import Artefact, measured_seconds
from tasks.rlrf4rec import stages

# --------------------------------------------------------------------------- Table I


@dataclass
class Evaluation:
    """Test metrics per backbone, row and seed; per-list files; Fig. 4's per-round metrics."""

    table1: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    per_list: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    per_round: dict[int, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, backbone: str, row: str, seed: int, metrics: Artefact) -> None:
        self.table1.setdefault(backbone, {}).setdefault(row, {})[str(seed)] = metrics.stats
        self.per_list.setdefault(backbone, {}).setdefault(row, {})[str(seed)] = metrics.extra[0]

    def row(self, backbone: str, row: str, seed: int) -> dict[str, float]:
        return self.table1.get(backbone, {}).get(row, {}).get(str(seed), {})


def evaluate_table1(loop: Loop, knowledge0: Knowledge, rounds: list[Round]) -> Evaluation:
    """Base / profile / KAR / RLRF4Rec rerankers per backbone and seed on the test users, and
    Fig. 4's test metrics of every evaluated round (reward backbone, first seed). The profile
    row reads the profile-and-history text itself: what the LLM's text has to beat."""
    final = rounds[-1].final_knowledge  # None: --rounds 0, no policy was trained
    eval_dir = loop.ctx.run_dir / "eval"
    profile = stages.encode_profiles(
        loop.inputs.prompts, encoder=loop.ctx.encoder, out=eval_dir / "profile_vectors.parquet"
    )
    rows = {"base": None, "profile": profile, "KAR": knowledge0.vectors}
    if final is not None:
        rows["RLRF4Rec"] = final.vectors
    ev = Evaluation()
    ev.timings["eval.encode_profiles"] = measured_seconds(profile)
    for backbone in loop.cfg.backbones:
        for seed in loop.cfg.seeds:
            for row, vectors in rows.items():
                out = eval_dir / backbone / row / f"seed{seed}"
                metrics = train_and_evaluate(loop, vectors, backbone, seed, out=out, ev=ev)
                ev.add(backbone, row, seed, metrics)
    seed, backbone = loop.cfg.seeds[0], loop.p.reward_backbone
    ev.per_round[0] = ev.row(backbone, "KAR", seed)
    for this in rounds:
        if this.index == loop.cfg.rounds:
            ev.per_round[this.index] = ev.row(backbone, "RLRF4Rec", seed)
        elif this.final_knowledge is not None:
            out = eval_dir / backbone / f"round{this.index}" / f"seed{seed}"
            vectors = this.final_knowledge.vectors
            ev.per_round[this.index] = train_and_evaluate(
                loop, vectors, backbone, seed, out=out, ev=ev
            ).stats
    return ev


def train_and_evaluate(
    loop: Loop, vectors: Artefact | None, backbone: str, seed: int, *, out: Path, ev: Evaluation
) -> Artefact:
    """Train one reranker (with knowledge when ``vectors`` is given) and evaluate it on the
    test users; its seconds go to ``ev.timings``."""
    data = loop.inputs.data
    items = loop.inputs.items if vectors is not None else None
    cfg = loop.cfg.reranker_for(backbone, seed)
    model = stages.train_reranker(data, vectors, items, cfg=cfg, out=out / "model")
    metrics = stages.evaluate_reranker(model, data, vectors, items, out=out / "metrics.json")
    ev.timings["eval." + "/".join(out.parts[-3:])] = measured_seconds(model, metrics)
    return metrics


# --------------------------------------------------------------------------- report


def report(
    loop: Loop,
    knowledge0: Knowledge,
    rounds: list[Round],
    evaluation: Evaluation,
    learning: Learning,
    *,
    diagnostics: Artefact | None,
    stages_seen: list[dict[str, Any]],
    timings: dict[str, float],
    t_start: float,
) -> dict:
    """``report.md``, ``results.json`` and Fig. 4, with their figures in MLflow."""
    from tasks.rlrf4rec.report import write_report

    history = [{"round": 0, "generation": knowledge0.samples.stats}]
    history += [r.record() for r in rounds]
    for row in history:
        if evaluation.per_round.get(row["round"]):
            row["eval"] = {loop.p.reward_backbone: evaluation.per_round[row["round"]]}
    stage_seconds = sum(timings.values())
    wall = time.perf_counter() - t_start
    results = {
        "table1": evaluation.table1,
        "per_list": evaluation.per_list,
        "rounds": history,
        "learning": learning.policies,
        "reward_diagnostics": diagnostics.stats if diagnostics is not None else None,
        "settings": {
            "reward": loop.p.reward_metric or "ndcg@5",
            "knowledge_encoding": loop.cfg.encoding,
            "round_train_users": len(loop.train_users) if loop.train_users else "all",
            "diagnostic_users": loop.cfg.diagnostic_users,
            "run": loop.ctx.settings,
            **components(loop),
        },
        "data": loop.inputs.data.stats,
        "timings": timings,
        "stages": [
            {**entry, "out": _relative(entry["out"], loop.ctx.run_dir)} for entry in stages_seen
        ],
        "wall_seconds": wall,
        "stage_seconds": stage_seconds,
    }
    written = write_report(results, loop.ctx.run_dir, loop.p.model_dump())
    track_report(loop, written, wall=wall, stage_seconds=stage_seconds)
    track_fig4(loop, evaluation)
    return {
        "run_dir": str(loop.ctx.run_dir),
        "report": written["report"],
        "results": written["results"],
        "wall_seconds": wall,
        "stage_seconds": stage_seconds,
    }


def components(loop: Loop) -> dict[str, Any]:
    """What the report names of a run: its encoder, item knowledge, reranker settings and the
    decoding of the knowledge texts the rerankers read."""
    items = loop.inputs.items.stats
    knowledge = loop.inputs.item_knowledge
    item_record: dict[str, Any] = {
        "source": loop.cfg.item_knowledge,
        **{k: items.get(k) for k in ("items", "from_knowledge", "from_title")},
    }
    if knowledge is not None and loop.cfg.item_knowledge == "llm":
        item_record.update(
            max_new_tokens=loop.cfg.item_sampling.max_new_tokens,
            **{k: knowledge.stats.get(k) for k in ("mean_tokens", "degenerate_share")},
        )
    reranker = loop.cfg.reranker
    decoding = loop.cfg.knowledge_sampling_for(loop.cfg.rounds)
    return {
        "encoder": loop.p.encoder,
        "item_knowledge": item_record,
        "reranker": {
            "settings": loop.p.reranker_settings,
            **{k: getattr(reranker, k) for k in ("arch", "dropout", "epochs", "lr", "batch_size")},
        },
        "knowledge_decoding": {
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "max_new_tokens": decoding.max_new_tokens,
        },
    }


def track_fig4(loop: Loop, evaluation: Evaluation) -> None:
    """Fig. 4's test metrics of every evaluated round on the parent run, ``step = round``."""
    tracker, parent = loop.ctx.tracker, loop.ctx.parent_run_id
    for r, metrics in sorted(evaluation.per_round.items()):
        tracker.metrics(parent, {"fig4": {loop.p.reward_backbone: metrics}}, step=r)
    for backbone, rows in evaluation.table1.items():
        progress(
            "Table I, %s NDCG@5 (seed mean): %s",
            backbone.upper(),
            ", ".join(
                f"{row} {_seed_mean(by_seed, 'ndcg@5'):.4f}" for row, by_seed in rows.items()
            ),
        )


def _seed_mean(by_seed: dict[str, dict[str, float]], metric: str) -> float:
    values = [v[metric] for v in by_seed.values() if metric in v]
    return sum(values) / len(values) if values else float("nan")


def publish(p: IterateParams, result: dict) -> None:
    """The report as the flow run's Prefect markdown artefact, linked to the MLflow run."""
    from flows.provenance import mlflow_run_url

    parent = result["mlflow_run_id"]
    publish_report(
        result["report"],
        key=f"rlrf4rec-{p.run_name}",
        mlflow_url=mlflow_run_url(tracker_for(p.experiment), parent),
        mlflow_run_id=parent,
    )


def track_report(loop: Loop, written: dict, *, wall: float, stage_seconds: float) -> None:
    """Table I's means, the run's seconds and the report files on the MLflow parent run."""
    tracker, parent = loop.ctx.tracker, loop.ctx.parent_run_id
    for backbone, rows in written["tables"]["table1"].items():
        for row, metrics in rows.items():
            for metric, summary in metrics.items():
                tracker.metrics(parent, {f"{backbone}.{row}.{metric}": summary["mean"]})
    overhead = max(0.0, 1 - stage_seconds / wall) if wall else 0.0
    tracker.metrics(
        parent, {"wall_seconds": wall, "stage_seconds": stage_seconds, "overhead_share": overhead}
    )
    for path in (written["report"], written["results"], written["plot"], written["learning_plot"]):
        if path:
            tracker.artifact(parent, path)


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
