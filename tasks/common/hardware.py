"""The dtype a model runs in on this host: bf16 on CUDA; on CPU bf16 only with native bf16.

On a CPU without native bf16 instructions (e.g. an AVX2-only AMD EPYC) torch runs bf16 matmuls
on an emulated path at about 0.6 GFLOP/s against 35-55 GFLOP/s in fp32, so sampling in the
checkpoint's bf16 was 8x slower there than in fp32. :func:`cpu_dtype` therefore picks bf16 only
when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` (what
``torch.cpu._is_avx512_bf16_supported()`` / ``_is_amx_tile_supported()`` check), else fp32.
``RLRF4REC_CPU_DTYPE=bfloat16|float32`` overrides the choice.

Training keeps fp32 on every CPU (:func:`train_dtype`): at DPO's beta 0.01 bf16 rounding drowns
the preference signal, whatever the CPU's instructions.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeName = Literal["bfloat16", "float32"]
DTYPE_NAMES: tuple[DtypeName, ...] = get_args(DtypeName)
DTYPE_ENV = "RLRF4REC_CPU_DTYPE"
"""Environment variable that overrides :func:`cpu_dtype` (``bfloat16`` or ``float32``)."""
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of native bf16 instructions (either is enough)."""
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """A chosen dtype and why it was chosen (for the run's log)."""

    name: DtypeName
    reason: str


def cpu_flags(cpuinfo_text: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the first ``flags`` line of ``cpuinfo_text`` (default: the
    contents of ``/proc/cpuinfo``); empty when unavailable (e.g. not Linux, or not x86)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else :func:`platform.processor`)."""
    try:
        text = cpuinfo if cpuinfo is not None else CPUINFO.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def native_bf16(flags: Iterable[str]) -> bool:
    """Whether ``flags`` include native bf16 instructions (``avx512_bf16`` or ``amx_bf16``)."""
    return not set(BF16_FLAGS).isdisjoint(flags)


def dtype_override(
    env: str = DTYPE_ENV, unset: str = "choose from the CPU's flags"
) -> DtypeName | None:
    """The dtype named by the environment variable ``env``, None when it is unset or empty;
    a ``ValueError`` naming the variable otherwise (``unset``: what leaving it unset does)."""
    raw = os.environ.get(env, "")
    value = raw.strip().lower()
    if not value:
        return None
    for name in DTYPE_NAMES:
        if value == name:
            return name
    raise ValueError(
        f"{env}={raw!r}: expected one of {', '.join(DTYPE_NAMES)} (or unset it to {unset})"
    )


def cpu_dtype(flags: Iterable[str] | None = None) -> DtypeChoice:
    """The dtype models run in on this CPU (sampling, merged checkpoints, the knowledge
    encoder), with the reason.

    bf16 when ``flags`` (default: :func:`cpu_flags`) include native bf16 instructions, else
    fp32; :data:`DTYPE_ENV` wins over both. Raises ``ValueError`` on a bad override.
    """
    override = dtype_override()
    have = sorted(set(BF16_FLAGS) & set(cpu_flags() if flags is None else flags))
    if have:
        name: DtypeName = "bfloat16"
        why = f"the CPU has native bf16 instructions ({', '.join(have)})"
    else:
        name = "float32"
        why = (
            f"no native bf16 instructions on this CPU (no {'/'.join(sorted(BF16_FLAGS))}); "
            "bf16 would run on a slow emulated path"
        )
    if override is None:
        return DtypeChoice(name, f"{name}: {why}")
    return DtypeChoice(override, f"{override}: set by {DTYPE_ENV} (without it: {name}; {why})")


def pinned_or_cpu_dtype(env: str) -> DtypeChoice:
    """The dtype named by the environment variable ``env`` (one component's own switch, e.g.
    the encoder's) when it is set, else :func:`cpu_dtype`; with the reason."""
    pinned = dtype_override(env, unset="follow the CPU's dtype")
    if pinned is not None:
        return DtypeChoice(pinned, f"{pinned}: set by {env}")
    choice = cpu_dtype()
    return DtypeChoice(choice.name, f"the CPU's dtype, {choice.reason}")


def torch_dtype(device: Any) -> torch.dtype:
    """The dtype to run a model in on ``device`` (a ``torch.device`` or a name such as ``cpu``,
    ``cuda:1``): bf16 on CUDA, :func:`cpu_dtype` on CPU, fp32 on anything else."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu":
        return getattr(torch, cpu_dtype().name)
    return torch.float32


def train_dtype(device: Any) -> torch.dtype:
    """The dtype LoRA training loads its model in: bf16 on CUDA, fp32 on every CPU.

    fp32 on CPU even where the CPU has native bf16: with bf16 the DPO signal at beta 0.01 is
    lost in rounding (see :mod:`tasks.llm.dpo`). Never bf16 on a CPU without native bf16.
    """
    import torch

    kind = torch.device(device).type
    return torch.bfloat16 if kind == "cuda" else torch.float32


__all__ = [
    "BF16_FLAGS",
    "DTYPE_ENV",
    "DTYPE_NAMES",
    "DtypeChoice",
    "DtypeName",
    "cpu_dtype",
    "cpu_flags",
    "cpu_model",
    "native_bf16",
    "pinned_or_cpu_dtype",
    "torch_dtype",
    "train_dtype",
]
