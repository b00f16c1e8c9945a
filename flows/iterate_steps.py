"""The iterate flow's steps: what one run reads (:class:`Loop`), what each stage hands on
(:class:`Knowledge`, :class:`Round`), and the calls that sequence the stages of round zero and
of a round (sample, encode, score, pair, DPO) with their MLflow and Prefect records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.common import RunContext
from flows.iterate_params import REWARD_FOLDS, IterateParams, LoopConfig, _given
from flows.metric_shapes import log_training_curve, per_stage
from flows.prefect_ui import progress
from tasks.common.stage import Artefact, InputRef, measured_seconds, run_outside_prefect
from tasks.llm import stages as llm_stages
from tasks.llm.engine_pool import release_engines
from tasks.llm.policy import Policy
from tasks.llm.sampling import SamplingConfig
from tasks.rlrf4rec import stages
from tasks.rlrf4rec.stages import Shard

ALL_SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- stage results


@dataclass(frozen=True)
class Inputs:
    """What every round reads: the prepared data, the prompts, the item vectors (and the item
    knowledge they were encoded from; None: titles)."""

    data: Artefact
    prompts: Artefact
    items: Artefact
    item_knowledge: Artefact | None = None


@dataclass(frozen=True)
class Knowledge:
    """Sampled texts (one per user, or N per train user) and their vectors."""

    samples: Artefact
    vectors: Artefact

    def seconds(self, prefix: str) -> dict[str, float]:
        sampling = measured_seconds(self.samples)
        if not self.samples.cached:
            sampling += self.samples.stats.get("sample_seconds", 0.0)
        return {f"{prefix}.sample": sampling, f"{prefix}.encode": measured_seconds(self.vectors)}


@dataclass(frozen=True)
class Round:
    """One round of Algorithm 1: samples, rewards, pairs, the DPO that followed and, where it
    was evaluated, every user's knowledge from the new policy."""

    index: int
    knowledge: Knowledge
    scored: Artefact
    pairs: Artefact
    dpo: Artefact | None  # None: a round that only measures its policy (``--rounds 0``)
    final_knowledge: Knowledge | None = None

    @property
    def tag(self) -> str:
        return f"round_{self.index:02d}"

    def record(self) -> dict[str, Any]:
        """The round's row of the report and its MLflow metrics."""
        out = {
            "round": self.index,
            "generation": self.knowledge.samples.stats,
            "reward": self.scored.stats,
            "pairs": self.pairs.stats,
        }
        if self.dpo is not None:
            out["dpo"] = {
                **self.dpo.stats.get("metrics", {}),
                "skipped": int(self.dpo.skipped is not None),
                **({"skipped_reason": self.dpo.skipped} if self.dpo.skipped else {}),
            }
        return out

    def seconds(self) -> dict[str, float]:
        out = self.knowledge.seconds(self.tag)
        for name, stage in (("score", self.scored), ("pair", self.pairs), ("dpo", self.dpo)):
            if stage is not None:
                out[f"{self.tag}.{name}"] = measured_seconds(stage)
        if self.final_knowledge is not None:
            out.update(self.final_knowledge.seconds(f"{self.tag}.knowledge"))
        return out


@dataclass(frozen=True)
class Loop:
    """One run's fixed values: parameters, typed configs, run context, and its inputs."""

    p: IterateParams
    cfg: LoopConfig
    ctx: RunContext
    inputs: Inputs
    train_users: tuple[int, ...] | None = None  # the rounds' train users; None = all


def round_train_users(prompts: Artefact, count: int, seed: int) -> tuple[int, ...] | None:
    """A seeded subset of ``count`` train users for the rounds (None: every train user)."""
    import numpy as np
    import polars as pl

    if count <= 0:
        return None
    train = pl.read_parquet(prompts.path).filter(pl.col("split") == "train")["user_id"].sort()
    if count >= train.len():
        return None
    picked = np.random.default_rng(seed).choice(train.to_numpy(), size=count, replace=False)
    return tuple(sorted(int(u) for u in picked))


