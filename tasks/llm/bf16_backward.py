"""LoRA training with the frozen weights' backward matmuls in bf16, the forward in fp32.

In LoRA training every base weight is frozen, so the backward pass through a linear layer is a
single matmul, ``dx = dy @ W`` (no weight gradient), a third of a DPO step's FLOPs (policy
forward, reference forward, policy backward). :func:`applied` computes that product in bf16
(``dy`` and a bf16 copy of ``W``, fp32 accumulation) on CPUs with native bf16 instructions,
where bf16 matmuls run about 4x faster than fp32 (``bench/ceiling.py``), and leaves the rest
alone: the forward passes of the policy and of the reference, hence the log-probabilities and
the loss, are fp32 exactly as before; the LoRA weights, their gradients and the optimiser stay
fp32. Only the gradient reaching each LoRA weight is rounded (about 0.4% of each element of
``dx``; ``tests/tasks/llm/test_bf16_backward.py`` states the tolerance). bf16 autocast instead
rounds the forward, where a LoRA update is as small as the rounding of the layer's output, and
the DPO margin after one step fell to a fifth of fp32's.

On by default where :func:`tasks.common.hardware.cpu_dtype` is bf16; ``RLRF4REC_BACKWARD_DTYPE``
(``bfloat16`` / ``float32``) pins it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F

from tasks.common.hardware import DtypeChoice, pinned_or_cpu_dtype

ENV = "RLRF4REC_BACKWARD_DTYPE"


def backward_dtype(device: Any) -> DtypeChoice:
    """The dtype of the frozen weights' backward matmuls on ``device`` (a ``torch.device`` or
    a name), with the reason: :data:`ENV` when set, else the CPU's dtype on CPU; on any other
    device the trainer's own precision (``float32`` here means: left alone)."""
    choice = pinned_or_cpu_dtype(ENV)  # a bad value of ENV fails on every device
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cpu":
        return DtypeChoice("float32", f"float32: left to the trainer on {kind}")
    return choice


class _Bf16BackwardLinear(torch.autograd.Function):
    """``y = x W^T + b`` in the input's precision; ``dx = dy W`` in bf16. ``W`` and ``b`` are
    frozen: no gradient is returned for them."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_bf16: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight_bf16)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight_bf16,) = ctx.saved_tensors
        dx = torch.matmul(dy.to(torch.bfloat16), weight_bf16)
        return dx.to(dy.dtype), None, None, None


def _frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and not m.weight.requires_grad
        and (m.bias is None or not m.bias.requires_grad)
        and m.weight.dtype == torch.float32
    ]


@contextlib.contextmanager
def applied(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, every frozen fp32 ``nn.Linear`` of ``model`` (PEFT's base layers, the
    MLPs) computes its input gradient in bf16; yields how many layers that is (0 when not
    ``enabled``). The bf16 weight copies (2 bytes a frozen weight) are dropped on exit."""
    layers = _frozen_linears(model) if enabled else []
    for layer in layers:
        weight_bf16 = layer.weight.detach().to(torch.bfloat16)

        def forward(x: torch.Tensor, layer: torch.nn.Linear = layer, w16=weight_bf16):
            return _Bf16BackwardLinear.apply(x, layer.weight, layer.bias, w16)

        layer.forward = forward  # type: ignore[method-assign]
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to nn.Linear.forward


__all__ = ["ENV", "applied", "backward_dtype"]
