"""Online RL of the policy LLM with a Python reward function: TRL GRPO (or RLOO) + LoRA.

The second pipeline (You et al.) ends with online RL on the same reward as its DPO stage
(NDCG@5 of the recommended titles). TRL 1.x has no PPOTrainer; GRPO (group-normalised
advantages over ``num_generations`` samples per prompt) and RLOO (leave-one-out baseline) are
the on-policy trainers it ships. Same conventions as :mod:`tasks.llm.dpo`: plain user messages in
TRL's conversational format, LoRA, fp32 on CPU and bf16 on GPU, ``init_adapter`` trained
further, outputs written to a temporary folder then renamed onto ``out_dir``.

The reward function sees plain strings::

    def reward_fn(prompts: list[str], completions: list[str], extra: dict[str, list]) -> list[float]

``prompts`` and ``completions`` have one entry per sampled completion (each prompt repeated
``num_generations`` times); ``extra`` holds the other columns of the prompts frame, aligned
with them (e.g. the user's ground-truth titles).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.memory import releases_memory
from tasks.llm.chat import user_messages
from tasks.llm.lora import (
    LoraTrainConfig,
    load_policy,
    require_columns,
    require_frozen_copy,
    resolve_device,
    save_outputs,
    summarize_log,
    trainer_args,
)

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str], dict[str, list]], Sequence[float]]
RL_METRIC_KEYS = (
    "loss",
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
)


@dataclass(frozen=True)
class OnlineRLConfig(LoraTrainConfig):
    """Online RL settings (see :class:`tasks.llm.lora.LoraTrainConfig` for the shared ones).

    Attributes:
        algorithm: ``grpo`` or ``rloo``.
        batch_size: prompts per device step; each brings ``num_generations`` completions.
        num_generations: completions sampled per prompt (>= 2).
        max_completion_length: token budget of a completion.
        temperature, top_p: sampling of the completions.
        beta: KL coefficient towards the reference (:func:`rl_reference`): the policy training
            starts from (a frozen copy of ``init_adapter``, e.g. the SFT policy), or the base
            model without one; 0 drops the KL term.
        lr: 5e-5 by default.
        max_length is not used here (prompts are not truncated).
    """

    lr: float = 5e-5
    algorithm: Literal["grpo", "rloo"] = "grpo"
    batch_size: int = 2
    num_generations: int = 4
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ("grpo", "rloo"):
            raise ValueError(
                f"OnlineRLConfig.algorithm must be 'grpo' or 'rloo', got {self.algorithm!r}"
            )
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"OnlineRLConfig.num_generations must be >= 2, got {self.num_generations!r}"
            )
        if self.max_completion_length < 1:
            raise ValueError(
                "OnlineRLConfig.max_completion_length must be >= 1, "
                f"got {self.max_completion_length}"
            )
        if self.beta < 0:
            raise ValueError(f"OnlineRLConfig.beta must be >= 0, got {self.beta}")

    @classmethod
    def you_et_al(cls, **overrides: Any) -> OnlineRLConfig:
        """Online RL at the scale of You et al.'s PPO: lr 1e-5, batch 4, LoRA r 8 / alpha 32."""
        base = cls(lr=1e-5, batch_size=4, grad_accum=1, lora_r=8, lora_alpha=32)
        return replace(base, lora_dropout=0.1, **overrides)

    @classmethod
    def direct_cpu(cls, **overrides: Any) -> OnlineRLConfig:
        """A few CPU steps for the second pipeline."""
        return replace(cls(lr=1e-4, batch_size=2), **overrides)


def _text(value: Any) -> str:
    """The text of a TRL prompt / completion: a string, or the last message's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    raise TypeError(f"unexpected prompt/completion value of type {type(value).__name__}")


def wrap_reward(reward_fn: RewardFn, extra_columns: Sequence[str]) -> Callable[..., list[float]]:
    """Adapt ``reward_fn`` (plain strings, extra columns dict) to TRL's reward interface."""
    extra_columns = list(extra_columns)

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        p = [_text(x) for x in prompts]
        c = [_text(x) for x in completions]
        extra = {k: list(kwargs[k]) for k in extra_columns if k in kwargs}
        values = list(reward_fn(p, c, extra))
        if len(values) != len(c):
            raise ValueError(f"reward_fn returned {len(values)} values for {len(c)} completions")
        return [float(v) for v in values]

    reward.__name__ = getattr(reward_fn, "__name__", "reward")
    return reward


def rl_dataset(prompts: pl.DataFrame) -> Any:
    """A ``datasets.Dataset``: conversational ``prompt`` plus the extra columns as they are."""
    from datasets import Dataset

    data = {c: prompts[c].to_list() for c in prompts.columns if c != "prompt"}
    data["prompt"] = user_messages(prompts["prompt"].to_list())
    return Dataset.from_dict(data)