def prepare_data(
    p: IterateParams, cfg: LoopConfig, run_dir: Path, *, now: bool = False
) -> Artefact:
    """The data set as reranking lists under ``<run>/data``: the flow's Prefect task, or with
    ``now`` the same stage run here, outside Prefect (the command line prepares the data before
    Prefect and vLLM start, so a fault in the data's content is one line; the flow's task is
    then served from the stage's manifest)."""
    args = {
        "data_dir": InputRef.of(p.data_dir) if p.data_dir else None,
        "lists": cfg.lists,
        "max_users": p.max_users or None,
        "amazon": cfg.amazon,
        "out": run_dir / "data",
    }
    if now:
        return run_outside_prefect(stages.prepare_data, p.dataset, **args)
    return stages.prepare_data(p.dataset, **args)


def prepare_data_first(p: IterateParams) -> None:
    """:func:`prepare_data` before Prefect starts, for ``p`` resolved (the command line)."""
    prepare_data(p, LoopConfig.of(p), p.run_dir(), now=True)


def prepare_inputs(p: IterateParams, cfg: LoopConfig, ctx: RunContext) -> Inputs:
    """The data set as reranking lists, one prompt per user, the item vectors."""
    data = prepare_data(p, cfg, ctx.run_dir)
    cap = _given(p.max_prompt_tokens, "max_prompt_tokens") or None
    prompts = stages.build_prompts(
        data,
        p.dataset,
        max_prompt_tokens=cap,
        tokenizer=ctx.policy if cap else None,
        style=cfg.prompt_style,
        out=ctx.run_dir / "prompts.parquet",
    )
    knowledge = write_item_knowledge(cfg, ctx, data, dataset=p.dataset, backend=p.backend)
    items = stages.encode_items(
        data, knowledge, encoder=ctx.encoder, out=ctx.run_dir / "item_vectors.parquet"
    )
    # Counts of the data are parameters (fixed for the run), not metrics.
    ctx.tracker.params(ctx.parent_run_id, {"data": data.stats})
    from flows.provenance import log_dataset

    log_dataset(ctx.tracker, ctx.parent_run_id, data.path, name=p.dataset)
    splits = data.stats.get("splits", {})
    progress(
        "data %s: %s users with lists (train %s, valid %s, test %s users; %s test lists)",
        p.dataset,
        data.stats.get("users_with_lists"),
        *(splits.get(s, {}).get("users") for s in ALL_SPLITS),
        splits.get("test", {}).get("lists"),
    )
    return Inputs(data, prompts, items, knowledge)


def write_item_knowledge(
    cfg: LoopConfig, ctx: RunContext, data: Artefact, *, dataset: str, backend: str
) -> Artefact | None:
    """The item knowledge the item vectors are encoded from: the base policy's greedy answers
    to KAR's item prompt (``llm``), a user's file, or None (titles)."""
    out = ctx.run_dir / "item_knowledge.parquet"
    if cfg.item_knowledge == "title":
        return None
    if cfg.item_knowledge != "llm":
        return stages.read_item_knowledge(InputRef.of(cfg.item_knowledge), out=out)
    knowledge = stages.item_knowledge(
        data,
        Policy(ctx.policy),
        dataset=dataset,
        style=cfg.prompt_style,
        sampling=cfg.item_sampling,
        backend=backend,
        out=out,
    )
    stats = knowledge.stats
    progress(
        "item knowledge: %s items, %s tokens in %.0f s (%.0f tokens/s, %.0f%% cut at the budget)",
        stats.get("items"),
        stats.get("generated_tokens"),
        measured_seconds(knowledge),
        stats.get("tokens_per_s", 0.0),
        100 * stats.get("degenerate_share", 0.0),
    )
    return knowledge


