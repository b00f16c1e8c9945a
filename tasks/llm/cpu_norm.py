"""vLLM's C++ RMSNorm kernels in its CPU engine.

vLLM 0.32 registers its C++ RMSNorm (``torch.ops._C.rms_norm``, ``fused_add_rms_norm``) as the
``vllm_c`` implementation of its IR ops on GPUs only, so on a CPU the norm before every
attention and MLP block runs as a chain of torch operators (casts, add, pow, mean, rsqrt, mul:
a pass and a temporary each). The CPU build ships the same kernels: on SmolLM2's 576-wide rows
in bf16 the fused add + norm takes 22 us for a decoding batch of 128 rows against 77 us for
vLLM's native chain, and 0.25 against 7.2 ms for a prefill chunk of 2,048 rows (two cores,
Zen 4); py-spy put the native chain at 7% of a sampling job's time.

:func:`install` registers them as the provider :data:`PROVIDER` of the two IR ops (for
contiguous rows whose weight has the activations' dtype; vLLM's native chain takes the rest);
the worker then starts the engine with :data:`PRIORITY` as its ``ir_op_priority``. The normed
values differ from the native chain's by bf16 rounding (the kernel rounds once, the chain
twice), so the texts change with it, and stay the same run to run.
``RLRF4REC_VLLM_NORM=native`` keeps vLLM's own choice (the benchmark's before).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "RLRF4REC_VLLM_NORM"
PROVIDER = "rlrf4rec_cpu_c"
PRIORITY = {"rms_norm": [PROVIDER, "native"], "fused_add_rms_norm": [PROVIDER, "native"]}
"""``ir_op_priority`` of a CPU engine once :func:`install` succeeded."""


def _fits(x: torch.Tensor, weight: torch.Tensor | None, variance_size: int | None) -> bool:
    return (
        variance_size is None
        and weight is not None
        and weight.dtype == x.dtype
        and x.dim() == 2
        and x.is_contiguous()
    )


def _norm_fits(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None
) -> bool:
    return _fits(x, weight, variance_size)


def _fused_fits(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> bool:
    return _fits(x, weight, variance_size) and x_residual.is_contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None
) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension of ``(tokens, hidden)`` rows."""
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``x_residual <- x + x_residual``, ``x <- rms_norm(x_residual)``; both
    ``(tokens, hidden)``. Returns ``(x, x_residual)``."""
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual


def install() -> bool:
    """Register the kernels with vLLM's IR ops. Returns whether an engine may use
    :data:`PRIORITY` (False on a GPU build, a vLLM without these ops, or with
    ``RLRF4REC_VLLM_NORM=native``)."""
    if os.environ.get(ENV) == "native":
        return False
    try:
        import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
        from vllm import ir
        from vllm.platforms import current_platform
    except ImportError:
        return False
    ops = getattr(ir, "ops", None)
    if not current_platform.is_cpu() or ops is None:
        return False
    if not all(hasattr(torch.ops._C, name) for name in PRIORITY):
        log.warning("this vLLM has no C++ RMSNorm on CPU: the engine keeps the native one")
        return False
    norm, fused = ops.rms_norm, ops.fused_add_rms_norm
    if PROVIDER not in norm.impls:
        norm.register_impl(PROVIDER, supports_args=_norm_fits)(rms_norm)
    if PROVIDER not in fused.impls:
        fused.register_impl(
            PROVIDER,
            supports_args=_fused_fits,
            inplace=True,
        )(fused_add_rms_norm)
    return True
