"""DPO of the policy LLM on (prompt, chosen, rejected) pairs: TRL ``DPOTrainer`` + PEFT LoRA.

RLRF4Rec (Sun et al., Section II.B-C): the best and worst of a user's N sampled preference
texts are ``chosen`` and ``rejected``; the loss is
``-log sigmoid(beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected)))`` with beta 0.01.

Conventions (shared by :mod:`tasks.llm.sft` and :mod:`tasks.llm.online_rl`):

- Prompts are plain user messages and answers plain assistant texts; they are given to TRL in
  its conversational format, so the model's chat template applies exactly as at generation.
- A LoRA adapter is trained; fp32 on CPU (bf16 autocast drowns the signal at beta 0.01), bf16
  on GPU.
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

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from tasks.common.io import atomic_dir
from tasks.common.memory import releases_memory

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraTrainConfig:
    """Settings shared by the LoRA trainers (DPO, SFT, online RL).

    Attributes:
        lr: learning rate (AdamW, linear decay).
        epochs: passes over the data.
        batch_size: examples per device step.
        grad_accum: gradient accumulation steps (effective batch = batch_size * grad_accum).
        max_length: token limit of prompt + answer (longer sequences are truncated at the end).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapter.
        seed: seed of the adapter initialisation and the data order.
        merge: also write a merged checkpoint (base + adapter) for the generator.
        max_steps: stop after this many optimizer steps (-1: run the epochs).
        logging_steps: log the metrics every this many optimizer steps.
        gradient_checkpointing: None: on GPU only. On CPU it trades time for memory: one
            quick-profile round (SmolLM2-135M, 2 steps of 4 pairs) took 101 s instead of 88 s
            and peaked at 3.8 GB instead of 5.1 GB.
        device: ``cpu``, ``cuda``, ``cuda:1``; None: ``cuda`` when available.
    """

    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    seed: int = 0
    merge: bool = False
    max_steps: int = -1
    logging_steps: int = 1
    gradient_checkpointing: bool | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.lr <= 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr}")
        if self.epochs <= 0:
            raise ValueError(f"{name}.epochs must be > 0, got {self.epochs}")
        for attr in ("batch_size", "grad_accum", "max_length", "lora_r", "logging_steps"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{attr} must be a positive int, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"{name}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError(f"{name}.lora_target_modules must name at least one module")
        if isinstance(self.lora_target_modules, str):
            object.__setattr__(self, "lora_target_modules", (self.lora_target_modules,))
        else:
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON, MLflow params)."""
        d = asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d


@dataclass(frozen=True)
class DPOConfig(LoraTrainConfig):
    """DPO settings; the defaults are a fast CPU run (one epoch, lr 1e-4, 1 pair per step x 4
    accumulated: a pair of ~700-token answers takes about 4 GB of activations in fp32, four at
    once ran out of memory on a 24 GB machine).

    Attributes:
        beta: DPO temperature (the paper's default 0.01).
        batch_size, grad_accum: 1 and 4 (effective batch 4).
        ref: the reference policy: ``base`` (adapter disabled) or ``previous`` (the policy the
            round starts from, i.e. ``init_adapter`` frozen).
        See :class:`LoraTrainConfig` for the rest.
    """

    batch_size: int = 1
    grad_accum: int = 4
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
        """The paper's settings: batch 2, gradient accumulation 8, lr 5e-5, 3 epochs, beta 0.01."""
        return replace(cls(batch_size=2, grad_accum=8, lr=5e-5, epochs=3.0), **overrides)

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


# --------------------------------------------------------------------------- shared helpers


def resolve_device(device: str | None = None) -> Any:
    """``torch.device``: the one asked for, else ``cuda`` when available, else ``cpu``."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_columns(frame: pl.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise a ValueError naming ``name`` when ``frame`` lacks a column, is empty or has nulls."""
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"{name}: expected a polars DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; has {frame.columns}")
    if frame.height == 0:
        raise ValueError(f"{name}: empty frame, nothing to train on")
    nulls = [c for c in columns if frame[c].null_count()]
    if nulls:
        raise ValueError(f"{name}: null values in column(s) {nulls}")


def user_messages(prompts: Sequence[str]) -> list[list[dict[str, str]]]:
    """TRL conversational prompts: one user message each."""
    return [[{"role": "user", "content": p}] for p in prompts]


def assistant_messages(texts: Sequence[str]) -> list[list[dict[str, str]]]:
    """TRL conversational completions: one assistant message each."""
    return [[{"role": "assistant", "content": t}] for t in texts]