def sample_users(
    loop: Loop,
    policy: Policy,
    splits: tuple[str, ...],
    sampling: SamplingConfig,
    *,
    out_dir: Path,
    round_idx: int,
    train_users: tuple[int, ...] | None = None,
) -> Artefact:
    """Fan the prompts of ``splits`` out over the shards (one engine per GPU), then merge;
    of the train users only ``train_users`` when given."""
    ctx = loop.ctx
    with _ray_gpu_options(loop):
        futures = [
            stages.sample.submit(
                loop.inputs.prompts,
                policy,
                splits=splits,
                sampling=sampling,
                backend=loop.p.backend,
                shard=Shard(k, ctx.n_shards, _shard_gpu(loop, k)),
                round_idx=round_idx,
                train_users=train_users,
                out=out_dir / "samples" / f"shard{k:02d}.parquet",
            )
            for k in range(ctx.n_shards)
        ]
    shards = [f.result() for f in futures]
    merged = stages.merge_samples(shards, out=out_dir / "samples.parquet")
    if not merged.cached and merged.stats.get("jobs_kept"):
        progress(
            "%s: %d finished jobs of %d users kept from a stopped run, not sampled again",
            out_dir.name,
            merged.stats["jobs_kept"],
            stages.CHUNK_USERS,
        )
    return merged


def write_knowledge(loop: Loop, policy: Policy, round_idx: int, *, out_dir: Path) -> Knowledge:
    """One knowledge text per user (every split) with ``policy``, and its vector."""
    sampling = loop.cfg.knowledge_sampling_for(round_idx)
    samples = sample_users(loop, policy, ALL_SPLITS, sampling, out_dir=out_dir, round_idx=round_idx)
    vectors = encode(loop, samples, out=out_dir / "vectors.parquet")
    return Knowledge(samples, vectors)


def encode(loop: Loop, samples: Artefact, *, out: Path) -> Artefact:
    """The samples' knowledge vectors, in the run's encoding."""
    return stages.encode_knowledge(
        samples, loop.inputs.prompts, encoder=loop.ctx.encoder, encoding=loop.cfg.encoding, out=out
    )


def score(loop: Loop, reward_model: Artefact, knowledge: Knowledge, *, out: Path) -> Artefact:
    """The frozen reward model's scores of ``knowledge``'s samples (train and valid users)."""
    inputs = loop.inputs
    return stages.score(
        reward_model,
        inputs.data,
        vectors=knowledge.vectors,
        samples=knowledge.samples,
        items=inputs.items,
        prompts=inputs.prompts,
        out=out,
    )


def train_reward_model(loop: Loop, knowledge0: Knowledge) -> Artefact:
    """The frozen reward reranker, cross-fitted on round-0 knowledge; its MLflow child run."""
    reward_model = stages.train_reward_model(
        loop.inputs.data,
        knowledge0.vectors,
        loop.inputs.items,
        cfg=loop.cfg.reward,
        n_folds=REWARD_FOLDS,
        out=loop.ctx.run_dir / "reward_model",
    )
    tracker = loop.ctx.tracker
    child = tracker.start("round_00", loop.ctx.parent_run_id)
    tracker.metrics(
        child, {"generation": knowledge0.samples.stats, "reward_model": reward_model.stats}
    )
    seconds = per_stage(knowledge0.seconds("round_00"), "round_00")
    seconds["train_reward_model"] = measured_seconds(reward_model)
    tracker.metrics(child, {"seconds": seconds}, step=0)
    tracker.metrics(loop.ctx.parent_run_id, {"seconds": seconds}, step=0)
    tracker.end(child)
    gen, rm = knowledge0.samples.stats, reward_model.stats
    progress(
        "round 0: zero-shot knowledge for %s users (%.0f%% degenerate); reward model valid "
        "NDCG@5 %.4f",
        gen.get("users"),
        100 * gen.get("degenerate_share", 0.0),
        rm.get("valid_ndcg@5", float("nan")),
    )
    return reward_model


