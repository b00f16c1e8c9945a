"""The RLHF row's LLM reward model on the tiny LLM."""

from __future__ import annotations

import math

import polars as pl

from tasks.llm.reward_model import (
    RewardModelConfig,
    RewardModelScore,
    completion_text,
    train_llm_reward_model,
)


def test_completion_text():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "assistant", "content": "b"}]) == "b"
    assert completion_text(3) == "3"


def test_reward_model_on_tiny_llm(tiny_llm_path, tmp_path):
    """One RewardTrainer step, then it scores answers."""
    pairs = pl.DataFrame(
        {
            "prompt": ["Recommend five movies.", "Five films, please."],
            "chosen": ["['Jaws (1975)', 'Alien (1979)']", "['Heat (1995)']"],
            "rejected": ["I cannot.", "no"],
        }
    )
    cfg = RewardModelConfig(max_steps=1)
    out = train_llm_reward_model(tiny_llm_path, pairs, tmp_path / "rm", cfg)
    assert out["metrics"]["steps"] == 1 and (tmp_path / "rm" / "adapter").is_dir()
    score = RewardModelScore(tiny_llm_path, out["adapter_dir"])
    values = score(["p", "p", "p"], ["['Jaws']", [{"role": "assistant", "content": "x"}], ""], {})
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
