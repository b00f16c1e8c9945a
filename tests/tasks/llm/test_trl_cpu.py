"""TRL's fused LM head scoring only the answer's positions on CPU: same log-probs, same grads."""

from __future__ import annotations

import os

import pytest
import torch

from tasks.llm import trl_cpu


def head_outputs(model_path: str, compact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of a 2-sequence batch whose first 7 positions are prompt, and the
    gradient of their sum on the last layer's MLP weights."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    before = utils._use_triton
    utils._use_triton = getattr(before, "original", before)  # TRL's own, whatever ran before
    if compact:
        assert trl_cpu.install()
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        utils.add_fused_lm_head(model, outputs=("log_probs",))
        ids = torch.randint(0, 1000, (2, 12))
        labels = ids.clone()
        labels[:, :7] = -100  # the prompt
        labels[1, 10:] = -100  # padding at the end of the shorter answer
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grad = model.model.layers[-1].mlp.down_proj.weight.grad.clone()
        return out.log_probs.detach(), grad
    finally:
        utils._use_triton = before


def test_the_compact_head_gives_the_same_log_probs_and_gradients(tiny_llm_path: str) -> None:
    full_lp, full_grad = head_outputs(tiny_llm_path, compact=False)
    assert trl_cpu.ENV not in os.environ
    compact_lp, compact_grad = head_outputs(tiny_llm_path, compact=True)
    # positions 6..8 of row 0 (shifted labels 7..9 ...) are answer tokens: non-zero log-probs
    assert (full_lp[:, 6:9] < 0).all() and (full_lp[:, :6] == 0).all()
    torch.testing.assert_close(compact_lp, full_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compact_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_install_is_idempotent_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    utils = pytest.importorskip("trl.trainer.utils")
    before = utils._use_triton
    try:
        monkeypatch.setenv(trl_cpu.ENV, "full")
        assert not trl_cpu.install() and utils._use_triton is before
        monkeypatch.delenv(trl_cpu.ENV)
        assert trl_cpu.install() and trl_cpu.install()
        assert utils._use_triton(torch.device("cpu"))
        assert utils._use_triton.compact_on_cpu and os.environ.get(trl_cpu.ENV) is None
    finally:
        utils._use_triton = before
