"""Does the loop learn, and does its reward read the text? The held-out measures of each
policy and the reward diagnostics of round one's samples, with their MLflow records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.iterate_params import REWARD_FOLDS
from flows.iterate_steps import Knowledge, Loop, Round, encode, sample_users, score
from flows.prefect_ui import progress
from tasks.common.stage import Artefact, measured_seconds
from tasks.llm import stages as llm_stages
from tasks.llm.engine_pool import release_engines
from tasks.llm.policy import Policy
from tasks.rlrf4rec import stages

# --------------------------------------------------------------------------- learning


@dataclass
class Learning:
    """Per policy r = 0..R: held-out and train reward (with the paired difference to policy
    0), text figures, KL and held-out pair accuracy (r >= 1), two example texts."""

    policies: list[dict[str, Any]]
    timings: dict[str, float]


def measure_learning(
    loop: Loop, policies: list[Policy], rounds: list[Round], reward_model: Artefact
) -> Learning:
    """Score what each policy wrote: policy r wrote round r+1's samples; the policy that
    trained no round (the last, unless ``--rounds 0``) writes N more texts per validation user
    here, and its train reward is that of its knowledge texts (one per train user)."""
    import polars as pl

    from tasks.common.io import read_parquet
    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec import learning

    rd, cfg, timings = loop.ctx.run_dir / "heldout", loop.cfg, {}
    own = [this.scored for this in rounds]  # own[r]: what policy r wrote
    final_train = None
    if len(policies) > len(rounds):
        heldout, final = write_heldout(loop, policies[-1], reward_model, out_dir=rd)
        last = rounds[-1].final_knowledge
        assert last is not None, "the last round always writes its knowledge"
        final_train = score(loop, reward_model, last, out=rd / "final_knowledge_scored.parquet")
        own.append(final)
        timings.update(heldout.seconds("heldout"))
        timings["heldout.score"] = measured_seconds(final, final_train)
    release_engines()  # the last sampling of the run
    data = load_prepared(stages.run_folder(loop.inputs.data))
    titles = learning.history_titles(data.history, data.items)
    frames = [read_parquet(a.path) for a in own]
    reward_col = cfg.pairing.reward_col
    shown = sorted(frames[0].filter(pl.col("split") == "valid")["user_id"].unique())[:2]
    records = []
    for r, frame in enumerate(frames):
        is_last = r == len(frames) - 1
        record = learning.policy_record(
            r,
            frame,
            frames[0],
            reward_col=reward_col,
            titles=titles,
            train_scored=(
                _round_users(read_parquet(final_train.path), loop)
                if is_last and final_train is not None
                else None
            ),
        )
        valid = frame.filter(pl.col("split") == "valid")
        record["examples"] = learning.example_texts(valid, shown, reward_col)
        if r >= 1 and cfg.diagnostic_users:
            drift = policy_drift(loop, policies[r], own[r], own[r - 1], r)
            timings[f"heldout.drift_{r}"] = measured_seconds(drift)
            record["drift"] = learning.drift_figures(read_parquet(drift.path), cfg.dpo.beta)
        records.append(record)
    track_learning(loop, records)
    return Learning(records, timings)


def _round_users(scored: Any, loop: Loop) -> Any:
    """The rows of the rounds' train users (every row without ``--round-users``), so that
    every policy's train reward is over the same users."""
    import polars as pl

    if loop.train_users is None:
        return scored
    keep = (pl.col("split") != "train") | pl.col("user_id").is_in(list(loop.train_users))
    return scored.filter(keep)


def write_heldout(
    loop: Loop, policy: Policy, reward_model: Artefact, *, out_dir: Path
) -> tuple[Knowledge, Artefact]:
    """N texts per validation user from the final policy, and their scores by the frozen
    reward model."""
    r = loop.cfg.rounds + 1
    sampling = loop.cfg.sampling_for(r, loop.cfg.sampling.n)
    samples = sample_users(loop, policy, ("valid",), sampling, out_dir=out_dir, round_idx=r)
    knowledge = Knowledge(samples, encode(loop, samples, out=out_dir / "vectors.parquet"))
    return knowledge, score(loop, reward_model, knowledge, out=out_dir / "scored.parquet")


def policy_drift(loop: Loop, policy: Policy, own: Artefact, previous: Artefact, r: int) -> Artefact:
    """Log-probabilities under policy r and its base model of its own validation texts and of
    the held-out pairs built from policy r-1's validation texts."""
    out = loop.ctx.run_dir / "heldout" / f"policy_{r:02d}"
    texts = stages.diagnostic_texts(
        own,
        previous,
        loop.inputs.prompts,
        users=loop.cfg.diagnostic_users,
        reward_col=loop.cfg.pairing.reward_col,
        out=out / "texts.parquet",
    )
    return llm_stages.log_ratios(policy, texts, out=out / "log_ratios.parquet")


def track_learning(loop: Loop, records: list[dict[str, Any]]) -> None:
    """Each policy's learning figures on the MLflow parent run, step = policy index."""
    tracker, parent = loop.ctx.tracker, loop.ctx.parent_run_id
    for record in records:
        flat = {k: v for k, v in record.items() if k not in ("policy", "examples")}
        tracker.metrics(parent, {"learning": flat}, step=record["policy"])


# --------------------------------------------------------------------------- reward diagnostics


def diagnose_reward(
    loop: Loop, reward_model: Artefact, knowledge0: Knowledge, first: Round
) -> Artefact | None:
    """Does the reward read the text? Round one's samples (policy 0's) against the frozen
    reward model: text sensitivity, spread, reliability (a second reward model, the next
    seed) and the knowledge ablation (:mod:`tasks.rlrf4rec.reward_diagnostics`); on the
    MLflow parent as ``reward_diagnostics.*``. None when ``--no-reward-diagnostics``."""
    if not loop.cfg.reward_diagnostics:
        return None
    out = loop.ctx.run_dir / "reward_diagnostics"
    diagnostics = stages.reward_diagnostics(
        reward_model,
        loop.inputs.data,
        round0=knowledge0.vectors,
        vectors=first.knowledge.vectors,
        scored=first.scored,
        items=loop.inputs.items,
        cfg=loop.cfg.reward,
        n_folds=REWARD_FOLDS,
        reward_col=loop.cfg.pairing.reward_col,
        seed=loop.p.seed,
        out=out,
    )
    stats = diagnostics.stats
    loop.ctx.tracker.metrics(loop.ctx.parent_run_id, {"reward_diagnostics": stats})
    ndcg = stats.get("columns", {}).get("ndcg_at_5", {})
    ablation = stats.get("knowledge_ablation", {})
    progress(
        "reward diagnostics (NDCG@5, round 1's %s samples of %s users): %.0f%% of rewards "
        "change with another user's text (mean %.4f), spread %.4f, two seeds agree on %.0f%% "
        "of pairs; knowledge ablation %+.4f [%+.4f, %+.4f] (%.0f s)",
        stats.get("samples"),
        stats.get("users"),
        100 * ndcg.get("swapped", {}).get("changed_share", float("nan")),
        ndcg.get("swapped", {}).get("mean_abs_change", float("nan")),
        ndcg.get("spread", {}).get("ratio", float("nan")),
        100 * ndcg.get("reliability", {}).get("pair_agreement", float("nan")),
        ablation.get("diff", float("nan")),
        ablation.get("ci_low", float("nan")),
        ablation.get("ci_high", float("nan")),
        measured_seconds(diagnostics),
    )
    return diagnostics
