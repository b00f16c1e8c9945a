"""TRL's fused LM head on CPU: score only the answer's positions, in small in-place tiles.

TRL's trainers compute per-token log-probabilities through a fused, chunked LM head
(``trl.trainer.utils.add_fused_lm_head``, ``trl.kernels.ChunkedLogProbFunction``). On CUDA it
scores only the positions with a label (the answer); elsewhere it scores every position,
prompt included, and masks the prompt's afterwards, so that the tile shapes stay fixed for
compilers such as Neuron's. On CPU nothing is compiled, and with a ~510-token prompt and a
~96-token answer the head (49,152 x 576 weights) spends some 80% of its work on positions
whose result is thrown away. :func:`install` makes the head take the compact path on CPU too:
the same log-probabilities and gradients (the masked positions contribute zeros either way).

Without Triton, TRL folds each ``tokens x 32,768`` logits tile into the online log-sum-exp in
torch ops that each write a new tile-sized tensor (25.7 MB for a pair's 196 answer tokens, far
beyond the caches): two multiplies by a scale of 1, a masked copy for the top-1 metric, ``z -
max``, ``exp``, products for the entropy; the backward another dozen. With the lean mode
(default) the vocabulary is cut into tiles of :data:`CPU_TILE` entries (0.8 MB for 196 tokens,
cache-resident between the matmul and its fold) and each tile is folded in place, the same
arithmetic up to the order of float sums (``tests/tasks/llm/test_trl_cpu.py``).
``bench/bench_dpo.py --levers trl-tiles,bf16-backward`` prints the DPO step with each.

``RLRF4REC_TRL_HEAD`` (:data:`ENV`): ``lean`` (default), ``compact`` (TRL's own tiles on the
compact path: the benchmark's "before" of the lean tiles), ``full`` (TRL as it ships).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "RLRF4REC_TRL_HEAD"
MODES = ("lean", "compact", "full")
CPU_TILE = 1024
"""Vocabulary entries per logits tile on CPU (TRL's chunk is 32,768)."""


def head_mode() -> str:
    """The LM head's mode on CPU (:data:`ENV`); a bad value fails, naming the variable."""
    value = os.environ.get(ENV, "lean")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {MODES}")
    return value


def install() -> bool:
    """Put TRL's fused LM head in :func:`head_mode` on CPU; whether the compact path is in
    place. Each call sets the whole state, so a later call with another mode undoes an
    earlier one."""
    mode = head_mode()
    try:
        from trl.kernels import chunked_logprob as kernels
        from trl.trainer import utils
    except ImportError:
        return False
    current = getattr(utils, "_use_triton", None)
    if current is None:
        log.warning("trl.trainer.utils has no _use_triton: the LM head scores every position")
        return False
    original = getattr(current, "original", current)
    _install_tiles(kernels, utils, lean=mode == "lean")
    if mode == "full":
        utils._use_triton = original
        return False
    if not getattr(current, "compact_on_cpu", False):

        def compact(device: Any) -> bool:
            return device.type == "cpu" or original(device)

        compact.compact_on_cpu = True  # type: ignore[attr-defined]
        compact.original = original  # type: ignore[attr-defined]
        utils._use_triton = compact
    return True


def _install_tiles(kernels: Any, utils: Any, lean: bool) -> None:
    forward = getattr(kernels._forward_tile, "original", kernels._forward_tile)
    backward = getattr(kernels._backward_tile, "original", kernels._backward_tile)
    function = getattr(utils._ChunkedLogProbFunction, "original", utils._ChunkedLogProbFunction)
    if not lean:
        kernels._forward_tile, kernels._backward_tile = forward, backward
        utils._ChunkedLogProbFunction = function
        return
    kernels._forward_tile = _lean(fold_forward, forward)
    kernels._backward_tile = _lean(fold_backward, backward)
    utils._ChunkedLogProbFunction = _SmallTilesOnCpu(function)


def _lean(fold: Any, original: Any) -> Any:
    """``fold`` where it applies (fp32 tiles, no scale, temperature or soft cap), else TRL's."""

    def tile_fold(tile: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plain = (
            tile.dtype == torch.float32
            and not kwargs["HAS_SOFTCAP"]
            and kwargs["logit_scale"] == 1.0
            and kwargs["inv_t"] == 1.0
        )
        if not plain or not fold(tile, *args, **kwargs):
            return original(tile, *args, **kwargs)
        return None

    tile_fold.original = original  # type: ignore[attr-defined]
    return tile_fold


class _SmallTilesOnCpu:
    """TRL's ``ChunkedLogProbFunction`` with :data:`CPU_TILE`-wide vocabulary tiles on CPU."""

    def __init__(self, function: Any) -> None:
        self.original = function

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        *rest: Any,
    ) -> Any:
        """``hidden`` ``(N, H)``, ``weight`` ``(V, H)``, ``targets`` ``(N,)``: TRL's outputs."""
        if hidden.device.type == "cpu":
            chunk_size = min(chunk_size, CPU_TILE)
        return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size, *rest)


