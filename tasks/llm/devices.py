"""The CUDA GPUs this process sees, and their physical ids."""

from __future__ import annotations

import os


def available_gpus() -> list[int]:
    """Logical indices of the CUDA GPUs this process sees (``[]`` on a CPU-only host)."""
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for us
        return []


def physical_gpu(gpu: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of logical GPU ``gpu`` of this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return str(gpu)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not 0 <= gpu < len(entries):
        raise ValueError(f"gpu={gpu}: this process sees {len(entries)} GPU(s) ({visible!r})")
    return entries[gpu]
