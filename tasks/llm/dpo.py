"""DPO of the policy LLM on (prompt, chosen, rejected) pairs: TRL ``DPOTrainer`` + PEFT LoRA.

RLRF4Rec (Sun et al., Section II.B-C): the best and worst of a user's N sampled preference
texts are ``chosen`` and ``rejected``; the loss is
``-log sigmoid(beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected)))`` with beta 0.01.

Conventions (shared by :mod:`tasks.llm.sft` and :mod:`tasks.llm.online_rl`):

- Prompts are plain user messages and answers plain assistant texts; they are given to TRL in
  its conversational format, so the model's chat template applies exactly as at generation.
- A LoRA adapter is trained; fp32 on CPU (bf16 autocast drowns the signal at beta 0.01; on a
  CPU with native bf16 only the frozen weights' backward matmuls run in bf16,
  :mod:`tasks.llm.bf16_backward`), bf16 on GPU. Each pair is one packed row, its prompt
  computed once (:mod:`tasks.llm.dpo_packing`).
- Rounds: with ``init_adapter`` the previous round's adapter is loaded and **trained further**
  (not merged): the adapter always stays relative to the base model, so ``base + adapter`` is
  the round's policy and the adapter folder alone is enough to serve it.
- Reference policy (``DPOConfig.ref``): ``base`` (default, the paper's choice) is the base model,
  i.e. the adapter disabled; ``previous`` is the policy the round starts from (a frozen copy of
  ``init_adapter``; the base model when there is none).
- Output, written to a temporary folder then renamed onto ``out_dir``: ``adapter/`` (PEFT),
  ``merged/`` (a plain checkpoint, with ``merge=True``: what the vLLM generator serves),
  ``metrics.json`` (summary and TRL's log history) and ``config.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.memory import releases_memory
from tasks.llm.chat import assistant_messages, user_messages
from tasks.llm.lora import (
    ALL_LINEAR,
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


@dataclass(frozen=True)
class DPOConfig(LoraTrainConfig):
    """DPO settings; the defaults are a fast CPU run (one epoch, lr 1e-4, 1 pair per step x 4
    accumulated: gradient accumulation instead of a larger batch trades speed for memory, since
    the activations of a pair of long answers in fp32 are large; the figures are in README.md
    and ``bench/``).

    Attributes:
        beta: DPO temperature (the paper's default 0.01).
        batch_size, grad_accum: 1 and 4 (effective batch 4).
        gradient_checkpointing: off: with each pair packed into one row
            (:mod:`tasks.llm.dpo_packing`) a quick-profile pair's activations are under 1 GB,
            and recomputing them cost about a quarter of the step (``bench/bench_dpo.py
            --levers``); the paper preset keeps it on for its 2,048-token pairs.
        ref: the reference policy: ``base`` (adapter disabled) or ``previous`` (the policy the
            round starts from, i.e. ``init_adapter`` frozen).
        See :class:`LoraTrainConfig` for the rest.
    """

    batch_size: int = 1
    grad_accum: int = 4
    gradient_checkpointing: bool | None = False
    beta: float = 0.01
    ref: Literal["base", "previous"] = "base"
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if self.ref not in ("base", "previous"):
            raise ValueError(f"DPOConfig.ref must be 'base' or 'previous', got {self.ref!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> DPOConfig:
        """The paper's settings: batch 2, gradient accumulation 8, lr 5e-5, 3 epochs, beta 0.01,
        and LLaMA-Factory's ``cutoff_len`` 2,048 tokens as ``max_length``: a 512-token answer
        after a 30-item history of long titles (892 + 514 = 1,406 tokens with SmolLM2's
        tokenizer and chat template, tests/tasks/llm/test_dpo.py) is never cut, where the
        default 1,024 would cut it."""
        base = cls(
            batch_size=2,
            grad_accum=8,
            lr=5e-5,
            epochs=3.0,
            max_length=2048,
            gradient_checkpointing=None,
        )
        return replace(base, **overrides)

    @classmethod
    def cpu_fast(cls, **overrides: Any) -> DPOConfig:
        """The fast CPU default (same as ``DPOConfig()``)."""
        return replace(cls(), **overrides)

    @classmethod
    def you_et_al(cls, **overrides: Any) -> DPOConfig:
        """You et al.'s DPO: batch 1, 2 epochs, lr 5e-5, LoRA r 16 / alpha 16 on every linear
        layer."""
        base = cls(batch_size=1, epochs=2.0, lr=5e-5, lora_r=16, lora_alpha=16)
        return replace(base, lora_dropout=0.05, lora_target_modules=ALL_LINEAR, **overrides)

    @classmethod
    def direct_cpu(cls, **overrides: Any) -> DPOConfig:
        """A few CPU steps for the second pipeline (shorter answers than RLRF4Rec's)."""
        return replace(cls(lr=5e-4, batch_size=2, epochs=1.0, max_length=512), **overrides)


# --------------------------------------------------------------------------- DPO

DPO_METRIC_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


def dpo_dataset(pairs: pl.DataFrame) -> Any:
    """A ``datasets.Dataset`` in TRL's conversational preference format."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": user_messages(pairs["prompt"].to_list()),
            "chosen": assistant_messages(pairs["chosen"].to_list()),
            "rejected": assistant_messages(pairs["rejected"].to_list()),
        }
    )


@releases_memory
def train_dpo(
    model: str,
    pairs: pl.DataFrame,
    out_dir: Path,
    cfg: DPOConfig | None = None,
    init_adapter: str | None = None,
) -> dict[str, Any]:
    """Train the policy's LoRA adapter with DPO on ``pairs``.

    Args:
        model: the base model (path or id).
        pairs: ``prompt`` (plain user message), ``chosen``, ``rejected`` (assistant answers).
        out_dir: where ``adapter/``, ``merged/`` (with ``cfg.merge``), ``metrics.json`` and
            ``config.json`` go (replaced atomically).
        cfg: settings (default :class:`DPOConfig` ``()``, the fast CPU run).
        init_adapter: the previous round's adapter; training continues from it.

    Returns:
        ``{"adapter_dir", "merged_dir" (None unless cfg.merge), "metrics"}``; metrics has
        ``loss`` (the run's mean training loss), ``rewards/accuracies``, ``rewards/margins``,
        ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``, ``logps/rejected`` (means
        over the last epoch's logged steps), ``train_seconds``, ``seconds_per_pair`` (train
        seconds per pair and epoch), ``n_pairs``, ``steps``.
    """
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from tasks.llm import bf16_backward, dpo_packing, trl_cpu

    trl_cpu.install()
    cfg = cfg or DPOConfig()
    if not isinstance(cfg, DPOConfig):
        raise TypeError(f"cfg: expected a tasks.llm.dpo.DPOConfig, got {type(cfg).__name__}")
    require_columns(pairs, ("prompt", "chosen", "rejected"), "pairs")
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    policy, lora, tokenizer = load_policy(model, cfg, init_adapter, device)
    dataset = dpo_dataset(pairs)

    with atomic_dir(out_dir) as tmp:
        args = TRLDPOConfig(
            **trainer_args(cfg, tmp / "trainer", device),
            beta=cfg.beta,
            max_length=cfg.max_length,
            loss_type=[cfg.loss_type],
        )
        trainer = DPOTrainer(
            model=policy,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        peft_model = trainer.model
        if "ref" in getattr(peft_model, "peft_config", {}) and cfg.ref == "base":
            # TRL made a frozen copy of init_adapter as the reference ("previous"); the paper's
            # reference is the base model: drop the copy, so the adapter is disabled instead.
            peft_model.delete_adapter("ref")
            peft_model.set_adapter("default")
        reference = dpo_reference(cfg, init_adapter)
        if reference != "base":
            require_frozen_copy(peft_model, reference, "DPO")
        packed = dpo_packing.install(trainer)
        backward = bf16_backward.backward_dtype(device)
        log.info(
            "DPO: %d pairs, ref=%s, init_adapter=%s, device=%s, prompt computed once per pair: "
            "%s, frozen weights' backward in %s",
            pairs.height,
            cfg.ref,
            init_adapter,
            device,
            packed,
            backward.reason,
        )
        bf16 = backward.name == "bfloat16" and not cfg.cpu_bf16_autocast
        with bf16_backward.applied(peft_model, enabled=bf16):
            t0 = time.perf_counter()
            result = trainer.train()
            train_seconds = time.perf_counter() - t0
        metrics = summarize_log(trainer.state.log_history, DPO_METRIC_KEYS)
        metrics.update(
            loss=float(result.training_loss),
            train_seconds=train_seconds,
            seconds_per_pair=train_seconds / (pairs.height * cfg.epochs),
            n_pairs=pairs.height,
            steps=int(trainer.state.global_step),
        )
        if cfg.max_steps > 0:  # capped steps cycle through the pairs: count what was seen
            seen = trainer.state.global_step * cfg.batch_size * cfg.grad_accum
            metrics["seconds_per_pair"] = train_seconds / max(1, seen)
            metrics["pair_passes"] = seen
        out = save_outputs(trainer, tmp, out_dir, model, cfg, metrics, "dpo")
        del trainer
    log.info("DPO done in %.1f s: %s", train_seconds, {k: round(v, 4) for k, v in metrics.items()})
    return {**out, "reference": reference}


def dpo_reference(cfg: DPOConfig, init_adapter: str | None) -> str:
    """The reference policy of a DPO run: ``init_adapter`` (the policy the run starts from, e.g.
    the SFT adapter; TRL 1.x keeps a frozen copy of it named ``ref``) with ``ref="previous"``,
    else ``"base"`` (the adapter disabled)."""
    return str(init_adapter) if cfg.ref == "previous" and init_adapter else "base"


# --------------------------------------------------------------------------- evaluation helper


def completion_token_logps(
    model: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    adapter: str | None = None,
    batch_size: int = 4,
    device: str | None = None,
) -> tuple[list[float], list[int]]:
    """Summed log-probability of each assistant ``completion`` after its user ``prompt``, and
    the number of completion tokens each sum runs over.

    The completion is scored as the chat template writes it (the answer and its end-of-turn
    token), like the DPO trainer does; ``adapter`` applies a PEFT LoRA on ``model``.
    """
    lm, tok, dev = _scoring_model(model, adapter, device)
    return _completion_logps(lm, tok, prompts, completions, batch_size, dev)


def policy_and_reference_logps(
    model: str,
    adapter: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 4,
    device: str | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Summed completion log-probabilities under ``model + adapter`` and under ``model`` alone
    (the adapter disabled, one model load), and the completions' token counts."""
    lm, tok, dev = _scoring_model(model, adapter, device)
    mine, counts = _completion_logps(lm, tok, prompts, completions, batch_size, dev)
    with lm.disable_adapter():
        ref, _ = _completion_logps(lm, tok, prompts, completions, batch_size, dev)
    return mine, ref, counts


def _scoring_model(model: str, adapter: str | None, device: str | None) -> tuple[Any, Any, Any]:
    """(model in fp32 and eval mode, with ``adapter`` applied, its tokenizer, its device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.llm.chat import load_tokenizer

    dev = resolve_device(device)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    return lm.to(dev).eval(), load_tokenizer(model), dev


def _completion_logps(
    lm: Any,
    tok: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    dev: Any,
) -> tuple[list[float], list[int]]:
    import torch

    from tasks.llm.chat import chat_prompt

    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[float] = []
    counts: list[int] = []
    for start in range(0, len(prompts), batch_size):
        seqs, masks = [], []
        for p, c in zip(
            prompts[start : start + batch_size],
            completions[start : start + batch_size],
            strict=True,
        ):
            head = chat_prompt(tok, p)
            full = tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                tokenize=False,
            )
            if not full.startswith(head):
                raise ValueError("the chat template does not extend the prompt with the answer")
            p_ids = tok(head, add_special_tokens=False)["input_ids"]
            c_ids = tok(full[len(head) :], add_special_tokens=False)["input_ids"]
            seqs.append(p_ids + c_ids)
            masks.append([0] * len(p_ids) + [1] * len(c_ids))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = 1
            lab[r, : len(s)] = torch.tensor(m, dtype=torch.bool)
        with torch.inference_mode():
            logits = lm(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(dev)
        token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = lab[:, 1:].to(dev)
        out.extend((token_logp * keep).sum(-1).tolist())
        counts.extend(keep.sum(-1).tolist())
    return out, counts


__all__ = [
    "DPOConfig",
    "dpo_reference",
    "completion_token_logps",
    "dpo_dataset",
    "policy_and_reference_logps",
    "train_dpo",
]
