"""The SFT and online-RL wrappers: two steps each on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file

from tasks.llm.online_rl import OnlineRLConfig, train_online_rl, wrap_reward
from tasks.llm.sft import SFTConfig, train_sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lora_b_moved(adapter_dir: str) -> bool:
    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def test_sft_two_steps(tiny_llm_path: str, tmp_path: Path) -> None:
    examples = pl.DataFrame(
        {
            "prompt": [f"Recommend 2 movies for user {i}." for i in range(4)],
            "completion": ["['Toy Story (1995)', 'American President, The (1995)']"] * 4,
        }
    )
    cfg = SFTConfig(max_steps=2, batch_size=2, lr=1e-2)
    out = train_sft(tiny_llm_path, examples, tmp_path / "sft", cfg)
    assert out["metrics"]["steps"] == 2 and math.isfinite(out["metrics"]["loss"])
    assert "mean_token_accuracy" in out["metrics"] and out["merged_dir"] is None
    assert _lora_b_moved(out["adapter_dir"])
    with pytest.raises(ValueError, match="completion"):
        train_sft(tiny_llm_path, examples.drop("completion"), tmp_path / "bad", cfg)


def test_online_rl_two_steps_with_a_toy_reward(tiny_llm_path: str, tmp_path: Path) -> None:
    calls: list[tuple[list[str], list[str], dict]] = []

    def longer_is_better(prompts: list[str], completions: list[str], extra: dict) -> list[float]:
        calls.append((prompts, completions, extra))
        return [len(c) / 10 + 0.1 * t for c, t in zip(completions, extra["target"], strict=True)]

    prompts = pl.DataFrame(
        {
            "prompt": ["Recommend a movie.", "Recommend a book."],
            "target": [1, 2],
            "truth": [["Toy Story (1995)"], ["Dune"]],
        }
    )
    cfg = OnlineRLConfig(max_steps=2, batch_size=1, num_generations=2, max_completion_length=4)
    out = train_online_rl(tiny_llm_path, prompts, longer_is_better, tmp_path / "rl", cfg)
    assert out["metrics"]["steps"] == 2 and "reward" in out["metrics"]
    assert (Path(out["adapter_dir"]) / "adapter_config.json").is_file()
    assert calls
    p, c, extra = calls[0]
    assert len(p) == len(c) == 2 and all(isinstance(x, str) for x in p + c)
    assert p[0] in prompts["prompt"].to_list()  # the plain user message, not the template
    assert set(extra) == {"target", "truth"} and len(extra["truth"]) == 2


def test_reward_wrapper_checks_lengths() -> None:
    reward = wrap_reward(lambda p, c, e: [1.0], [])
    messages = [[{"role": "user", "content": "q"}]] * 2
    answers = [[{"role": "assistant", "content": "a"}]] * 2
    with pytest.raises(ValueError, match="1 values for 2"):
        reward(prompts=messages, completions=answers)
    ok = wrap_reward(lambda p, c, e: [len(x) for x in c], ["k"])
    assert ok(prompts=messages, completions=answers, k=[1, 2], trainer_state=None) == [1.0, 1.0]


def test_online_rl_config_validates() -> None:
    with pytest.raises(ValueError, match="num_generations"):
        OnlineRLConfig(num_generations=1)
    with pytest.raises(ValueError, match="algorithm"):
        OnlineRLConfig(algorithm="ppo")  # type: ignore[arg-type]


@pytest.mark.slow
def test_rloo_two_steps(tiny_llm_path: str, tmp_path: Path) -> None:
    prompts = pl.DataFrame({"prompt": ["Recommend a movie.", "Recommend a book."]})
    cfg = OnlineRLConfig(
        algorithm="rloo", max_steps=2, batch_size=1, num_generations=2, max_completion_length=4
    )
    out = train_online_rl(
        tiny_llm_path, prompts, lambda p, c, e: [float(len(x)) for x in c], tmp_path / "rl", cfg
    )
    assert out["metrics"]["steps"] == 2