def run_round(
    loop: Loop, r: int, policy: Policy, reward_model: Artefact, *, train: bool = True
) -> Round:
    """Sample N texts per train user (and per validation user, who never enter a pair), score
    them, pair best and worst of each train user, train with DPO (not when ``train`` is
    False: the round then only measures ``policy``)."""
    rd, cfg = loop.ctx.run_dir / f"round_{r:02d}", loop.cfg
    sampling = cfg.sampling_for(r, cfg.sampling.n)
    samples = sample_users(
        loop,
        policy,
        ("train", "valid"),
        sampling,
        out_dir=rd,
        round_idx=r,
        train_users=loop.train_users,
    )
    knowledge = Knowledge(samples, encode(loop, samples, out=rd / "vectors.parquet"))
    scored = score(loop, reward_model, knowledge, out=rd / "scored.parquet")
    pairs = stages.pair(scored, loop.inputs.prompts, cfg=cfg.pairing, out=rd / "pairs.parquet")
    if not train:
        return Round(r, knowledge, scored, pairs, dpo=None)
    release_engines()  # DPO needs the memory and the cores; the next round has a new policy
    dpo = llm_stages.dpo(policy, pairs, cfg=cfg.dpo_for(r), out=rd / "dpo")
    return Round(r, knowledge, scored, pairs, dpo)


def track_round(loop: Loop, this: Round) -> None:
    """The round's MLflow child run: metrics, stage seconds, pairs and adapter."""
    tracker, parent = loop.ctx.tracker, loop.ctx.parent_run_id
    child = tracker.start(this.tag, parent)
    record = this.record()
    tracker.metrics(child, {k: v for k, v in record.items() if k != "round"}, step=this.index)
    # one key per stage, the round as the step, on the child and the parent run
    seconds = {"seconds": per_stage(this.seconds(), this.tag)}
    tracker.metrics(child, seconds, step=this.index)
    tracker.metrics(parent, seconds, step=this.index)
    reward_col = loop.cfg.pairing.reward_col
    reward_mean = this.scored.stats.get(f"{reward_col}_mean")
    tracker.metrics(parent, {"reward_mean": reward_mean}, step=this.index)
    tracker.artifact(child, this.pairs.path)
    if this.dpo is not None and this.dpo.skipped is None:
        log_training_curve(tracker, child, this.dpo, "dpo")
        tracker.artifact(child, this.dpo.path, "adapter")
    tracker.end(child)
    progress_round(loop, this)


def progress_round(loop: Loop, this: Round) -> None:
    """The round's line in the Prefect run log: users sampled, pairs kept, DPO loss."""
    gen, pairs = this.knowledge.samples.stats, this.pairs.stats
    metrics = this.dpo.stats.get("metrics", {}) if this.dpo is not None else {}
    if this.dpo is None:
        dpo = "no DPO (--rounds 0 measures the policy)"
    elif this.dpo.skipped is not None:
        dpo = f"DPO skipped ({this.dpo.skipped})"
    else:
        dpo = f"DPO loss {metrics.get('loss', float('nan')):.4f} over {metrics.get('steps')} steps"
    import polars as pl

    split = pl.read_parquet(this.scored.path, columns=["user_id", "split"]).unique("user_id")
    progress(
        "round %d/%d: %s users sampled (%d train, %d validation; %s texts, %.0f%% degenerate), "
        "reward mean %.4f, %s pairs kept of %s train users, %s",
        this.index,
        max(loop.cfg.rounds, this.index),
        gen.get("users"),
        int((split["split"] == "train").sum()),
        int((split["split"] == "valid").sum()),
        gen.get("samples"),
        100 * gen.get("degenerate_share", 0.0),
        this.scored.stats.get(f"{loop.cfg.pairing.reward_col}_mean", float("nan")),
        pairs.get("pairs"),
        pairs.get("users"),
        dpo,
    )


# --------------------------------------------------------------------------- GPUs


def _shard_gpu(loop: Loop, k: int) -> int | None:
    # Under Ray the worker's CUDA_VISIBLE_DEVICES is set by Ray itself.
    gpus = loop.ctx.gpus
    if not gpus or loop.p.task_runner == "ray":
        return None
    return gpus[k % len(gpus)]


def _ray_gpu_options(loop: Loop):
    """With Ray on a GPU host, each sampling shard asks Ray for one whole GPU."""
    from contextlib import nullcontext

    if loop.p.task_runner != "ray" or not loop.ctx.gpus:
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1)
