"""The second pipeline's parameters (the command line and the Prefect form of
``python -m flows.direct``), its profiles, and the typed stage configs built from them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from flows.common import RunParams, existing_path
from tasks.direct.baselines import BaselineConfig
from tasks.direct.title_mapping import MappingConfig
from tasks.direct.windows import WindowConfig
from tasks.llm.dpo import DPOConfig
from tasks.llm.online_rl import OnlineRLConfig
from tasks.llm.reward_model import RewardModelConfig
from tasks.llm.sampling import SamplingConfig
from tasks.llm.sft import SFTConfig
from tasks.pairing import PairingConfig

Stage = Literal["sft", "dpo", "rl", "rlhf"]
STAGE_ORDER = ("sft", "dpo", "rl", "rlhf")

# Values a profile gives to every parameter left unset (None).
PROFILES: dict[str, dict] = {
    "quick": {
        "seeds": [0],
        "max_train_users": 16,
        "max_pref_users": 8,
        "max_rl_users": 8,
        "max_eval_users": 32,
        "n_samples": 4,
        "temperature": 1.0,
        "top_p": 0.95,
        "max_new_tokens": 96,
        "stages": ["sft", "dpo", "rl"],
        "train_settings": "fast",
        "sft_epochs": 1.0,
        "sft_lr": 1e-3,
        "sft_max_steps": 0,
        "lora_layers": 0,
        "dpo_max_steps": 4,
        "rl_max_steps": 1,
        "rm_max_steps": 4,
        "format_bonus": 0.005,
    },
    # Every ML-100K user on a 2-core CPU in at most about 90 minutes, sized for a CPU without
    # native bf16 (README, "The study profile"): SFT over every train window for half an epoch
    # (an SFT example costs ~4 s there), LoRA on the top 15 of 30 layers, DPO pairs sampled from
    # the SFT policy with You et al.'s settings, capped DPO / RL / RLHF steps, every test user
    # evaluated. One seed: a seed reruns every stage (its own split and windows).
    "study": {
        "seeds": [0],
        "max_train_users": 0,
        "max_pref_users": 96,
        "max_rl_users": 0,
        "max_eval_users": 0,
        "n_samples": 5,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_new_tokens": 72,
        "stages": ["sft", "dpo", "rl", "rlhf"],
        "train_settings": "fast",
        "sft_epochs": 0.5,
        "sft_lr": 1e-3,
        "sft_max_steps": 0,
        "lora_layers": 15,
        "dpo_max_steps": 24,
        "rl_max_steps": 8,
        "rm_max_steps": 0,
        "format_bonus": 0.0,
    },
    "paper": {
        "seeds": [0, 1, 2],
        "max_train_users": 0,
        "max_pref_users": 0,
        "max_rl_users": 0,
        "max_eval_users": 0,
        "n_samples": 5,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_new_tokens": 128,
        "stages": ["sft", "dpo", "rl", "rlhf"],
        "train_settings": "paper",
        "sft_epochs": 3.0,
        "sft_lr": 5e-5,
        "sft_max_steps": 0,
        "lora_layers": 0,
        "dpo_max_steps": 0,
        "rl_max_steps": 0,
        "rm_max_steps": 0,
        "format_bonus": 0.0,
    },
}


class DirectParams(RunParams):
    """Parameters of one run of the second pipeline (the Prefect UI form and the command line)."""

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = PROFILES
    RUN_PREFIX: ClassVar[str] = "direct-"
    FLOW_MODULE: ClassVar[str] = "flows.direct"

    dataset: Literal["ml-100k", "ml-1m"] = Field("ml-100k", description="data set")
    zip_table: str | None = Field(
        None,
        description="CSV with columns zip, city, state: the prompt then says 'from City, ST'; "
        "without it the ZIP code itself is shown",
    )
    seeds: list[int] | None = Field(
        None,
        description="one full run per seed (split, windows, sampling, training), e.g. 0,1,2; "
        "several give a mean with a 95 percent confidence interval (profile)",
    )
    context_size: int = Field(10, ge=1, description="ratings in the prompt window")
    k_min: int = Field(
        3, ge=1, description="a window needs at least this many liked or this many hated ratings"
    )
    liked_cap: int = Field(5, ge=0, description="most recent liked movies shown in the prompt")
    hated_cap: int = Field(5, ge=0, description="most recent hated movies shown in the prompt")
    min_ground_truth: int = Field(
        5, ge=1, le=5, description="a window needs this many liked movies after it (of 5)"
    )
    release_cutoff: Literal["dataset", "window"] = Field(
        "dataset",
        description="'released before' date: the data set's last rating day (the paper's "
        "'April 22nd, 1998') or the window's own cut-off day",
    )
    windows_per_train_user: int = Field(
        1, ge=1, description="distinct random windows per train user (more SFT/RL prompts)"
    )
    max_train_users: int | None = Field(
        None, ge=0, description="train users for SFT; 0 = all (profile)"
    )
    max_pref_users: int | None = Field(
        None,
        ge=0,
        description="train users sampled for DPO pairs and the reward model; 0 = all (profile)",
    )
    max_rl_users: int | None = Field(
        None, ge=0, description="train users whose prompts online RL uses; 0 = all (profile)"
    )
    max_eval_users: int | None = Field(
        None, ge=0, description="test users evaluated (same for every row); 0 = all (profile)"
    )
    stages: list[Stage] | None = Field(
        None, description="training stages after Base, e.g. sft,dpo,rl,rlhf (profile)"
    )
    max_new_tokens: int | None = Field(
        None, ge=8, description="token budget of an answer (profile)"
    )
    eval_temperature: float = Field(
        0.0, ge=0, description="decoding temperature of every evaluation; 0 = greedy"
    )
    n_samples: int | None = Field(
        None,
        ge=2,
        description="answers sampled per train prompt from the SFT policy for the DPO pairs "
        "(You et al.: 5; profile)",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="sampling temperature of the DPO samples and the RL rollouts "
        "(You et al.: 0.6; profile)",
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="nucleus sampling top-p (You et al.: 0.9; profile)"
    )
    pairing: Literal["all_pairs", "best_worst", "mu_2sigma"] = Field(
        "all_pairs",
        description="all_pairs: every pair of samples with different NDCG@5 (the paper); "
        "best_worst: one pair per prompt; mu_2sigma: the best against one near mean - 2 std",
    )
    min_margin: float = Field(
        0.0, ge=0, description="drop pairs whose NDCG@5 gap is below this (kept at exactly it)"
    )
    format_bonus: float | None = Field(
        None,
        ge=0,
        le=0.005,
        description="added to NDCG@5 in the DPO pairing and the RL reward: this times the share "
        "of the 5 slots filled with distinct catalogue titles; breaks NDCG ties only (<= 0.005); "
        "0 = the paper (profile)",
    )
    max_pairs_per_prompt: int | None = Field(
        None, ge=1, description="keep at most this many pairs per prompt (largest gaps)"
    )
    score_cutoff: float | None = Field(
        None,
        ge=0,
        le=100,
        description="WRatio score below which a title counts as unmapped (none = the paper)",
    )
    exclude_context: bool = Field(
        True,
        description="map titles only onto movies the user has not rated before the window's "
        "end (the prompt's own window and every earlier rating); a departure from You et al., "
        "whose mapping lets an answer score with a movie already seen; --no-exclude-context "
        "maps onto the whole catalogue, as they do",
    )
    you_et_al_exact: bool = Field(
        False,
        description="build windows and prompt as You et al.'s code does: a cut-off once 5 "
        "ratings >= 4 or 5 ratings <= 2 came up to it, ground truth strictly after it (at least "
        "1 liked), movies newest first, their prompt with its 'Do not repeat' line; "
        "context_size 10, k_min and min_ground_truth are then theirs",
    )
    train_settings: Literal["fast", "paper"] | None = Field(
        None,
        description="LoRA trainers: fast CPU defaults or the paper's settings (profile)",
    )
    sft_epochs: float | None = Field(
        None, gt=0, description="SFT passes over every train window (You et al.: 3; profile)"
    )
    sft_lr: float | None = Field(None, gt=0, description="SFT learning rate (profile)")
    sft_max_steps: int | None = Field(None, ge=0, description="cap SFT steps; 0 = epochs")
    dpo_max_steps: int | None = Field(None, ge=0, description="cap DPO steps; 0 = epochs")
    lora_layers: int | None = Field(
        None,
        ge=0,
        description="LoRA on the top this many decoder layers only (0 = every layer, as You et "
        "al.): without gradient checkpointing the backward pass stops at the lowest adapted "
        "layer, 1.45x faster SFT on a 2-core CPU (bench/bench_sft.py; profile)",
    )
    dpo_beta: float = Field(0.1, gt=0, description="DPO beta (TRL's default; the paper gives none)")
    rl_algorithm: Literal["grpo", "rloo"] = Field("grpo", description="online RL algorithm")
    rl_beta: float = Field(
        0.04,
        ge=0,
        description="KL coefficient of online RL and RLHF towards the SFT policy (TRL's "
        "default 0.04; 0 = no KL term)",
    )
    rl_max_steps: int | None = Field(None, ge=0, description="cap online-RL steps; 0 = epochs")
    rm_input: Literal["answer", "prompt_answer"] = Field(
        "answer",
        description="what the RLHF reward model reads: the answer alone (You et al.) or the "
        "prompt and the answer",
    )
    rm_max_steps: int | None = Field(None, ge=0, description="cap reward-model steps; 0 = epochs")
    baseline_history: Literal["full", "context"] = Field(
        "full",
        description="what the reference recommenders know of a user: every rating before the "
        "window's end, or only the prompt's window",
    )
    knn_neighbours: int = Field(50, ge=1, description="item-kNN: neighbours kept per item")
    experiment: str = Field("rlrf4rec-direct", description="MLflow experiment name")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("give at least one seed >= 0, without repeats")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("a stage is listed twice")
        return v

    @field_validator("zip_table")
    @classmethod
    def _zip_table(cls, v: str | None) -> str | None:
        return existing_path(v)

    @model_validator(mode="after")
    def _consistent(self) -> DirectParams:
        if self.k_min > self.context_size:
            raise ValueError(
                f"k_min ({self.k_min}) must not exceed context_size ({self.context_size})"
            )
        if self.liked_cap == 0 and self.hated_cap == 0:
            raise ValueError("liked_cap and hated_cap are both 0: the prompt would be empty")
        return self

    @model_validator(mode="after")
    def _configs_build(self) -> DirectParams:
        StageConfigs.of(self.resolved(), seed=0)  # a bad preset fails here, at parse time
        return self


# --------------------------------------------------------------------------- typed configs


@dataclass(frozen=True)
class StageConfigs:
    """The settings of every stage for one seed, built once from the resolved parameters."""

    windows: WindowConfig
    baselines: BaselineConfig
    mapping: MappingConfig
    eval_sampling: SamplingConfig
    pref_sampling: SamplingConfig
    format_bonus: float
    pairing: PairingConfig
    sft: SFTConfig
    dpo: DPOConfig
    rl: OnlineRLConfig
    reward_model: RewardModelConfig

    @classmethod
    def of(cls, p: DirectParams, seed: int) -> StageConfigs:
        paper = p.train_settings == "paper"
        tokens = p.max_new_tokens or 64
        top_p = p.top_p or 0.95
        temperature = p.temperature or 1.0
        sampling = SamplingConfig(
            n=1, temperature=p.eval_temperature, top_p=top_p, max_new_tokens=tokens, seed=seed
        )
        exact = p.you_et_al_exact
        layers = p.lora_layers or 0
        sft = SFTConfig.you_et_al() if paper else SFTConfig.direct_cpu()
        dpo = DPOConfig.you_et_al() if paper else DPOConfig.direct_cpu()
        rl = OnlineRLConfig.you_et_al() if paper else OnlineRLConfig.direct_cpu()
        return cls(
            windows=WindowConfig(
                seed=seed,
                context_size=10 if exact else p.context_size,
                k_min=p.k_min,
                liked_cap=5 if exact else p.liked_cap,
                hated_cap=5 if exact else p.hated_cap,
                min_ground_truth=1 if exact else p.min_ground_truth,
                windows_per_train_user=p.windows_per_train_user,
                release_cutoff=p.release_cutoff,
                you_et_al_exact=exact,
            ),
            baselines=BaselineConfig(history=p.baseline_history, neighbours=p.knn_neighbours),
            mapping=MappingConfig(score_cutoff=p.score_cutoff, exclude_context=p.exclude_context),
            eval_sampling=sampling,
            pref_sampling=replace(
                sampling, n=p.n_samples or 4, temperature=temperature, seed=seed + 1
            ),
            format_bonus=p.format_bonus or 0.0,
            pairing=PairingConfig.direct(p.pairing, p.min_margin, p.max_pairs_per_prompt),
            sft=replace(
                sft,
                seed=seed,
                lora_layers=layers,
                epochs=p.sft_epochs or sft.epochs,
                lr=p.sft_lr or sft.lr,
                max_steps=p.sft_max_steps or -1,
            ),
            # The reference policy is the one DPO starts from (the SFT policy): TRL keeps a
            # frozen copy of the adapter it trains further (tasks.llm.dpo.dpo_reference).
            dpo=replace(
                dpo,
                seed=seed,
                beta=p.dpo_beta,
                ref="previous",
                max_steps=p.dpo_max_steps or -1,
                lora_layers=layers,
            ),
            # RL trains the SFT adapter further; with beta > 0 TRL keeps a frozen copy of it as
            # the KL reference, so the KL term pulls towards the SFT policy
            # (tasks.llm.online_rl.rl_reference).
            rl=replace(
                rl,
                seed=seed,
                algorithm=p.rl_algorithm,
                num_generations=4,
                max_completion_length=tokens,
                beta=p.rl_beta,
                temperature=temperature,
                top_p=top_p,
                max_steps=p.rl_max_steps or -1,
                lora_layers=layers,
            ),
            reward_model=RewardModelConfig(
                batch_size=1 if paper else 2,
                seed=seed,
                max_length=512,
                max_steps=p.rm_max_steps or -1,
                rm_input=p.rm_input,
            ),
        )
