"""Generation: sampling settings, shards, the transformers backend, seeds, degenerate flags,
no backend switch mid-call."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.llm.generate import (
    SamplingConfig,
    available_gpus,
    flag_degenerate,
    generate,
    generate_shard,
    shard_users,
    stats_path_for,
)
from tests.tasks.llm.helpers import PROMPTS, check_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- no model needed


def test_sampling_config_validates() -> None:
    assert SamplingConfig().to_dict() == {
        "n": 4,
        "temperature": 1.0,
        "top_p": 0.95,
        "max_new_tokens": 256,
        "seed": 0,
    }
    for bad in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"seed": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)


def test_shard_users() -> None:
    assert shard_users([5, 3, 1, 2, 4, 3], 2) == [[1, 2, 3], [4, 5]]
    assert shard_users([1, 2, 3], 1) == [[1, 2, 3]]
    assert shard_users([1, 2], 5) == [[1], [2]]
    assert shard_users([], 3) == []
    shards = shard_users(range(10), 3)
    assert [len(s) for s in shards] == [4, 3, 3] and sum(shards, []) == list(range(10))
    with pytest.raises(ValueError, match="n_shards"):
        shard_users([1], 0)


def test_available_gpus_is_a_list_of_indices() -> None:
    gpus = available_gpus()
    assert gpus == list(range(len(gpus)))


def test_flag_degenerate() -> None:
    frame = pl.DataFrame(
        {
            "text": ["fine answer", "", "   \n", "cut mid-senten", "ok"],
            "finish_reason": ["stop", "stop", "stop", "length", "stop"],
        }
    )
    flags = frame.select(flag_degenerate(pl.col("text"), pl.col("finish_reason")))
    assert flags.to_series().to_list() == [False, True, True, True, False]


def test_bad_arguments_are_named(tiny_llm_path: str) -> None:
    cfg = SamplingConfig(n=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="missing column"):
        generate(PROMPTS.rename({"prompt": "text"}), tiny_llm_path, cfg, "transformers")
    with pytest.raises(ValueError, match="duplicate"):
        generate(pl.concat([PROMPTS, PROMPTS]), tiny_llm_path, cfg, "transformers")
    with pytest.raises(ValueError, match="backend"):
        generate(PROMPTS, tiny_llm_path, cfg, "llama.cpp")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="adapter"):
        generate(PROMPTS, tiny_llm_path, cfg, "transformers", adapter="/nonexistent")


# --------------------------------------------------------------------------- transformers


def test_transformers_backend_n_samples_seeded(tiny_llm_path: str) -> None:
    cfg = SamplingConfig(n=3, max_new_tokens=6, seed=11)
    samples, stats = generate(PROMPTS, tiny_llm_path, cfg, "transformers", round_idx=2)
    check_samples(samples, PROMPTS, cfg)
    assert set(samples["round"]) == {2}
    assert stats["backend"] == "transformers" and stats["n_prompts"] == 3 and stats["n"] == 3
    assert stats["generated_tokens"] == samples["n_tokens"].sum() > 0
    assert stats["tokens_per_s"] > 0
    # The random tiny model never stops within 6 tokens: every answer is cut, kept and flagged.
    assert samples["degenerate"].all() and (samples["finish_reason"] == "length").all()
    again, _ = generate(PROMPTS, tiny_llm_path, cfg, "transformers", round_idx=2)
    assert again["text"].to_list() == samples["text"].to_list()
    other, _ = generate(
        PROMPTS, tiny_llm_path, SamplingConfig(n=3, max_new_tokens=6, seed=12), "transformers"
    )
    assert other["text"].to_list() != samples["text"].to_list()


def test_generate_shard_writes_parquet_and_stats(tiny_llm_path: str, tmp_path: Path) -> None:
    prompts_path = tmp_path / "prompts.parquet"
    PROMPTS.with_columns(split=pl.lit("train")).write_parquet(prompts_path)
    out = tmp_path / "round_00" / "samples_shard01.parquet"
    cfg = SamplingConfig(n=2, max_new_tokens=4)
    path = generate_shard(
        prompts_path, out, tiny_llm_path, cfg, "transformers", user_ids=shard_users([3, 5, 7], 2)[0]
    )
    assert path == str(out)
    samples = pl.read_parquet(out)
    assert sorted(set(samples["user_id"])) == [3, 5] and samples.height == 4
    stats = json.loads(stats_path_for(out).read_text())
    assert stats["backend"] == "transformers" and stats["sampling"]["n"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "samples_shard01.parquet",
        "samples_shard01.stats.json",
    ]


def test_a_failing_vllm_engine_is_an_error_never_a_switch(
    tiny_llm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's texts come from one backend: with ``auto`` too, a vLLM engine that dies is a
    GenerationError, not a silent switch to transformers."""
    import tasks.llm.generate as gen

    def broken(*args: object, **kwargs: object) -> None:
        raise gen.GenerationError("vLLM worker exited with status -9")

    monkeypatch.setattr(gen, "run_vllm", broken)
    monkeypatch.setattr(gen, "vllm_importable", lambda: True)
    cfg = SamplingConfig(n=1, max_new_tokens=2)
    for backend in ("auto", "vllm"):
        with pytest.raises(gen.GenerationError, match="status -9"):
            generate(PROMPTS, tiny_llm_path, cfg, backend)