def load_policy(
    model: str, cfg: LoraTrainConfig, init_adapter: str | None, device: Any
) -> tuple[Any, Any, Any]:
    """The model to train, its LoRA config (None when ``init_adapter`` is loaded) and tokenizer.

    fp32 on CPU, bf16 on GPU (:func:`tasks.common.hardware.train_dtype`). With ``init_adapter`` the
    adapter is loaded trainable (training continues from it); otherwise a fresh LoRA is created
    by the trainer from the config.
    """
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.common.hardware import train_dtype
    from tasks.rlrf4rec.prompts import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(model, dtype=train_dtype(device))
    tokenizer = load_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if init_adapter:
        if not (Path(init_adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter={init_adapter!r}: no adapter_config.json")
        policy = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
        loaded = policy.peft_config["default"]
        if int(loaded.r) != cfg.lora_r or set(loaded.target_modules or ()) != set(
            cfg.lora_target_modules
        ):
            log.warning(
                "init_adapter has r=%s on %s; training continues with it (config asks r=%s on %s)",
                loaded.r,
                sorted(loaded.target_modules or ()),
                cfg.lora_r,
                list(cfg.lora_target_modules),
            )
        return policy, None, tokenizer
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return base, lora, tokenizer


def trainer_args(cfg: LoraTrainConfig, output_dir: Path, device: Any) -> dict[str, Any]:
    """The TRL / transformers training arguments every wrapper shares."""
    on_gpu = device.type == "cuda"
    checkpointing = on_gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.lr,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": on_gpu,
        "fp16": False,
        "use_cpu": not on_gpu,
        "gradient_checkpointing": checkpointing,
        "dataloader_num_workers": 0,
    }


def summarize_log(log_history: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Means of ``keys`` over the logged steps of the last epoch (the trained policy's figures)."""
    steps = [h for h in log_history if any(k in h for k in keys) and "train_runtime" not in h]
    if not steps:
        return {}
    last_epoch = max(float(h.get("epoch", 0.0)) for h in steps)
    start = max(0.0, float(int(last_epoch - 1e-9)))  # the last (possibly partial) epoch
    window = [h for h in steps if float(h.get("epoch", 0.0)) > start] or steps
    out = {}
    for k in keys:
        values = [float(h[k]) for h in window if k in h]
        if values:
            out[k] = sum(values) / len(values)
    return out


def save_outputs(
    trainer: Any,
    tmp: Path,
    out_dir: Path,
    model: str,
    cfg: LoraTrainConfig,
    metrics: dict[str, Any],
    kind: str,
) -> dict[str, Any]:
    """Save the adapter (and the merged checkpoint) into ``tmp``; return final paths + metrics."""
    from tasks.llm.generate import merge_lora

    policy = trainer.model
    adapters = list(getattr(policy, "peft_config", {}).keys())
    selected = ["default"] if "default" in adapters else None
    policy.save_pretrained(str(tmp / "adapter"), selected_adapters=selected)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    merged = None
    if cfg.merge:
        merge_lora(model, tmp / "adapter", tmp / "merged")
        merged = str(out_dir / "merged")
    history = list(trainer.state.log_history)
    (tmp / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "log_history": history}, indent=2, default=str) + "\n"
    )
    (tmp / "config.json").write_text(
        json.dumps({"kind": kind, "model": model, **cfg.to_dict()}, indent=2) + "\n"
    )
    return {"adapter_dir": str(out_dir / "adapter"), "merged_dir": merged, "metrics": metrics}


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
        log.info(
            "DPO: %d pairs, ref=%s, init_adapter=%s, device=%s",
            pairs.height,
            cfg.ref,
            init_adapter,
            device,
        )
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
        if cfg.max_steps > 0:
            seen = trainer.state.global_step * cfg.batch_size * cfg.grad_accum
            metrics["seconds_per_pair"] = train_seconds / max(1, min(seen, pairs.height))
        out = save_outputs(trainer, tmp, out_dir, model, cfg, metrics, "dpo")
        del trainer
    log.info("DPO done in %.1f s: %s", train_seconds, {k: round(v, 4) for k, v in metrics.items()})
    return out


# --------------------------------------------------------------------------- evaluation helper


def completion_logps(
    model: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    adapter: str | None = None,
    batch_size: int = 4,
    device: str | None = None,
) -> list[float]:
    """Summed log-probability of each assistant ``completion`` after its user ``prompt``.

    The completion is scored as the chat template writes it (the answer and its end-of-turn
    token), like the DPO trainer does; ``adapter`` applies a PEFT LoRA on ``model``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.rlrf4rec.prompts import chat_prompt, load_tokenizer

    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ")
    dev = resolve_device(device)
    tok = load_tokenizer(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
    lm.to(dev).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[float] = []
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
    return out


__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGET_MODULES",
    "DPOConfig",
    "LoraTrainConfig",
    "completion_logps",
    "dpo_dataset",
    "train_dpo",
]
