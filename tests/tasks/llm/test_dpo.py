"""DPO with TRL + LoRA on the tiny model: weights move, the margin rises, rounds chain."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file

from tasks.llm.dpo import DPOConfig, completion_token_logps, train_dpo
from tasks.llm.lora import summarize_log

PAIRS = pl.DataFrame(
    {
        "prompt": [
            f"User {i} rated Star Wars (1977) 5 stars. Describe their taste." for i in range(6)
        ],
        "chosen": ["They love science fiction adventures and space operas."] * 6,
        "rejected": ["Cooking shows about soup."] * 6,
    }
)
FAST = DPOConfig(lr=5e-3, epochs=2, batch_size=3, grad_accum=1, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _margin(model: str, adapter: str | None) -> float:
    prompts = PAIRS["prompt"].to_list()
    chosen, _ = completion_token_logps(model, prompts, PAIRS["chosen"].to_list(), adapter=adapter)
    rejected, _ = completion_token_logps(
        model, prompts, PAIRS["rejected"].to_list(), adapter=adapter
    )
    return sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(prompts)


@pytest.fixture(scope="module")
def first_round(tiny_llm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dpo") / "round_00" / "dpo"
    return train_dpo(tiny_llm_path, PAIRS, out, FAST)


def test_config_presets() -> None:
    paper = DPOConfig.paper()
    assert (paper.batch_size, paper.grad_accum, paper.lr, paper.epochs) == (2, 8, 5e-5, 3.0)
    assert paper.beta == DPOConfig().beta == 0.01 and DPOConfig().ref == "base"
    assert DPOConfig.paper(seed=3).seed == 3
    assert paper.max_length == 2048 and DPOConfig().max_length == 1024
    # A JSON round trip (Prefect parameters) gives the same config back.
    assert DPOConfig(**json.loads(json.dumps(paper.to_dict()))) == paper
    for bad in ({"beta": 0}, {"ref": "sft"}, {"batch_size": 0}, {"lr": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DPOConfig(**bad)


def test_bad_pairs_are_named(tiny_llm_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rejected"):
        train_dpo(tiny_llm_path, PAIRS.drop("rejected"), tmp_path / "x", FAST)
    with pytest.raises(ValueError, match="empty"):
        train_dpo(tiny_llm_path, PAIRS.head(0), tmp_path / "x", FAST)
    assert not (tmp_path / "x").exists()


def test_dpo_moves_lora_and_raises_the_margin(first_round: dict, tiny_llm_path: str) -> None:
    adapter = Path(first_round["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file() and first_round["merged_dir"] is None
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero
    assert _margin(tiny_llm_path, str(adapter)) > _margin(tiny_llm_path, None) + 1.0
    m = first_round["metrics"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in m
    assert m["rewards/margins"] > 0 and m["loss"] < 0.6931
    assert m["train_seconds"] > 0 and m["seconds_per_pair"] > 0 and m["n_pairs"] == 6
    saved = json.loads((adapter.parent / "metrics.json").read_text())
    assert saved["metrics"]["steps"] == m["steps"] == 4 and saved["log_history"]
    assert sorted(p.name for p in adapter.parent.iterdir()) == [
        "adapter",
        "config.json",
        "metrics.json",
    ]
    assert [p.name for p in adapter.parent.parent.iterdir()] == ["dpo"]  # no temporary left


@pytest.mark.parametrize("ref", ["base", "previous"])
def test_next_round_continues_the_adapter(
    first_round: dict, tiny_llm_path: str, tmp_path: Path, ref: str
) -> None:
    cfg = DPOConfig(lr=5e-3, batch_size=6, grad_accum=1, max_steps=1, ref=ref, merge=True)
    out = train_dpo(
        tiny_llm_path, PAIRS, tmp_path / "round_01" / "dpo", cfg, first_round["adapter_dir"]
    )
    first_log = json.loads((tmp_path / "round_01" / "dpo" / "metrics.json").read_text())
    step = next(h for h in first_log["log_history"] if "rewards/margins" in h)
    if ref == "previous":
        # The reference is the starting policy: implicit rewards start at zero.
        assert abs(step["rewards/margins"]) < 1e-3
    else:
        # The reference is the base model: the first round's gain already shows.
        assert step["rewards/margins"] > 1e-3
    merged = Path(out["merged_dir"])
    assert (merged / "model.safetensors").is_file() and (merged / "merge_info.json").is_file()
    before = load_file(Path(first_round["adapter_dir"]) / "adapter_model.safetensors")
    after = load_file(Path(out["adapter_dir"]) / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any((before[k] - after[k]).abs().max() > 0 for k in before)


def test_summarize_log_uses_the_last_epoch() -> None:
    history = [
        {"loss": 0.7, "rewards/margins": 0.0, "epoch": 0.5},
        {"loss": 0.6, "rewards/margins": 0.2, "epoch": 1.0},
        {"loss": 0.5, "rewards/margins": 0.4, "epoch": 1.5},
        {"loss": 0.3, "rewards/margins": 0.6, "epoch": 2.0},
        {"train_runtime": 1.0, "train_loss": 0.5, "epoch": 2.0},
    ]
    assert summarize_log(history, ["loss", "rewards/margins"]) == pytest.approx(
        {"loss": 0.4, "rewards/margins": 0.5}
    )


def test_policy_and_reference_logps_in_one_load(tiny_llm_path: str, first_round: dict) -> None:
    from tasks.llm.dpo import completion_token_logps, policy_and_reference_logps

    prompts, texts = PAIRS["prompt"].to_list()[:3], PAIRS["chosen"].to_list()[:3]
    adapter = first_round["adapter_dir"]
    mine, ref, counts = policy_and_reference_logps(tiny_llm_path, adapter, prompts, texts)
    alone, alone_counts = completion_token_logps(tiny_llm_path, prompts, texts, adapter=adapter)
    base, _ = completion_token_logps(tiny_llm_path, prompts, texts)
    assert mine == pytest.approx(alone, abs=1e-4) and ref == pytest.approx(base, abs=1e-4)
    assert counts == alone_counts and min(counts) > 5  # the answer and its end-of-turn tokens
    assert mine[0] > ref[0]  # DPO raised the chosen answer's probability


def test_paper_max_length_keeps_a_long_pair_whole(default_policy_path: str) -> None:
    """A 512-token answer after a 30-item history, through TRL's preference collator (what
    DPOTrainer truncates with): every answer token survives at the paper's max_length, and
    today's default 1,024 would cut the answer."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tasks.llm.chat import chat_prompt
    from tasks.rlrf4rec.prompts import HistoryEntry, preference_prompt

    tok = AutoTokenizer.from_pretrained(default_policy_path)
    history = [
        HistoryEntry(f"Adventures of a Long Sequel Title, Part {i}: Return, The (19{60 + i})", 4)
        for i in range(30)
    ]
    user = {"gender": "F", "age": 25, "occupation": "writer"}
    prompt = preference_prompt(user, history, "ml-1m", style="kar")
    prompt_ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    filler = "The user enjoys character-driven dramas with a strong score and a twist. " * 80
    answer_ids = tok(filler, add_special_tokens=False)["input_ids"][:512]
    end_ids = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    chosen = answer_ids + end_ids
    example = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": chosen}
    total = len(prompt_ids) + len(chosen)
    assert len(answer_ids) == 512 and 1024 < total <= 2048, total
    for max_length, whole in ((DPOConfig.paper().max_length, True), (1024, False)):
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batch = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)([example])
        kept = int(batch["completion_mask"][0].sum())
        assert (kept == len(chosen)) is whole, (max_length, kept, len(chosen))
