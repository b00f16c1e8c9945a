"""Engines kept between jobs: which job may reuse which engine, and that a reused engine writes
the texts a fresh one would."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.llm.engine_pool import ENV, active, fits, keep_engines, release_engines
from tasks.llm.generate import generate
from tasks.llm.sampling import SamplingConfig
from tasks.llm.vllm_engine import vllm_importable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU_ARGS = {
    "model": "m",
    "seed": 0,
    "dtype": "float32",
    "gpu_memory_utilization": 0.25,
    "enforce_eager": True,
    "max_num_seqs": 64,
    "block_size": 32,
    "kv_cache_memory_bytes": 2**31,
    "max_model_len": 512,
}


def test_an_engine_fits_the_jobs_its_own_settings_and_cache_hold() -> None:
    assert fits(CPU_ARGS, dict(CPU_ARGS))
    assert fits(CPU_ARGS, {**CPU_ARGS, "seed": 7})  # every job reseeds the sampler
    assert fits(CPU_ARGS, {**CPU_ARGS, "kv_cache_memory_bytes": 2**30})  # a smaller job
    assert not fits(CPU_ARGS, {**CPU_ARGS, "kv_cache_memory_bytes": 2**31 + 1})  # preempted
    assert not fits(CPU_ARGS, {**CPU_ARGS, "model": "round_01/dpo/merged"})  # another policy
    assert not fits(CPU_ARGS, {**CPU_ARGS, "max_model_len": 1024})
    assert not fits(CPU_ARGS, {**CPU_ARGS, "dtype": "bfloat16"})
    gpu = {k: v for k, v in CPU_ARGS.items() if k != "kv_cache_memory_bytes"}
    assert fits(gpu, {**gpu, "seed": 1})  # vLLM sizes a GPU's cache itself


def test_keeping_is_scoped_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert active() is None  # a one-off generate() outside a flow starts its own engine
    with keep_engines() as pool:
        assert active() is pool
        with keep_engines() as inner:
            assert active() is inner
        assert active() is pool
    assert active() is None
    monkeypatch.setenv(ENV, "0")
    with keep_engines():
        assert active() is None


# Long enough (after the chat template) for full 128-token KV blocks that vLLM's prefix cache
# would keep from one job to the next.
HISTORY = "; ".join(f"Movie number {i} (199{i % 10}), rated {1 + i % 5}" for i in range(40))
LONG = pl.DataFrame(
    {
        "user_id": [11, 12],
        "prompt": [
            f"A user rated: {HISTORY}. Describe what they like.",
            f"Another user rated: {HISTORY}. Which genres do they avoid?",
        ],
    }
)


@pytest.mark.slow  # two engine starts; the default suite's reuse check is test_vllm_engine's
@pytest.mark.skipif(not vllm_importable(), reason="vllm is not installed")
def test_a_kept_engine_serves_the_next_job_as_a_fresh_engine_would(
    default_policy_path: str,
) -> None:
    cfg = SamplingConfig(n=3, max_new_tokens=10, seed=5)
    with keep_engines() as pool:
        # the prompts' blocks enter the prefix cache here, as round 0's do before round 1
        _, first = generate(
            LONG, default_policy_path, SamplingConfig(n=3, max_new_tokens=10, seed=3), "vllm"
        )
        kept, second = generate(LONG, default_policy_path, cfg, "vllm")
        assert first["load_seconds"] > 0 and second["load_seconds"] == 0.0
        assert (pool.started, pool.reused) == (1, 1)
        release_engines()
        assert not pool._engines  # closed before the stages that need the memory
    fresh, stats = generate(LONG, default_policy_path, cfg, "vllm")
    assert stats["load_seconds"] > 0
    assert fresh.equals(kept)
    assert fresh["text"].n_unique() > 2  # sampled texts, not one repeated answer
