"""RLRF4Rec's Algorithm 1 as a Prefect flow: ``python -m flows.iterate``.

Round 0 writes zero-shot knowledge for every user and trains the reward reranker on it; each
round r = 1..R samples N texts per train user with policy r-1, encodes and scores them with the
frozen reward model, pairs best and worst, and trains policy r with LoRA-DPO. After the last
round every user's knowledge is regenerated with the final policy and the backbone rerankers
are trained and evaluated on the test users: Table I (base / KAR / RLRF4Rec), Table II and the
per-round curve (Fig. 4), in ``runs/<run>/report.md`` and MLflow.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from prefect import flow
from pydantic import Field, field_validator, model_validator

from flows.common import (
    RESUME_NOTE,
    RunContext,
    RunParams,
    params_flow,
    run_main,
    run_tracked,
    tracker_for,
)
from flows.metric_shapes import log_training_curve, per_stage
from flows.prefect_ui import progress, publish_report
from tasks.common.stage import Artefact, InputRef, measured_seconds
from tasks.data.datasets import AmazonConfig
from tasks.data.lists import ListsConfig
from tasks.data.prepare import lists_config_for
from tasks.llm import stages as llm_stages
from tasks.llm.dpo import DPOConfig
from tasks.llm.engine_pool import keep_engines, release_engines
from tasks.llm.generate import SamplingConfig
from tasks.llm.policy import Policy
from tasks.pairing import PairingConfig
from tasks.rlrf4rec import stages
from tasks.rlrf4rec.reranker import TrainConfig
from tasks.rlrf4rec.reward import REWARD_COLUMNS
from tasks.rlrf4rec.stages import Shard

Backbone = Literal["dlcm", "prm"]
T = TypeVar("T")
ALL_SPLITS = ("train", "valid", "test")
REWARD_FOLDS = 2


class IterateParams(RunParams):
    """Parameters of one RLRF4Rec run (the Prefect UI form and the command line)."""

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "max_users": 100,
            "rounds": 2,
            "n_samples": 4,
            "max_new_tokens": 96,
            "max_prompt_tokens": 300,
            "dpo_max_steps": 2,
            "backbones": ["dlcm", "prm"],
            "seeds": [1],
            "reranker_settings": "fast",
            "dpo_settings": "fast",
            "eval_each_round": False,
            "item_knowledge": "title",
        },
        "study": {
            "max_users": 0,
            "rounds": 2,
            "n_samples": 4,
            "max_new_tokens": 96,
            "max_prompt_tokens": 300,
            "knowledge_encoding": "answer",
            "reward_metric": "ndcg@5+auc",
            "round_users": 300,
            "backbones": ["dlcm", "prm"],
            "seeds": [1, 2, 3],
            "reranker_settings": "fast",
            "dpo_settings": "fast",
            "eval_each_round": False,
            "item_knowledge": "title",
        },
        "paper": {
            "max_users": 0,
            "rounds": 3,
            "n_samples": 8,
            "max_new_tokens": 512,
            "max_prompt_tokens": 0,
            "backbones": ["dlcm", "prm"],
            "seeds": [1, 2, 3],
            "reranker_settings": "paper",
            "dpo_settings": "paper",
            "eval_each_round": True,
            "amazon_build": "kar",
            "keep_short_chunk": True,
            "prompt_style": "kar",
            "item_knowledge": "llm",
        },
    }

    dataset: Literal["ml-100k", "ml-1m", "amazon-books"] = Field("ml-100k", description="data set")
    amazon_build: Literal["kcore", "kar"] | None = Field(
        None,
        description="amazon-books: kcore (Books.json, 5-core) or kar (KAR's Books_5 build: 60/40 "
        "core, history cap 15, label rating > 4) (profile; paper: kar, else kcore)",
    )
    max_users: int | None = Field(
        None, ge=0, description="seeded random subset of users; 0 = all (profile)"
    )
    seed: int = Field(42, ge=0, description="seed of the data split, negatives and sampling")
    encoder: str = Field(
        "all-MiniLM-L6-v2",
        description="knowledge encoder: the offline default, a local folder or a HF id",
    )
    rounds: int | None = Field(None, ge=1, description="DPO rounds R (profile)")
    n_samples: int | None = Field(
        None, ge=2, description="N texts sampled per train user and round (profile)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    knowledge_temperature: float | None = Field(
        None,
        ge=0,
        description="temperature of the one text per user that the rerankers read (round 0 "
        "and every evaluated round); 0 = greedy; unset = --temperature",
    )
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling top-p")
    max_new_tokens: int | None = Field(
        None, ge=1, description="token budget of each answer (profile)"
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=0,
        description="cap of the policy's prompt in tokens: the oldest history entries are left "
        "out (the knowledge text keeps them all); 0 = no cap (profile); quick's 300 cuts the "
        "prompt tokens by 39% without a measurable change of the reward (see the README)",
    )
    n_shards: int = Field(
        0, ge=0, description="sampling shards, one engine each; 0 = one per GPU (1 on CPU)"
    )
    reward_backbone: Backbone = Field("dlcm", description="backbone of the reward reranker")
    reward_metric: Literal["ndcg@5", "map@5", "soft_auc", "ndcg@5+auc"] | None = Field(
        None,
        description="per-sample reward used for pairing: the paper's ndcg@5 (or map@5), the "
        "continuous soft_auc, or ndcg@5+auc (NDCG@5 with soft-AUC breaking its ties); default "
        "ndcg@5 (profile)",
    )
    knowledge_encoding: Literal["kar", "answer", "split"] | None = Field(
        None,
        description="what the encoder reads: kar = profile, history and answer as one text (KAR, "
        "the paper), answer = the answer alone, split = history and answer encoded apart and "
        "averaged; default kar (profile)",
    )
    round_users: int | None = Field(
        None,
        ge=0,
        description="seeded subset of train users sampled and paired each round (the final "
        "evaluation keeps every user); 0 = all",
    )
    diagnostic_users: int = Field(
        32,
        ge=0,
        description="validation users whose texts measure each policy's KL to the reference "
        "and DPO's held-out pair accuracy (0 = skip)",
    )
    pairing: Literal["best_worst", "all_pairs", "mu_2sigma"] = Field(
        "best_worst",
        description="best_worst (the paper), all_pairs with a margin, or mu - 2 sigma rejected",
    )
    min_margin: float = Field(
        0.0, ge=0, description="drop pairs whose reward difference is below this"
    )
    backbones: list[Backbone] | None = Field(
        None, description="backbones of the final evaluation, e.g. dlcm,prm (profile)"
    )
    seeds: list[int] | None = Field(
        None, description="seeds of the final rerankers, e.g. 1,2,3 (profile)"
    )
    reranker_settings: Literal["fast", "paper"] | None = Field(
        None, description="reranker training: fast CPU default or the paper's (profile)"
    )
    reranker_epochs: int | None = Field(None, ge=1, description="override reranker epochs")
    dpo_settings: Literal["fast", "paper"] | None = Field(
        None, description="DPO: fast CPU default or the paper's (profile)"
    )
    dpo_beta: float | None = Field(None, gt=0, description="DPO beta (the paper: 0.01; profile)")
    dpo_lr: float | None = Field(
        None, gt=0, description="DPO learning rate (fast: 1e-4, the paper: 5e-5; profile)"
    )
    dpo_epochs: float | None = Field(
        None, gt=0, description="DPO passes over a round's pairs (fast: 1, the paper: 3; profile)"
    )
    dpo_lora_layers: int | None = Field(
        None,
        ge=0,
        description="DPO's LoRA on the top this many decoder layers only (0 = every layer, the "
        "paper): the backward pass stops at the lowest adapted layer, 1.5x faster on a 2-core "
        "CPU (bench/bench_dpo.py; profile)",
    )
    dpo_max_steps: int | None = Field(
        None, ge=1, description="cap DPO optimiser steps per round (profile; quick: 2)"
    )
    dpo_reference: Literal["base", "previous"] = Field(
        "base", description="DPO reference policy: the base model or the previous round's"
    )
    dpo_gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in DPO's backward pass: less memory, slower "
        "(unset: off, on with the paper's DPO settings; the README gives the measured trade)",
    )
    eval_each_round: bool | None = Field(
        None, description="evaluate every round's policy on test users (Fig. 4) (profile)"
    )
    keep_short_chunk: bool | None = Field(
        None,
        description="keep a user's last chunk under 4 items, filled with negatives (KAR) "
        "(profile; paper: on)",
    )
    prompt_style: Literal["default", "kar"] | None = Field(
        None, description="prompt texts: default or KAR's word for word (profile; paper: kar)"
    )
    item_knowledge: str | None = Field(
        None,
        description="what each item's vector is encoded from: title (title and genres), llm "
        "(the base policy's greedy answer to KAR's item prompt, as KAR) or the PATH of a parquet "
        "(item_id, text) or JSON file ({item id: text}, or KAR's item.klg) (profile; paper: llm, "
        "else title)",
    )
    item_knowledge_tokens: int | None = Field(
        None, ge=1, description="token budget of each item answer (llm); unset = max_new_tokens"
    )

    @field_validator("backbones")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one backbone (dlcm, prm)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("give at least one seed, without repeats")
        return v

    @field_validator("item_knowledge")
    @classmethod
    def _item_knowledge(cls, v: str | None) -> str | None:
        from tasks.rlrf4rec.item_knowledge import SOURCES

        if v is None or v in SOURCES:
            return v
        path = Path(v).expanduser()
        if not path.is_file() or path.suffix not in (".parquet", ".json"):
            raise ValueError(
                f"{v!r}: expected title, llm or the path of an existing .parquet or .json file"
            )
        return str(path.resolve())

    @field_validator("encoder")
    @classmethod
    def _encoder_path(cls, v: str) -> str:
        from flows.common import existing_path

        return existing_path(v) or v

    @model_validator(mode="after")
    def _configs_build(self) -> IterateParams:
        LoopConfig.of(self.resolved())  # a bad preset fails here, at parse time
        return self


# --------------------------------------------------------------------------- typed configs


@dataclass(frozen=True)
class LoopConfig:
    """The stages' settings, built once from the resolved parameters."""

    lists: ListsConfig
    sampling: SamplingConfig
    reward: TrainConfig
    pairing: PairingConfig
    dpo: DPOConfig
    reranker: TrainConfig
    rounds: int
    backbones: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_each_round: bool
    encoding: str = "kar"
    round_users: int = 0
    diagnostic_users: int = 32
    amazon: AmazonConfig | None = None  # how amazon-books is built; None for the other sets
    prompt_style: str = "default"
    knowledge_temperature: float | None = None
    item_knowledge: str = "title"  # title, llm or a file path
    item_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0)  # greedy, as KAR

    @classmethod
    def of(cls, p: IterateParams) -> LoopConfig:
        base = TrainConfig.paper("dlcm") if p.reranker_settings == "paper" else TrainConfig()
        if p.reranker_epochs:
            base = replace(base, epochs=p.reranker_epochs)
        dpo = DPOConfig.paper() if p.dpo_settings == "paper" else DPOConfig()
        dpo = replace(
            dpo,
            beta=p.dpo_beta or dpo.beta,
            lr=p.dpo_lr or dpo.lr,
            epochs=p.dpo_epochs or dpo.epochs,
            lora_layers=p.dpo_lora_layers or dpo.lora_layers,
            ref=p.dpo_reference,
        )
        if p.dpo_max_steps:
            dpo = replace(dpo, max_steps=p.dpo_max_steps)
        if p.dpo_gradient_checkpointing is not None:
            dpo = replace(dpo, gradient_checkpointing=p.dpo_gradient_checkpointing)
        answer_tokens = _given(p.max_new_tokens, "max_new_tokens")
        amazon = (
            AmazonConfig(build=p.amazon_build or "kcore") if p.dataset == "amazon-books" else None
        )
        return cls(
            lists=lists_config_for(
                p.dataset,
                amazon,
                ListsConfig(seed=p.seed, keep_short_chunk=bool(p.keep_short_chunk)),
            ),
            sampling=SamplingConfig(
                n=_given(p.n_samples, "n_samples"),
                temperature=p.temperature,
                top_p=p.top_p,
                max_new_tokens=answer_tokens,
                seed=p.seed,
            ),
            reward=replace(base, backbone=p.reward_backbone, seed=p.seed),
            pairing=PairingConfig(
                p.pairing, p.min_margin, REWARD_COLUMNS[p.reward_metric or "ndcg@5"]
            ),
            dpo=dpo,
            reranker=base,
            rounds=_given(p.rounds, "rounds"),
            backbones=tuple(_given(p.backbones, "backbones")),
            seeds=tuple(_given(p.seeds, "seeds")),
            eval_each_round=bool(p.eval_each_round),
            encoding=p.knowledge_encoding or "kar",
            round_users=p.round_users or 0,
            diagnostic_users=p.diagnostic_users,
            amazon=amazon,
            prompt_style=p.prompt_style or "default",
            knowledge_temperature=p.knowledge_temperature,
            item_knowledge=p.item_knowledge or "title",
            item_sampling=SamplingConfig(
                n=1,
                temperature=0.0,
                max_new_tokens=p.item_knowledge_tokens or answer_tokens,
                seed=p.seed,
            ),
        )

    def sampling_for(self, round_idx: int, n: int) -> SamplingConfig:
        """Round ``round_idx``'s sampler: ``n`` texts per prompt, its own seed."""
        return replace(self.sampling, n=n, seed=self.sampling.seed + 1000 * round_idx)

    def knowledge_sampling_for(self, round_idx: int) -> SamplingConfig:
        """Round ``round_idx``'s one text per user: its sampler with n = 1, at
        ``knowledge_temperature`` when set (0 = greedy)."""
        cfg = self.sampling_for(round_idx, 1)
        if self.knowledge_temperature is None:
            return cfg
        return replace(cfg, temperature=self.knowledge_temperature)

    def dpo_for(self, round_idx: int) -> DPOConfig:
        return replace(self.dpo, seed=self.sampling.seed + round_idx)

    def reranker_for(self, backbone: str, seed: int) -> TrainConfig:
        return replace(self.reranker, backbone=backbone, seed=seed)


