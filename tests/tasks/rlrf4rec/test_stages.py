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


def test_merged_samples_count_the_seconds_of_jobs_kept_from_a_stopped_run(tmp_path: Path) -> None:
    def shard(name: str, users: list[int]) -> Path:
        path = tmp_path / f"{name}.parquet"
        pl.DataFrame(
            {
                "user_id": users,
                "sample_idx": [0] * len(users),
                "text": ["likes films"] * len(users),
                "n_tokens": [4] * len(users),
                "degenerate": [False] * len(users),
            }
        ).write_parquet(path)
        return path

    # shard 0 was resumed: its stage ran 30 s, its jobs (one kept from the stopped run) 130 s
    resumed = Artefact(
        str(shard("shard00", [1, 2])),
        stats={"seconds": 130.0, "generated_tokens": 8, "jobs_kept": 1, "backend": "vllm"},
        seconds=30.0,
    )
    whole = Artefact(
        str(shard("shard01", [3])), stats={"seconds": 50.0, "generated_tokens": 4}, seconds=52.0
    )
    got = run_stage(
        "merge-samples", stages.merge_samples.stage_fn, [resumed, whole], out=tmp_path / "m.parquet"
    ).stats
    assert got["sample_seconds"] == 30.0 + 52.0  # the shard stages' wall time in this run
    assert got["generation_seconds"] == 130.0 + 50.0  # what the texts cost
    assert got["tokens_per_s"] == pytest.approx((8 + 4) / 130.0)  # shards run side by side
    assert got["jobs_kept"] == 1 and got["users"] == 3
