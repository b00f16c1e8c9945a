"""Supervised fine-tuning of the policy LLM on (prompt, completion) pairs: TRL SFT + LoRA.

The second pipeline (You et al.) fine-tunes the recommender LLM on its prompts and the
ground-truth next titles before DPO and online RL. Same conventions as :mod:`tasks.llm.dpo`:
plain user messages and assistant answers in TRL's conversational prompt-completion format
(the loss is on the completion only), LoRA, fp32 on CPU and bf16 on GPU, ``init_adapter``
trained further, outputs under ``out_dir`` (``adapter/``, ``merged/`` with ``merge=True``,
``metrics.json``, ``config.json``) written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.memory import releases_memory
from tasks.llm.chat import assistant_messages, user_messages
from tasks.llm.lora import (
    ALL_LINEAR,
    LoraTrainConfig,
    load_policy,
    require_columns,
    resolve_device,
    save_outputs,
    summarize_log,
    trainer_args,
)

log = logging.getLogger(__name__)

SFT_METRIC_KEYS = ("loss", "mean_token_accuracy", "entropy")


@dataclass(frozen=True)
class SFTConfig(LoraTrainConfig):
    """SFT settings (see :class:`tasks.llm.lora.LoraTrainConfig`); defaults: a fast CPU run.

    Attributes:
        lr: 2e-4 by default (a common LoRA SFT rate).
    """

    lr: float = 2e-4

    @classmethod
    def paper(cls, **overrides: Any) -> SFTConfig:
        """Settings of the same scale as the DPO paper run: batch 2 x 8, lr 5e-5, 3 epochs."""
        return replace(cls(batch_size=2, grad_accum=8, lr=5e-5, epochs=3.0), **overrides)

    @classmethod
    def you_et_al(cls, **overrides: Any) -> SFTConfig:
        """You et al.'s SFT: lr 5e-5, batch 8, 3 epochs, LoRA r 256 / alpha 128 on every
        linear layer."""
        base = cls(lr=5e-5, batch_size=8, epochs=3.0, lora_r=256, lora_alpha=128)
        return replace(base, lora_dropout=0.05, lora_target_modules=ALL_LINEAR, **overrides)

    @classmethod
    def direct_cpu(cls, **overrides: Any) -> SFTConfig:
        """A few CPU steps for the second pipeline: a large LoRA learning rate so that they
        move the policy, LoRA on every linear layer as You et al. (the MLPs hold what the
        model knows of titles; attention alone, 83 steps of the study profile left greedy
        answers collapsed to "['The (1995)', 'The (1994)', ...]")."""
        base = cls(lr=1e-3, batch_size=4, epochs=1.0, max_length=512)
        return replace(base, lora_target_modules=ALL_LINEAR, **overrides)


def sft_dataset(examples: pl.DataFrame) -> Any:
    """A ``datasets.Dataset`` in TRL's conversational prompt-completion format."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": user_messages(examples["prompt"].to_list()),
            "completion": assistant_messages(examples["completion"].to_list()),
        }
    )


@releases_memory
def train_sft(
    model: str,
    examples: pl.DataFrame,
    out_dir: Path,
    cfg: SFTConfig | None = None,
    init_adapter: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the policy's LoRA adapter on ``examples`` (loss on the completion only).

    Args:
        model: the base model (path or id).
        examples: ``prompt`` (plain user message) and ``completion`` (the assistant answer).
        out_dir: output folder (replaced atomically).
        cfg: settings (default :class:`SFTConfig` ``()``).
        init_adapter: an adapter to continue training.

    Returns:
        ``{"adapter_dir", "merged_dir", "metrics"}``; metrics has ``loss`` (the run's mean),
        ``mean_token_accuracy`` and ``entropy`` (means over the last epoch's logged steps),
        ``train_seconds``, ``seconds_per_example``, ``n_examples``, ``steps``.
    """
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from tasks.llm import trl_cpu

    trl_cpu.install()
    cfg = cfg or SFTConfig()
    if not isinstance(cfg, LoraTrainConfig):
        raise TypeError(f"cfg: expected a tasks.llm.sft.SFTConfig, got {type(cfg).__name__}")
    require_columns(examples, ("prompt", "completion"), "examples")
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    policy, lora, tokenizer = load_policy(model, cfg, init_adapter, device)
    dataset = sft_dataset(examples)
    with atomic_dir(out_dir) as tmp:
        args = TRLSFTConfig(
            **trainer_args(cfg, tmp / "trainer", device),
            max_length=cfg.max_length,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(
            model=policy,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        log.info(
            "SFT: %d examples, init_adapter=%s, device=%s", examples.height, init_adapter, device
        )
        t0 = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - t0
        metrics = summarize_log(trainer.state.log_history, SFT_METRIC_KEYS)
        metrics.update(
            loss=float(result.training_loss),
            train_seconds=train_seconds,
            seconds_per_example=train_seconds / (examples.height * cfg.epochs),
            n_examples=examples.height,
            steps=int(trainer.state.global_step),
        )
        out = save_outputs(trainer, tmp, out_dir, model, cfg, metrics, "sft")
        del trainer
    log.info("SFT done in %.1f s (loss %.4f)", train_seconds, metrics["loss"])
    return out
