"""RLRF4Rec's Algorithm 1 as a Prefect flow: ``python -m flows.iterate``.

Round 0 writes zero-shot knowledge for every user and trains the reward reranker on it; each
round r = 1..R samples N texts per train user with policy r-1, encodes and scores them with the
frozen reward model, pairs best and worst, and trains policy r with LoRA-DPO. After the last
round every user's knowledge is regenerated with the final policy and the backbone rerankers
are trained and evaluated on the test users: Table I (base / KAR / RLRF4Rec), Table II and the
per-round curve (Fig. 4), in ``runs/<run>/report.md`` and MLflow. With R = 0 the run measures
the policy alone: round one's samples are scored and paired but not trained on, and Table I
has no RLRF4Rec row.

The modules beside this one: ``iterate_params`` (parameters, profiles, typed configs),
``iterate_steps`` (the stages of round zero and of a round), ``iterate_learning`` (held-out
measures, reward diagnostics), ``iterate_report`` (Table I and the report).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from prefect import flow

from flows.common import RESUME_NOTE, RunContext, params_flow, run_main, run_tracked
from flows.iterate_learning import diagnose_reward, measure_learning
from flows.iterate_params import IterateParams, LoopConfig
from flows.iterate_report import evaluate_table1, publish, report
from flows.iterate_steps import (
    Loop,
    Round,
    prepare_data_first,
    prepare_inputs,
    round_train_users,
    run_round,
    track_round,
    train_reward_model,
    write_knowledge,
)
from tasks.common.stage import measured_seconds, stage_ledger
from tasks.llm.engine_pool import keep_engines
from tasks.llm.policy import Policy

__all__ = ["IterateParams", "LoopConfig", "iterate", "main", "rlrf4rec_loop", "round_train_users"]


def run_iterate(params: IterateParams) -> dict:
    p = params.resolved()
    result = run_tracked(p, rlrf4rec_loop, encoder=p.encoder, n_shards=p.n_shards)
    publish(p, result)  # on the flow run a deployment starts, not its subflow
    return result


iterate = params_flow(
    IterateParams,
    run_iterate,
    "rlrf4rec-iterate",
    "RLRF4Rec: R rounds of sample, score, pair and DPO; then Table I.",
)


@flow(name="rlrf4rec-loop", validate_parameters=False, flow_run_name="{p.run_name}: pipeline")
def rlrf4rec_loop(p: IterateParams, ctx: RunContext) -> dict:
    """Algorithm 1: round zero, R rounds, the held-out measures, the reward's diagnostics, the
    final evaluation, the report."""
    with stage_ledger() as stages_seen:
        return _loop(p, ctx, stages_seen)


def _loop(p: IterateParams, ctx: RunContext, stages_seen: list[dict]) -> dict:
    t_start = time.perf_counter()
    cfg = LoopConfig.of(p)
    inputs = prepare_inputs(p, cfg, ctx)
    loop = Loop(p, cfg, ctx, inputs, round_train_users(inputs.prompts, cfg.round_users, p.seed))
    policies = [Policy(ctx.policy)]
    # A policy's engine serves all its sampling: round 0 and round 1, the last knowledge and
    # the held-out texts.
    with keep_engines():
        knowledge0 = write_knowledge(loop, policies[0], 0, out_dir=ctx.run_dir / "round_00")
        reward_model = train_reward_model(loop, knowledge0)
        rounds: list[Round] = []
        for r in range(1, cfg.rounds + 1):
            this = run_round(loop, r, policies[-1], reward_model)
            policies.append(policies[-1].after(this.dpo))
            if cfg.eval_each_round or r == cfg.rounds:
                out_dir = ctx.run_dir / this.tag / "knowledge"
                final = write_knowledge(loop, policies[-1], r, out_dir=out_dir)
                this = replace(this, final_knowledge=final)
            track_round(loop, this)
            rounds.append(this)
        if not rounds:  # --rounds 0: policy 0's samples, scored and paired, without DPO
            rounds.append(run_round(loop, 1, policies[0], reward_model, train=False))
            track_round(loop, rounds[0])
        learning = measure_learning(loop, policies, rounds, reward_model)
    diagnostics = diagnose_reward(loop, reward_model, knowledge0, rounds[0])
    evaluation = evaluate_table1(loop, knowledge0, rounds)
    timings = {
        "prepare": measured_seconds(loop.inputs.data),
        "prompts": measured_seconds(loop.inputs.prompts),
        "item_knowledge": measured_seconds(loop.inputs.item_knowledge),
        "encode_items": measured_seconds(loop.inputs.items),
        **knowledge0.seconds("round_00"),
        "round_00.train_reward_model": measured_seconds(reward_model),
        **{k: v for this in rounds for k, v in this.seconds().items()},
        **learning.timings,
        "reward_diagnostics": measured_seconds(diagnostics),
        **evaluation.timings,
    }
    return report(
        loop,
        knowledge0,
        rounds,
        evaluation,
        learning,
        diagnostics=diagnostics,
        stages_seen=stages_seen,
        timings=timings,
        t_start=t_start,
    )


DESCRIPTION = __doc__.split("\n\n")[0] + RESUME_NOTE


def main(argv: list[str] | None = None) -> int:
    return run_main(
        IterateParams, iterate, argv, description=DESCRIPTION, prepare_first=prepare_data_first
    )


if __name__ == "__main__":
    sys.exit(main())