@releases_memory
def train_online_rl(
    model: str,
    prompts: pl.DataFrame,
    reward_fn: RewardFn,
    out_dir: Path,
    cfg: OnlineRLConfig | None = None,
    init_adapter: str | None = None,
) -> dict[str, Any]:
    """Train the policy's LoRA adapter on-policy against ``reward_fn``.

    Args:
        model: the base model (path or id).
        prompts: ``prompt`` (plain user message) and any extra columns ``reward_fn`` needs.
        reward_fn: ``(prompts, completions, extra) -> rewards`` (see the module docstring).
        out_dir: output folder (replaced atomically).
        cfg: settings (default :class:`OnlineRLConfig` ``()``).
        init_adapter: an adapter to continue training (e.g. the DPO stage's).

    Returns:
        ``{"adapter_dir", "merged_dir", "metrics"}``; metrics has ``loss`` (the run's mean),
        ``reward``, ``reward_std``, ``kl``, ``entropy``, ``completions/mean_length`` (means over
        the last epoch's logged steps, where TRL logs them), ``train_seconds``,
        ``seconds_per_prompt``, ``n_prompts``, ``steps``.
    """
    cfg = cfg or OnlineRLConfig()
    if not isinstance(cfg, OnlineRLConfig):
        raise TypeError(f"cfg: expected an OnlineRLConfig, got {type(cfg).__name__}")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
    require_columns(prompts, ("prompt",), "prompts")
    if cfg.algorithm == "grpo":
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOTrainer as Trainer
    from tasks.llm import trl_cpu

    # the head's mode is process-wide: set here too, so that this stage computes the same
    # whether or not SFT or DPO ran before it in this process
    trl_cpu.install()

    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    policy, lora, tokenizer = load_policy(model, cfg, init_adapter, device)
    extra_columns = [c for c in prompts.columns if c != "prompt"]
    dataset = rl_dataset(prompts)
    reference = rl_reference(cfg, init_adapter)
    with atomic_dir(out_dir) as tmp:
        trl_args = trl_config(cfg, tmp / "trainer", device)
        trainer = Trainer(
            model=policy,
            reward_funcs=wrap_reward(reward_fn, extra_columns),
            args=trl_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        check_reference(trainer.model, reference, init_adapter)
        log.info(
            "%s: %d prompts x %d generations, beta %s, reference %s, device=%s",
            cfg.algorithm.upper(),
            prompts.height,
            cfg.num_generations,
            cfg.beta,
            reference,
            device,
        )
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
        metrics = summarize_log(trainer.state.log_history, RL_METRIC_KEYS)
        metrics.update(
            loss=float(result.training_loss),
            train_seconds=train_seconds,
            seconds_per_prompt=train_seconds / (prompts.height * cfg.epochs),
            n_prompts=prompts.height,
            steps=int(trainer.state.global_step),
            beta=cfg.beta,
        )
        out = save_outputs(trainer, tmp, out_dir, model, cfg, metrics, cfg.algorithm)
        del trainer
    log.info("%s done in %.1f s", cfg.algorithm.upper(), train_seconds)
    return {**out, "reference": reference}


def rl_reference(cfg: OnlineRLConfig, init_adapter: str | None) -> str | None:
    """The policy the KL term pulls towards: ``init_adapter`` (the policy training starts from,
    e.g. the SFT adapter), ``"base"`` without one, None when ``cfg.beta`` is 0 (no KL term).

    What TRL 1.x does with a PEFT model: a model loaded with a trained adapter gets a frozen
    copy of it, named ``ref``, that computes the reference log-probabilities; a fresh LoRA is
    disabled instead (the base model). :func:`check_reference` checks it on the built trainer.
    """
    if cfg.beta == 0:
        return None
    return str(init_adapter) if init_adapter else "base"


def check_reference(peft_model: Any, reference: str | None, init_adapter: str | None) -> None:
    """Fail when the trainer's reference is not the one :func:`rl_reference` names."""
    if reference is not None and init_adapter:
        require_frozen_copy(peft_model, init_adapter, "online RL")


def trl_config_kwargs(cfg: OnlineRLConfig, output_dir: Path, device: Any) -> dict[str, Any]:
    """The arguments of TRL's ``GRPOConfig`` / ``RLOOConfig`` for ``cfg``: ``beta`` is the KL
    coefficient towards the reference (:func:`rl_reference`)."""
    args = trainer_args(cfg, output_dir, device)
    args["per_device_train_batch_size"] = cfg.batch_size * cfg.num_generations
    return {
        **args,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "beta": cfg.beta,
        "remove_unused_columns": False,
        "log_completions": False,
    }


def trl_config(cfg: OnlineRLConfig, output_dir: Path, device: Any) -> Any:
    """TRL's ``GRPOConfig`` or ``RLOOConfig`` built from :func:`trl_config_kwargs`."""
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig as TRLConfig
    else:
        from trl import RLOOConfig as TRLConfig
    return TRLConfig(**trl_config_kwargs(cfg, output_dir, device))
