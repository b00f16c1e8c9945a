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
        assert not trl_cpu.install()  # TRL as it ships, whatever an earlier test installed
        assert utils._use_triton is getattr(before, "original", before)
        monkeypatch.delenv(trl_cpu.ENV)
        assert trl_cpu.install() and trl_cpu.install()
        assert utils._use_triton(torch.device("cpu"))
        assert utils._use_triton.compact_on_cpu and os.environ.get(trl_cpu.ENV) is None
    finally:
        utils._use_triton = before


# ----------------------------------------------------------------- the lean tile folds


def fold_all(fold, tiles: list[torch.Tensor], targets: torch.Tensor, flags: dict) -> list:
    """Run ``fold`` (TRL's ``_forward_tile`` signature) over consecutive vocabulary tiles
    (copies: the lean fold overwrites them); the running statistics at the end."""
    n = targets.shape[0]
    state = [torch.full((n,), -torch.inf), *(torch.zeros(n) for _ in range(4))]
    state += [torch.full((n,), -torch.inf), torch.zeros(n)]
    start = 0
    for tile in tiles:
        tile = tile.clone()
        fold(tile, tile.stride(0), targets, *state, start, tile.shape[1], **flags)
        start += tile.shape[1]
    return state


FLAGS = {
    "logit_scale": 1.0,
    "softcap": 1.0,
    "inv_t": 1.0,
    "HAS_SOFTCAP": False,
    "HAS_ENTROPY": True,
    "HAS_LOG_SUM_SQ_PROBS": True,
    "HAS_MEAN_LOGITS": True,
    "HAS_IS_TOP1": True,
    "BLOCK_SIZE": 1024,
}


def test_the_lean_forward_fold_keeps_trls_statistics_and_top1_ties() -> None:
    kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    original = getattr(kernels._forward_tile, "original", kernels._forward_tile)
    torch.manual_seed(0)
    logits = torch.randn(6, 23) * 3
    targets = torch.tensor([2, 9, 9, 20, 14, 0])
    logits[1, 9] = logits[1].max() + 1  # the unique maximum: top-1
    logits[2, 9] = logits[2, 3] = logits[2].max() + 1  # tied with an earlier column, another tile
    logits[3, 20] = logits[3, 17] = logits[3].max() + 1  # tied earlier in the target's own tile
    logits[4, 14] = logits[4, 19] = logits[4].max() + 1  # tied with a later column: top-1
    tiles = list(logits.split(8, dim=1))  # 8 + 8 + 7 columns
    trl = fold_all(original, tiles, targets, FLAGS)
    lean = fold_all(trl_cpu.fold_forward, tiles, targets, FLAGS)
    for name, a, b in zip(("max", "sum_exp", "x_sum_exp", "sq", "z_sum"), lean, trl, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(lean[6], trl[6])  # the target's logit

    def top1(s: list) -> list[bool]:
        return ((s[6] >= s[0]) & (s[6] > s[5])).tolist()

    assert top1(lean) == top1(trl)
    assert top1(lean)[1:5] == [True, False, False, True]


def test_the_lean_backward_fold_is_trls_log_prob_gradient() -> None:
    kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    original = getattr(kernels._backward_tile, "original", kernels._backward_tile)
    torch.manual_seed(1)
    tile = torch.randn(5, 16)
    targets = torch.tensor([3, 15, 40, 0, 7]) + 32  # columns 32..47 hold this tile
    log_z = torch.logsumexp(tile, -1) + 0.5
    grad = torch.randn(5)
    flags = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}
    flags |= {"HAS_LOGPROB_GRAD": True, "HAS_ENTROPY_GRAD": False, "BLOCK_SIZE": 1024}
    args = (targets, log_z, log_z, grad, log_z, 32, 16)
    want, got = tile.clone(), tile.clone()
    original(want, want.stride(0), *args, **flags)
    assert trl_cpu.fold_backward(got, got.stride(0), *args, **flags)
    # written out: g * (1[j = target] - exp(z - log_z)); row 2's target lies in another tile
    p = torch.exp(tile - log_z[:, None])
    hand = -grad[:, None] * p
    for r, t in enumerate((targets - 32).tolist()):
        if 0 <= t < 16:
            hand[r, t] += grad[r]
    torch.testing.assert_close(got, hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # an entropy gradient is left to TRL's fold
    assert not trl_cpu.fold_backward(got, 16, *args, **(flags | {"HAS_ENTROPY_GRAD": True}))


def chunked(outputs: tuple[str, ...], logit_scale: float = 1.0):
    """TRL's ChunkedLogProbFunction on random head inputs as installed now: its outputs, then
    the gradient of the log-probs' sum on the hidden states."""
    from trl.trainer import utils

    torch.manual_seed(2)
    hidden = (torch.randn(9, 32) * 0.5).requires_grad_()
    weight = torch.randn(3000, 32) * 0.3  # two full tiles of 1,024 and a partial one
    targets = torch.randint(0, 3000, (9,))
    out = utils._ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32768, None, logit_scale, outputs
    )
    out[0].sum().backward()
    return [x for x in out if x is not None], hidden.grad


@pytest.mark.parametrize("logit_scale", [1.0, 0.5])
def test_lean_tiles_give_trls_head_outputs_and_gradients(
    monkeypatch: pytest.MonkeyPatch, logit_scale: float
) -> None:
    kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    monkeypatch.setenv(trl_cpu.ENV, "compact")
    trl_cpu.install()
    want, want_grad = chunked(outputs, logit_scale)
    trls, tiles = [], []
    trl_fold = kernels._forward_tile
    try:
        monkeypatch.setattr(
            kernels, "_forward_tile", lambda *a, **k: trls.append(1) or trl_fold(*a, **k)
        )
        monkeypatch.setenv(trl_cpu.ENV, "lean")
        monkeypatch.setattr(trl_cpu, "CPU_TILE", 1024)
        trl_cpu.install()
        lean = kernels._forward_tile
        monkeypatch.setattr(
            kernels, "_forward_tile", lambda *a, **k: tiles.append(1) or lean(*a, **k)
        )
        got, got_grad = chunked(outputs, logit_scale)
    finally:
        monkeypatch.undo()  # TRL's fold back in the module
        monkeypatch.setenv(trl_cpu.ENV, "compact")
        trl_cpu.install()  # and its ChunkedLogProbFunction
    assert kernels._forward_tile is trl_fold and not hasattr(trl_fold, "original")
    # 3,000 columns in tiles of <= 1,024; folded in place unless scaled (then by TRL's fold)
    assert len(tiles) == 3 and len(trls) == (0 if logit_scale == 1.0 else 3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_a_bad_head_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trl_cpu.ENV, "fast")
    with pytest.raises(ValueError, match="RLRF4REC_TRL_HEAD='fast'"):
        trl_cpu.install()