def fold_forward(
    tile: torch.Tensor,
    tile_stride: int,
    targets: torch.Tensor,
    running_max: torch.Tensor,
    sum_exp: torch.Tensor,
    x_sum_exp: torch.Tensor,
    sq_sum_exp: torch.Tensor,
    z_sum: torch.Tensor,
    max_before_target: torch.Tensor,
    target_logit: torch.Tensor,
    vocab_start: int,
    n_cols: int,
    *,
    HAS_ENTROPY: bool,
    HAS_LOG_SUM_SQ_PROBS: bool,
    HAS_MEAN_LOGITS: bool,
    HAS_IS_TOP1: bool,
    **_: Any,
) -> bool:
    """TRL's ``_forward_tile`` for logits ``tile`` ``(n, n_cols)`` (fp32, columns
    ``vocab_start...``; overwritten): folds it into the per-token running statistics ``(n,)``
    in place. Where TRL adds ``e * z`` it adds ``e * (z - m)`` and ``m * e`` (``m`` the running
    max), the same sum. Returns True (done)."""
    local = targets - vocab_start
    in_tile = (local >= 0) & (local < n_cols)
    target_z = tile.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    target_logit.copy_(torch.where(in_tile, target_z, target_logit))
    if HAS_MEAN_LOGITS:
        z_sum += tile.sum(-1)
    tile_max = tile.amax(-1)
    if HAS_IS_TOP1:
        # positions before the target: the whole tile where the target lies beyond it; the
        # columns left of it for the few tokens whose target lies inside it
        beyond = local >= n_cols
        max_before_target.copy_(
            torch.where(beyond, torch.maximum(max_before_target, tile_max), max_before_target)
        )
        rows = in_tile.nonzero().squeeze(-1)
        if rows.numel():
            left = torch.arange(n_cols, device=tile.device) < local[rows].unsqueeze(-1)
            part = tile[rows].masked_fill(~left, -torch.inf).amax(-1)
            max_before_target[rows] = torch.maximum(max_before_target[rows], part)
    new_m = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_m)
    shifted = tile.sub_(new_m.unsqueeze(-1))  # z - m, in place
    e = torch.exp(shifted) if HAS_ENTROPY or HAS_LOG_SUM_SQ_PROBS else shifted.exp_()
    e_sum = e.sum(-1)
    sum_exp.mul_(rescale).add_(e_sum)
    if HAS_ENTROPY:
        e_z = torch.bmm(e.unsqueeze(1), shifted.unsqueeze(2)).view(-1) + new_m * e_sum
        x_sum_exp.mul_(rescale).add_(e_z)
    if HAS_LOG_SUM_SQ_PROBS:
        sq_sum_exp.mul_(rescale * rescale).add_(torch.bmm(e.unsqueeze(1), e.unsqueeze(2)).view(-1))
    running_max.copy_(new_m)
    return True


def fold_backward(
    tile: torch.Tensor,
    tile_stride: int,
    targets: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    vocab_start: int,
    n_cols: int,
    *,
    HAS_LOGPROB_GRAD: bool,
    HAS_ENTROPY_GRAD: bool,
    **_: Any,
) -> bool:
    """TRL's ``_backward_tile``: the logits tile ``(n, n_cols)`` becomes, in place, the gradient
    of the log-probabilities, ``g * (1[j = target] - p_j)``. Returns False (TRL's fold runs)
    when the entropy has a gradient."""
    if HAS_ENTROPY_GRAD:
        return False
    if not HAS_LOGPROB_GRAD:
        tile.zero_()
        return True
    tile.sub_(log_z.unsqueeze(-1)).exp_().mul_(-grad_logprobs.unsqueeze(-1))  # -g p
    local = targets - vocab_start
    rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
    if rows.numel():
        tile[rows, local[rows]] += grad_logprobs[rows]
    return True
