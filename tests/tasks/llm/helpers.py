"""Shared by the generation tests: prompts, a samples check and a random LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tasks.llm.generate import SAMPLES_SCHEMA
from tasks.llm.sampling import SamplingConfig

PROMPTS = pl.DataFrame(
    {
        "user_id": [7, 3, 5],
        "prompt": [
            "Describe a user who likes science fiction movies.",
            "Hi",
            "Which movies of the 1990s are comedies? Answer briefly.",
        ],
    }
)


def check_samples(samples: pl.DataFrame, prompts: pl.DataFrame, cfg: SamplingConfig) -> None:
    assert dict(samples.schema) == SAMPLES_SCHEMA
    assert samples.height == prompts.height * cfg.n
    per_user = samples.group_by("user_id", maintain_order=True).agg(pl.col("sample_idx"))
    assert per_user["user_id"].to_list() == prompts["user_id"].to_list()  # prompts' order
    assert all(sorted(s) == list(range(cfg.n)) for s in per_user["sample_idx"])
    assert samples["n_tokens"].min() >= 1 and samples["n_tokens"].max() <= cfg.max_new_tokens
    assert set(samples["finish_reason"]) <= {"stop", "length"}
    expected = (samples["finish_reason"] == "length") | (samples["text"].str.strip_chars() == "")
    assert samples["degenerate"].to_list() == expected.to_list()


def random_adapter(model: str, out: Path) -> str:
    """A LoRA with non-zero weights (so it changes the model's outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    cfg = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, cfg).save_pretrained(out)
    return str(out)
