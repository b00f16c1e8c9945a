"""The sampling stage in jobs of CHUNK_USERS users, and its summed generation statistics."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.common.stage import Artefact, InputRef, run_stage
from tasks.llm.generate import SamplingConfig
from tasks.llm.policy import Policy
from tasks.rlrf4rec import stages


def test_summed_generation_stats_add_counts_and_recompute_the_rate() -> None:
    first = {
        "backend": "vllm",
        "seconds": 10.0,
        "generate_seconds": 8.0,
        "generated_tokens": 40,
        "n_prompts": 2,
        "tokens_per_s": 5.0,
        "engine_reused": False,
    }
    second = {
        "backend": "vllm",
        "seconds": 4.0,
        "generate_seconds": 2.0,
        "generated_tokens": 60,
        "n_prompts": 3,
        "tokens_per_s": 30.0,
        "engine_reused": True,
    }
    got = stages.summed_generation_stats([first, second])
    # (40 + 60) tokens over (8 + 2) s of generation: 10 tokens/s, not the mean of 5 and 30
    assert got["generated_tokens"] == 100 and got["n_prompts"] == 5
    assert got["seconds"] == 14.0 and got["generate_seconds"] == 10.0
    assert got["tokens_per_s"] == pytest.approx(10.0)
    assert got["backend"] == "vllm" and got["engine_reused"] is False


def test_sample_runs_in_jobs_of_chunk_users_and_keeps_every_user(
    tmp_path: Path, tiny_llm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stages, "CHUNK_USERS", 2)
    prompts = tmp_path / "prompts.parquet"
    pl.DataFrame(
        {
            "user_id": [5, 3, 1, 4, 2],
            "split": ["train"] * 5,
            "prompt": [f"User {u} likes films." for u in (5, 3, 1, 4, 2)],
        }
    ).write_parquet(prompts)
    out = tmp_path / "samples" / "shard00.parquet"
    out.parent.mkdir()
    got = run_stage(
        "sample",
        stages.sample.stage_fn,
        Artefact(str(prompts)),
        Policy(InputRef.of(tiny_llm_path)),
        splits=("train",),
        sampling=SamplingConfig(n=2, temperature=1.0, max_new_tokens=4, seed=3),
        backend="transformers",
        shard=stages.Shard(),
        round_idx=0,
        out=out,
    )
    samples = pl.read_parquet(out)
    assert sorted(samples["user_id"].unique().to_list()) == [1, 2, 3, 4, 5]
    assert samples.height == 10
    # three jobs (users 1-2, 3-4, 5): their statistics add up to one shard's
    assert got.stats["n_prompts"] == 5 and got.stats["jobs_kept"] == 0
    assert got.stats["generated_tokens"] == samples["n_tokens"].sum()
    assert not (out.parent / ".shard00.parquet.partial").exists()
