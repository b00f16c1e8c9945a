"""The LLM reward model of the second pipeline's RLHF row (the paper's PPO row).

The base LLM with a one-output classification head and a LoRA adapter, trained with TRL
``RewardTrainer`` on preference pairs (:func:`train_llm_reward_model`, the LLM twin of
:func:`tasks.rlrf4rec.reward.train_reward_model`), then used as the online-RL reward
(:class:`RewardModelScore`).

What the model reads (``RewardModelConfig.rm_input``): ``answer``, the answer alone as an
assistant message (You et al. train their reward model on the pairs without the prompt), or
``prompt_answer``, the (prompt, answer) conversation. Training and scoring build the same
messages (:func:`rm_messages`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from tasks.common.io import atomic_dir


@dataclass(frozen=True)
class RewardModelConfig:
    """Reward-model training (TRL ``RewardTrainer``, LoRA on the LLM); lr 5e-5 is the paper's."""

    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 1
    max_steps: int = -1
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    max_length: int = 1024
    seed: int = 0
    rm_input: Literal["answer", "prompt_answer"] = "answer"

    def __post_init__(self) -> None:
        if self.rm_input not in RM_INPUTS:
            raise ValueError(f"rm_input must be one of {RM_INPUTS}, got {self.rm_input!r}")


RM_INPUTS = ("answer", "prompt_answer")


def rm_messages(prompt: str, answer: str, rm_input: str) -> list[dict[str, str]]:
    """The conversation the reward model reads for one answer (training and scoring alike)."""
    if rm_input not in RM_INPUTS:
        raise ValueError(f"rm_input must be one of {RM_INPUTS}, got {rm_input!r}")
    reply = {"role": "assistant", "content": answer}
    return [reply] if rm_input == "answer" else [{"role": "user", "content": prompt}, reply]


def rm_dataset_columns(pairs: pl.DataFrame, rm_input: str) -> dict[str, list]:
    """TRL ``RewardTrainer`` columns: ``chosen`` / ``rejected`` conversations, with a separate
    ``prompt`` only for ``prompt_answer`` (``answer`` leaves the prompt out entirely)."""
    from tasks.llm.chat import assistant_messages, user_messages

    cols: dict[str, list] = {
        "chosen": assistant_messages(pairs["chosen"].to_list()),
        "rejected": assistant_messages(pairs["rejected"].to_list()),
    }
    if rm_input == "prompt_answer":
        cols = {"prompt": user_messages(pairs["prompt"].to_list()), **cols}
    elif rm_input not in RM_INPUTS:
        raise ValueError(f"rm_input must be one of {RM_INPUTS}, got {rm_input!r}")
    return cols


def train_llm_reward_model(
    model: str,
    pairs: pl.DataFrame,
    out_dir: str | Path,
    cfg: RewardModelConfig | None = None,
) -> dict[str, Any]:
    """Train a reward model on the preference pairs (TRL ``RewardTrainer``, LoRA on the LLM).

    Writes ``adapter/`` and ``metrics.json`` under ``out_dir``; returns ``{"adapter_dir",
    "metrics"}`` (pairwise training accuracy included).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from tasks.llm.chat import load_tokenizer
    from tasks.llm.lora import require_columns

    c = cfg or RewardModelConfig()
    require_columns(pairs, ("prompt", "chosen", "rejected"), "pairs")
    out_dir = Path(out_dir)
    tok = load_tokenizer(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(c.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=1, dtype=torch.float32
    )
    base.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_dict(rm_dataset_columns(pairs, c.rm_input))
    lora = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="SEQ_CLS",
    )
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "trainer"),
            per_device_train_batch_size=c.batch_size,
            learning_rate=c.lr,
            num_train_epochs=c.epochs,
            max_steps=c.max_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=c.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            max_length=c.max_length,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora
        )
        result = trainer.train()
        history = list(trainer.state.log_history)
        acc = [h["accuracy"] for h in history if "accuracy" in h]
        metrics = {
            "loss": float(result.training_loss),
            "accuracy": float(np.mean(acc)) if acc else float("nan"),
            "n_pairs": pairs.height,
            "steps": int(trainer.state.global_step),
            "train_seconds": time.perf_counter() - t0,
        }
        (tmp / "rm_input.json").write_text(json.dumps({"rm_input": c.rm_input}) + "\n")
        trainer.model.save_pretrained(str(tmp / "adapter"))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        (tmp / "metrics.json").write_text(
            json.dumps({"metrics": metrics, "log_history": history}, indent=2, default=str)
        )
    return {"adapter_dir": str(out_dir / "adapter"), "metrics": metrics, "rm_input": c.rm_input}


class RewardModelScore:
    """Reward of an answer = the scalar score of a trained reward model (the RLHF row).

    The model is the base LLM with a one-output classification head and a LoRA adapter
    (:func:`train_llm_reward_model`); it scores what it was trained on (:func:`rm_messages`):
    the answer alone or the (prompt, answer) conversation, as ``rm_input.json`` beside the
    adapter says (``prompt_answer`` for a model trained before that file existed).
    """

    def __init__(
        self, model: str, adapter_dir: str, batch_size: int = 8, rm_input: str | None = None
    ) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from tasks.llm.chat import load_tokenizer

        self.tok = load_tokenizer(model)
        base = AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=1, dtype=torch.float32
        )
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tok.pad_token_id or self.tok.eos_token_id
        self.model = PeftModel.from_pretrained(base, adapter_dir).eval()
        self.batch_size = batch_size
        self.rm_input = rm_input or _saved_rm_input(adapter_dir)
        self.__name__ = "reward_model"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        texts = [
            self.tok.apply_chat_template(rm_messages(p, c, self.rm_input), tokenize=False)
            for p, c in zip(prompts, completions, strict=True)
        ]
        out: list[float] = []
        pad_side = self.tok.padding_side
        self.tok.padding_side = "right"
        try:
            for i in range(0, len(texts), self.batch_size):
                batch = self.tok(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                with torch.inference_mode():
                    logits = self.model(**batch).logits[:, 0]
                out.extend(float(x) for x in logits)
        finally:
            self.tok.padding_side = pad_side
        return out

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], extra: dict[str, Sequence]
    ) -> list[float]:
        return self.score(
            [completion_text(p) for p in prompts], [completion_text(c) for c in completions]
        )


def _saved_rm_input(adapter_dir: str) -> str:
    saved = Path(adapter_dir).parent / "rm_input.json"
    return json.loads(saved.read_text())["rm_input"] if saved.is_file() else "prompt_answer"


def completion_text(completion: Any) -> str:
    """A completion as text (TRL passes conversational completions as message lists)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)
