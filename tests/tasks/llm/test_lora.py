"""LoRA merging: an adapter changes the texts, its merged checkpoint is made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.llm.generate import generate
from tasks.llm.lora import merged_checkpoint
from tasks.llm.sampling import SamplingConfig
from tests.tasks.llm.helpers import PROMPTS, random_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_adapter_changes_the_texts_and_merges_once(tiny_llm_path: str, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_llm_path, tmp_path / "round_01" / "adapter")
    cfg = SamplingConfig(n=2, max_new_tokens=6, seed=3)
    base, _ = generate(PROMPTS, tiny_llm_path, cfg, "transformers")
    tuned, stats = generate(PROMPTS, tiny_llm_path, cfg, "transformers", adapter=adapter)
    assert tuned["text"].to_list() != base["text"].to_list()
    assert stats["lora_mode"] == "merged-in-memory"
    merged = merged_checkpoint(tiny_llm_path, adapter)
    assert merged == str(tmp_path / "round_01" / "merged")
    stamp = (Path(merged) / "model.safetensors").stat().st_mtime_ns
    assert merged_checkpoint(tiny_llm_path, adapter) == merged  # reused, not merged again
    assert (Path(merged) / "model.safetensors").stat().st_mtime_ns == stamp
    from_merged, _ = generate(PROMPTS, merged, cfg, "transformers")
    assert from_merged["text"].to_list() == tuned["text"].to_list()


def test_trainer_precision_and_checkpointing(monkeypatch) -> None:
    """fp32 on CPU unless bf16 autocast is asked for, and then only on a native-bf16 CPU;
    gradient checkpointing on unless switched off."""
    import torch

    from tasks.common import hardware
    from tasks.llm.dpo import DPOConfig
    from tasks.llm.lora import trainer_args

    cpu, out = torch.device("cpu"), Path("unused")
    args = trainer_args(DPOConfig(), out, cpu)
    assert args["bf16"] is False and args["gradient_checkpointing"] is False
    assert trainer_args(DPOConfig.paper(), out, cpu)["gradient_checkpointing"] is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda *_: frozenset({"avx2", "amx_bf16"}))
    assert trainer_args(DPOConfig(cpu_bf16_autocast=True), out, cpu)["bf16"] is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda *_: frozenset({"avx2", "fma"}))
    with pytest.raises(ValueError, match="cpu_bf16_autocast=True: this CPU has no native bf16"):
        trainer_args(DPOConfig(cpu_bf16_autocast=True), out, cpu)


def test_lora_on_the_top_layers_only(tiny_llm_path: str) -> None:
    """``lora_layers=k`` adapts the top k decoder layers, and checkpointing is then off by
    default (it would make the backward pass run through every layer again)."""
    import torch
    from peft import get_peft_model

    from tasks.llm.lora import load_policy, top_layers, trainer_args
    from tasks.llm.sft import SFTConfig

    assert top_layers(30, 15) == list(range(15, 30))
    assert top_layers(30, 0) is None and top_layers(30, 30) is None and top_layers(2, 5) is None
    cfg = SFTConfig(lora_layers=1)
    base, lora, _ = load_policy(tiny_llm_path, cfg, None, torch.device("cpu"))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in
               get_peft_model(base, lora).named_parameters() if "lora_A" in n}  # fmt: skip
    assert adapted == {"1"}  # of the tiny model's layers 0 and 1
    cpu, out = torch.device("cpu"), Path("unused")
    assert trainer_args(cfg, out, cpu)["gradient_checkpointing"] is False
    assert trainer_args(SFTConfig(), out, cpu)["gradient_checkpointing"] is True
    forced = SFTConfig(lora_layers=1, gradient_checkpointing=True)
    assert trainer_args(forced, out, cpu)["gradient_checkpointing"] is True
    with pytest.raises(ValueError, match="lora_layers must be an int >= 0"):
        SFTConfig(lora_layers=-1)
