"""The RLHF row's LLM reward model on the tiny LLM."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tasks.llm.reward_model import (
    RewardModelConfig,
    RewardModelScore,
    completion_text,
    rm_dataset_columns,
    rm_messages,
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


def test_the_reward_model_reads_the_answer_alone_by_default():
    """You et al. train the reward model on the pairs without the prompt; (prompt, answer) is
    the option. Training columns and scoring messages agree."""
    pairs = pl.DataFrame({"prompt": ["p"], "chosen": ["['Jaws']"], "rejected": ["no"]})
    assert RewardModelConfig().rm_input == "answer"
    answer_only = rm_dataset_columns(pairs, "answer")
    assert set(answer_only) == {"chosen", "rejected"}
    assert answer_only["chosen"] == [rm_messages("p", "['Jaws']", "answer")]
    assert rm_messages("p", "a", "answer") == [{"role": "assistant", "content": "a"}]
    both = rm_dataset_columns(pairs, "prompt_answer")
    assert both["prompt"] == [[{"role": "user", "content": "p"}]]
    assert both["prompt"][0] + both["rejected"][0] == rm_messages("p", "no", "prompt_answer")
    with pytest.raises(ValueError, match="rm_input"):
        RewardModelConfig(rm_input="prompt")  # type: ignore[arg-type]
