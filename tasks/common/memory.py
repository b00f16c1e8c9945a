"""Give the memory of finished in-process torch work back to the operating system.

glibc keeps freed heap pages in the process: after LoRA-DPO on SmolLM2-135M (2 steps, one
pair per step) the flow process stayed at 3.5 GB resident although the trainer was gone, and
it sat at that size beside the next round's 2.6 GB vLLM engine. ``gc.collect()`` then
``malloc_trim(0)`` brought it back to 0.74 GB (measured here).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory() -> None:
    """Collect garbage, then return the free heap to the OS (glibc; a no-op elsewhere)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def releases_memory(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a heavy function so that its temporaries' memory goes back to the OS when it
    returns (or raises): its locals are gone by then, unlike in a ``finally`` inside it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_memory()

    return wrapper
