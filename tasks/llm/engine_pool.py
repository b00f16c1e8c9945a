"""vLLM engines kept alive between the sampling stages of a flow that serve the same model.

A one-off :func:`tasks.llm.generate.generate` call starts an engine for its job and stops it
after (15-30 s on a CPU). Inside :func:`keep_engines` (a flow opens it around its stages) the
engine of a job stays up, and the next job that asks for the same served model, the same engine
settings and a KV cache no larger than the one it has runs in it without a start. RLRF4Rec's
round 0 (one knowledge text per user from the base model) and round 1 (N samples per round
user from the same model) share one engine, as do the last policy's knowledge texts and its
held-out samples. A job for another model closes the engine first (one engine per device:
memory), and :func:`release_engines` closes it before a stage that needs the memory or the
cores (DPO, the evaluation).

The texts do not depend on the engine having served other jobs: the worker reseeds its RNG
and empties vLLM's prefix cache for every job, and a reused engine's KV cache holds every
sequence the job decodes at once (none preempted), so the scheduler sees what a fresh engine
of the job's own size would. ``tests/tasks/llm/test_engine_pool.py`` compares the texts.

Only the process that opened :func:`keep_engines` keeps engines: a stage that runs elsewhere
(a Ray worker on a GPU cluster) starts one per job as before. ``RLRF4REC_KEEP_ENGINES=0`` turns
keeping off (``bench/bench_flow.py --before``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from tasks.llm.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

_SIZED = "kv_cache_memory_bytes"
ENV = "RLRF4REC_KEEP_ENGINES"
"""``0``: one engine per job even inside :func:`keep_engines`."""


class EnginePool:
    """At most one kept engine per device (``gpu``; None is the CPU)."""

    def __init__(self) -> None:
        self._engines: dict[int | None, VLLMEngine] = {}
        self._locks: dict[int | None, threading.Lock] = {}
        self._guard = threading.Lock()
        self.started = self.reused = 0

    @contextlib.contextmanager
    def lease(self, wanted: VLLMEngine) -> Iterator[tuple[VLLMEngine, bool]]:
        """``(engine, started)`` to run one job in: the kept engine of ``wanted.gpu`` when it
        serves what ``wanted`` would (:func:`fits`), else ``wanted`` started and kept in its
        place. A device whose engine is busy with another job gets ``wanted`` for this job
        only, closed after it."""
        with self._guard:
            lock = self._locks.setdefault(wanted.gpu, threading.Lock())
        if not lock.acquire(blocking=False):
            with wanted:
                yield wanted, True
            return
        try:
            kept = self._engines.get(wanted.gpu)
            if kept is not None and kept.running and fits(kept.engine_args, wanted.engine_args):
                self.reused += 1
                log.info("reusing the running vLLM engine for %s", wanted.model)
                yield kept, False
                return
            if kept is not None:
                log.info("the kept vLLM engine cannot serve %s as asked: restarting", wanted.model)
                kept.close()
                self._engines.pop(wanted.gpu, None)
            wanted.start()
            self._engines[wanted.gpu] = wanted
            self.started += 1
            yield wanted, True
        except BaseException:
            # a failed job may leave the engine in any state: never serve it again
            engine = self._engines.pop(wanted.gpu, None)
            if engine is not None:
                engine.close()
            raise
        finally:
            lock.release()

    def close(self) -> None:
        """Stop every kept engine (their memory is returned to the system)."""
        with self._guard:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()


def fits(kept: dict, wanted: dict) -> bool:
    """Whether an engine started with ``kept`` arguments can run a job that would start one
    with ``wanted``: the same arguments but the seed (each job reseeds) and a CPU KV cache at
    least as large."""
    ignore = {"seed", _SIZED}
    same = {k: v for k, v in kept.items() if k not in ignore} == {
        k: v for k, v in wanted.items() if k not in ignore
    }
    return same and kept.get(_SIZED, 0) >= wanted.get(_SIZED, 0)


_active: EnginePool | None = None


def active() -> EnginePool | None:
    """The pool of the enclosing :func:`keep_engines`, or None (one engine per job)."""
    return _active


@contextlib.contextmanager
def keep_engines() -> Iterator[EnginePool]:
    """Keep vLLM engines between the jobs run inside; close them all on leaving."""
    global _active
    outer, pool = _active, EnginePool()
    _active = None if os.environ.get(ENV) == "0" else pool
    try:
        yield pool
    finally:
        _active = outer
        pool.close()
        if pool.started or pool.reused:
            log.info("vLLM engines: %d started, %d reused", pool.started, pool.reused)


def release_engines() -> None:
    """Stop the kept engines now (before a stage that needs their memory or cores)."""
    if _active is not None:
        _active.close()


__all__ = ["ENV", "EnginePool", "active", "fits", "keep_engines", "release_engines"]
