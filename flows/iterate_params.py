"""The iterate flow's parameters (the Prefect form and the command line), its profiles, and
the typed configs of its stages, built once from them (:class:`LoopConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from flows.common import RunParams
from tasks.data.datasets import AmazonConfig
from tasks.data.lists import ListsConfig
from tasks.data.parted_assets import ENCODER_HELP
from tasks.data.prepare import lists_config_for
from tasks.llm.dpo import DPOConfig
from tasks.llm.sampling import SamplingConfig
from tasks.pairing import PairingConfig
from tasks.rlrf4rec.reranker import TrainConfig
from tasks.rlrf4rec.reward import REWARD_COLUMNS

Backbone = Literal["dlcm", "prm"]
T = TypeVar("T")
REWARD_FOLDS = 2


class IterateParams(RunParams):
    """Parameters of one RLRF4Rec run (the Prefect UI form and the command line)."""

    FLOW_MODULE: ClassVar[str] = "flows.iterate"  # MLflow's source: the module users run
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {
            "max_users": 100,
            "rounds": 2,
            "n_samples": 4,
            "max_new_tokens": 96,
            "max_prompt_tokens": 300,
            "knowledge_encoding": "answer",
            "reward_contrastive": 1.0,
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
            "reward_contrastive": 1.0,
            "round_users": 300,
            "backbones": ["dlcm", "prm"],
            "seeds": [1, 2, 3],
            "reranker_settings": "fast",
            "dpo_settings": "fast",
            "eval_each_round": False,
            "item_knowledge": "title",
        },
        # A DIAGNOSTIC of the loop, not the paper's experiment: pairs by the genre reward
        # (tasks.rlrf4rec.genre_reward), which reads the text by construction, with a DPO that
        # moves the policy (README: "The loop learns when the reward is learnable").
        "loop-check": {
            "max_users": 400,
            "rounds": 3,
            "n_samples": 8,
            "max_new_tokens": 48,
            "max_prompt_tokens": 300,
            "reward_metric": "genres",
            "round_users": 64,
            "dpo_lr": 5e-4,
            "dpo_beta": 0.1,
            "dpo_epochs": 3.0,
            "dpo_lora_layers": 15,
            "backbones": ["dlcm"],
            "seeds": [1],
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

    profile: Literal["quick", "study", "loop-check", "paper"] = Field(
        "quick",
        description="quick: CPU, a subset of users, minutes; study: every user at CPU settings, "
        "the experiment a 2-core CPU runs in a session (about 2 hours); loop-check: a "
        "DIAGNOSTIC of the loop, not the paper's reward: pairs by the genre reward (see "
        "--reward-metric genres) on 400 users, 3 rounds (about 1.5 hours on one core of a "
        "2-core CPU without bf16); paper: all "
        "users, the paper's settings. Fills every parameter left unset.",
    )
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
    encoder: str = Field("all-MiniLM-L6-v2", description=ENCODER_HELP)
    rounds: int | None = Field(
        None,
        ge=0,
        description="DPO rounds R (profile); 0 = measure the policy alone: its knowledge for "
        "every user, one round's samples scored and paired without DPO, the reward "
        "diagnostics and Table I's base, profile and KAR rows",
    )
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
    reward_metric: Literal["ndcg@5", "map@5", "soft_auc", "ndcg@5+auc", "genres"] | None = Field(
        None,
        description="per-sample reward used for pairing: the paper's ndcg@5 (or map@5), the "
        "continuous soft_auc, ndcg@5+auc (NDCG@5 with soft-AUC breaking its ties), or genres: "
        "a DIAGNOSTIC, not the paper's reward (the share of the user's 3 most liked genres, "
        "from the positives of their lists, that the text names; it checks that sampling, "
        "pairing, DPO and the rounds move the policy); default ndcg@5 (profile)",
    )
    reward_contrastive: float | None = Field(
        None,
        ge=0,
        description="weight of the reward model's knowledge-contrastive term (a list scored "
        "with its own user's knowledge must fit better than with another user's); 0 = the "
        "paper's reward model (profile; quick and study 1.0: docs/reward.md says why)",
    )
    reward_diagnostics: bool = Field(
        True,
        description="measure whether the reward reads the text, on round 1's samples: text "
        "sensitivity, spread, reliability (a second reward model, another seed) and the reward "
        "model's knowledge ablation; in the report, results.json and MLflow",
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
    reward_diagnostics: bool = True
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
            reward=replace(
                base,
                backbone=p.reward_backbone,
                seed=p.seed,
                contrastive=p.reward_contrastive or 0.0,
            ),
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
            reward_diagnostics=p.reward_diagnostics,
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