def _given(value: T | None, name: str) -> T:
    """A parameter the profile must have filled."""
    if value is None:
        raise ValueError(f"{name} is unset and the profile gives no value")
    return value


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
    dpo: Artefact
    final_knowledge: Knowledge | None = None

    @property
    def tag(self) -> str:
        return f"round_{self.index:02d}"

    def record(self) -> dict[str, Any]:
        """The round's row of the report and its MLflow metrics."""
        return {
            "round": self.index,
            "generation": self.knowledge.samples.stats,
            "reward": self.scored.stats,
            "pairs": self.pairs.stats,
            "dpo": {
                **self.dpo.stats.get("metrics", {}),
                "skipped": int(self.dpo.skipped is not None),
                **({"skipped_reason": self.dpo.skipped} if self.dpo.skipped else {}),
            },
        }

    def seconds(self) -> dict[str, float]:
        out = self.knowledge.seconds(self.tag)
        for name, stage in (("score", self.scored), ("pair", self.pairs), ("dpo", self.dpo)):
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


# --------------------------------------------------------------------------- the flow


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


@flow(name="rlrf4rec-loop", validate_parameters=False)
def rlrf4rec_loop(p: IterateParams, ctx: RunContext) -> dict:
    """Algorithm 1: round zero, R rounds, the held-out measures, the final evaluation, the
    report."""
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
        learning = measure_learning(loop, policies, rounds, reward_model)
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
        **evaluation.timings,
    }
    return report(loop, knowledge0, rounds, evaluation, learning, timings=timings, t_start=t_start)


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


