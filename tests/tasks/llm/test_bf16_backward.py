"""The frozen weights' backward in bf16: the forward (log-probs, loss) unchanged, the LoRA
gradients within bf16 rounding, the DPO run's figures within a stated tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.common.hardware import DTYPE_ENV
from tasks.llm import bf16_backward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRAD_TOLERANCE = 0.02
"""Largest relative error (L2 norm) of a LoRA weight's gradient: bf16 keeps 8 significant
bits (0.4% an element); summed over the layers the errors stay well under 2%."""
DPO_TOLERANCE = 0.02
"""Relative tolerance of a DPO run's loss and reward margin against fp32's."""


def lora_grads(model_path: str, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, cfg)
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with bf16_backward.applied(model, enabled=bf16) as n:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, n


def test_the_forward_is_exact_and_the_gradients_close(tiny_llm_path: str) -> None:
    logits32, grads32, none = lora_grads(tiny_llm_path, bf16=False)
    logits16, grads16, layers = lora_grads(tiny_llm_path, bf16=True)
    assert none == 0
    # 2 layers x (q, k, v, o base layers + gate, up, down) and the LM head; not the LoRA A/B
    assert layers == 2 * 7 + 1
    assert torch.equal(logits16, logits32)
    assert len(grads32) == 2 * 2 * 2
    worst = 0.0
    for name, g32 in grads32.items():
        err = float((grads16[name] - g32).norm() / g32.norm())
        worst = max(worst, err)
        assert err < GRAD_TOLERANCE, (name, err)
    assert worst > 0  # the bf16 path did run: bit-equal gradients would mean it did not


def test_the_layers_are_restored_on_exit(tiny_llm_path: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_path, dtype=torch.float32)
    model.requires_grad_(False)
    with bf16_backward.applied(model) as n:
        assert n > 0 and "forward" in vars(model.model.layers[0].mlp.up_proj)
    assert "forward" not in vars(model.model.layers[0].mlp.up_proj)


def test_the_choice_follows_the_cpu_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bf16_backward.ENV, raising=False)
    monkeypatch.setenv(DTYPE_ENV, "float32")
    assert bf16_backward.backward_dtype("cpu").name == "float32"
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert bf16_backward.backward_dtype(torch.device("cpu")).name == "bfloat16"
    monkeypatch.setenv(bf16_backward.ENV, "float32")
    choice = bf16_backward.backward_dtype("cpu")
    assert choice.name == "float32" and bf16_backward.ENV in choice.reason
    assert bf16_backward.backward_dtype("cuda:0").name == "float32"
    monkeypatch.setenv(bf16_backward.ENV, "half")
    with pytest.raises(ValueError, match=bf16_backward.ENV):
        bf16_backward.backward_dtype("cpu")


def test_a_dpo_run_matches_fp32_within_the_tolerance(
    tiny_llm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.llm.dpo import train_dpo
    from tests.tasks.llm.test_dpo import FAST, PAIRS

    runs = {}
    for name in ("float32", "bfloat16"):
        monkeypatch.setenv(bf16_backward.ENV, name)
        runs[name] = train_dpo(tiny_llm_path, PAIRS, tmp_path / name, FAST)["metrics"]
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert fp32["rewards/margins"] > 0.01
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert bf16[key] == pytest.approx(fp32[key], rel=DPO_TOLERANCE), key
    assert bf16["rewards/margins"] != fp32["rewards/margins"]  # the gradients did differ