def prepare_inputs(p: IterateParams, cfg: LoopConfig, ctx: RunContext) -> Inputs:
    """The data set as reranking lists, one prompt per user, the item vectors."""
    data = stages.prepare_data(
        p.dataset,
        data_dir=InputRef.of(p.data_dir) if p.data_dir else None,
        lists=cfg.lists,
        max_users=p.max_users or None,
        amazon=cfg.amazon,
        out=ctx.run_dir / "data",
    )
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
    return stages.merge_samples(shards, out=out_dir / "samples.parquet")


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


def run_round(loop: Loop, r: int, policy: Policy, reward_model: Artefact) -> Round:
    """Sample N texts per train user (and per validation user, who never enter a pair), score
    them, pair best and worst of each train user, train with DPO."""
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
    if this.dpo.skipped is None:
        log_training_curve(tracker, child, this.dpo, "dpo")
        tracker.artifact(child, this.dpo.path, "adapter")
    tracker.end(child)
    progress_round(loop, this)


def progress_round(loop: Loop, this: Round) -> None:
    """The round's line in the Prefect run log: users sampled, pairs kept, DPO loss."""
    gen, pairs = this.knowledge.samples.stats, this.pairs.stats
    metrics = this.dpo.stats.get("metrics", {})
    if this.dpo.skipped is not None:
        dpo = f"DPO skipped ({this.dpo.skipped})"
    else:
        dpo = f"DPO loss {metrics.get('loss', float('nan')):.4f} over {metrics.get('steps')} steps"
    progress(
        "round %d/%d: %s users sampled (%s texts, %.0f%% degenerate), reward mean %.4f, "
        "%s pairs kept of %s users, %s",
        this.index,
        loop.cfg.rounds,
        gen.get("users"),
        gen.get("samples"),
        100 * gen.get("degenerate_share", 0.0),
        this.scored.stats.get(f"{loop.cfg.pairing.reward_col}_mean", float("nan")),
        pairs.get("pairs"),
        pairs.get("users"),
        dpo,
    )


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
    """Score what each policy wrote: policy r < R wrote round r+1's samples; the last policy
    writes N more texts per validation user here, and its train reward is that of its
    knowledge texts (one per train user)."""
    import polars as pl

    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec import learning

    rd, cfg, timings = loop.ctx.run_dir / "heldout", loop.cfg, {}
    heldout, final = write_heldout(loop, policies[-1], reward_model, out_dir=rd)
    release_engines()  # the last sampling of the run
    last = rounds[-1].final_knowledge
    assert last is not None, "the last round always writes its knowledge"
    final_train = score(loop, reward_model, last, out=rd / "final_knowledge_scored.parquet")
    own = [this.scored for this in rounds] + [final]  # own[r]: what policy r wrote
    timings.update(heldout.seconds("heldout"))
    timings["heldout.score"] = measured_seconds(final, final_train)
    data = load_prepared(stages.run_folder(loop.inputs.data))
    titles = learning.history_titles(data.history, data.items)
    frames = [pl.read_parquet(a.path) for a in own]
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
            train_scored=_round_users(pl.read_parquet(final_train.path), loop) if is_last else None,
        )
        valid = frame.filter(pl.col("split") == "valid")
        record["examples"] = learning.example_texts(valid, shown, reward_col)
        if r >= 1 and cfg.diagnostic_users:
            drift = policy_drift(loop, policies[r], own[r], own[r - 1], r)
            timings[f"heldout.drift_{r}"] = measured_seconds(drift)
            record["drift"] = learning.drift_figures(pl.read_parquet(drift.path), cfg.dpo.beta)
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
    """Base / KAR / RLRF4Rec rerankers per backbone and seed on the test users, and Fig. 4's
    test metrics of every evaluated round (reward backbone, first seed)."""
    final = rounds[-1].final_knowledge
    assert final is not None, "the last round always writes its knowledge"
    rows = {"base": None, "KAR": knowledge0.vectors, "RLRF4Rec": final.vectors}
    ev = Evaluation()
    eval_dir = loop.ctx.run_dir / "eval"
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


DESCRIPTION = __doc__.split("\n\n")[0] + RESUME_NOTE


def main(argv: list[str] | None = None) -> int:
    return run_main(
        IterateParams, iterate, argv, prog="python -m flows.iterate", description=DESCRIPTION
    )


if __name__ == "__main__":
    sys.exit(main())
