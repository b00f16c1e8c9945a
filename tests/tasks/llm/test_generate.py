"""Generation: sampling settings, shards, both backends, seeds, degenerate flags, LoRA."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import polars as pl
import pytest

from tasks.llm.generate import (
    CPU_KV_MIN_BYTES,
    CPU_KV_SEQUENCES,
    SAMPLES_SCHEMA,
    SamplingConfig,
    VLLMEngine,
    _engine_args,
    available_gpus,
    cpu_kv_cache_bytes,
    flag_degenerate,
    generate,
    generate_shard,
    merged_checkpoint,
    shard_users,
    stats_path_for,
    vllm_importable,
)

PROMPTS = pl.DataFrame(
    {
        "user_id": [7, 3, 5],
        "prompt": [
            "Describe a user who likes science fiction movies.",
            "Hi",
            "Which movies of the 1990s are comedies? Answer briefly.",
        ],
    }
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_samples(samples: pl.DataFrame, prompts: pl.DataFrame, cfg: SamplingConfig) -> None:
    assert dict(samples.schema) == SAMPLES_SCHEMA
    assert samples.height == prompts.height * cfg.n
    per_user = samples.group_by("user_id", maintain_order=True).agg(pl.col("sample_idx"))
    assert per_user["user_id"].to_list() == prompts["user_id"].to_list()  # prompts' order
    assert all(sorted(s) == list(range(cfg.n)) for s in per_user["sample_idx"])
    assert samples["n_tokens"].min() >= 1 and samples["n_tokens"].max() <= cfg.max_new_tokens
    assert set(samples["finish_reason"]) <= {"stop", "length"}
    expected = (samples["finish_reason"] == "length") | (samples["text"].str.strip_chars() == "")
    assert samples["degenerate"].to_list() == expected.to_list()


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


def test_cpu_kv_cache_follows_the_model(default_policy_path: str, tiny_llm_path: str) -> None:
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, K and V, 2 bytes each = 23,040 B/token
    smol = cpu_kv_cache_bytes(default_policy_path, 1024, dtype="bfloat16")
    assert smol == 2 * 30 * 3 * 64 * 2 * 1024 * CPU_KV_SEQUENCES
    assert cpu_kv_cache_bytes(default_policy_path, 2048, dtype="bfloat16") == 2 * smol
    # a tiny model gets the floor, a huge length the ceiling (a quarter of RAM)
    assert cpu_kv_cache_bytes(tiny_llm_path, 2048) == CPU_KV_MIN_BYTES
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert cpu_kv_cache_bytes(default_policy_path, 10**7) == ram // 4
    cpu = _engine_args(default_policy_path, 0, gpu_visible=False, max_model_len=1024)
    assert cpu["kv_cache_memory_bytes"] == cpu_kv_cache_bytes(default_policy_path, 1024)
    # an explicit fraction, or a GPU, leaves the sizing to vLLM
    assert "kv_cache_memory_bytes" not in _engine_args(
        default_policy_path, 0, False, 1024, gpu_memory_utilization=0.3
    )
    assert "kv_cache_memory_bytes" not in _engine_args(default_policy_path, 0, True, 1024)


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
    _check_samples(samples, PROMPTS, cfg)
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


def _random_adapter(model: str, out: Path) -> str:
    """A LoRA with non-zero weights (so it changes the model's outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    cfg = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, cfg).save_pretrained(out)
    return str(out)


def test_adapter_changes_the_texts_and_merges_once(tiny_llm_path: str, tmp_path: Path) -> None:
    adapter = _random_adapter(tiny_llm_path, tmp_path / "round_01" / "adapter")
    cfg = SamplingConfig(n=2, max_new_tokens=6, seed=3)
    base, _ = generate(PROMPTS, tiny_llm_path, cfg, "transformers")
    tuned, stats = generate(PROMPTS, tiny_llm_path, cfg, "transformers", adapter=adapter)
    assert tuned["text"].to_list() != base["text"].to_list()
    assert stats["lora_mode"] == "merged-in-memory"
    merged = merged_checkpoint(tiny_llm_path, adapter)
    assert merged == str(tmp_path / "round_01" / "merged")
    stamp = (Path(merged) / "model.safetensors").stat().st_mtime_ns
    assert merged_checkpoint(tiny_llm_path, adapter) == merged  # reused, not merged again
    assert (Path(merged) / "model.safetensors").stat().st_mtime_ns == stamp
    from_merged, _ = generate(PROMPTS, merged, cfg, "transformers")
    assert from_merged["text"].to_list() == tuned["text"].to_list()


# --------------------------------------------------------------------------- vLLM

needs_vllm = pytest.mark.skipif(not vllm_importable(), reason="vllm is not installed")
VLLM_CFG = SamplingConfig(n=2, max_new_tokens=12, seed=5)


@pytest.fixture(scope="module")
def vllm_runs(default_policy_path: str) -> dict:
    """Three jobs in one engine running the default model (vLLM's CPU attention needs
    head_dim >= 32, so not the tiny model); one engine start (about 20 s) for the module."""
    if not vllm_importable():
        pytest.skip("vllm is not installed")
    with pytest.MonkeyPatch.context() as mp:
        # One unbound thread: on a CPU shared with other jobs, vLLM's default (one thread
        # bound to each core) slows down several-fold.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        with VLLMEngine(default_policy_path, max_model_len=512) as engine:
            run = functools.partial(generate, PROMPTS, default_policy_path, backend="vllm")
            first = run(VLLM_CFG, round_idx=1, engine=engine)
            second = run(VLLM_CFG, round_idx=1, engine=engine)
            other = run(SamplingConfig(n=2, max_new_tokens=12, seed=6), engine=engine)
    return {"first": first, "second": second, "other": other}


@needs_vllm
def test_vllm_backend_n_samples(vllm_runs: dict) -> None:
    samples, stats = vllm_runs["first"]
    _check_samples(samples, PROMPTS, VLLM_CFG)
    assert set(samples["round"]) == {1}
    assert stats["backend"] == "vllm" and stats["tokens_per_s"] > 0
    assert stats["generated_tokens"] == samples["n_tokens"].sum()
    assert samples["text"].str.strip_chars().str.len_chars().max() > 0  # real words


@needs_vllm
def test_vllm_same_seed_same_texts(vllm_runs: dict) -> None:
    first = vllm_runs["first"][0]["text"].to_list()
    assert vllm_runs["second"][0]["text"].to_list() == first  # reseeded for every job
    assert vllm_runs["other"][0]["text"].to_list() != first


@pytest.mark.slow
@needs_vllm
def test_vllm_fresh_engine_gives_the_same_texts(vllm_runs: dict, default_policy_path: str) -> None:
    samples, stats = generate(PROMPTS, default_policy_path, VLLM_CFG, "vllm", round_idx=1)
    assert stats["load_seconds"] > 0  # a one-off engine was started for the call
    assert samples.equals(vllm_runs["first"][0])


def test_auto_falls_back_to_transformers(
    tiny_llm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.llm.generate as gen

    def broken(*args: object, **kwargs: object) -> None:
        raise gen.GenerationError("vLLM engine did not start: test")

    monkeypatch.setattr(gen, "_run_vllm", broken)
    monkeypatch.setattr(gen, "vllm_importable", lambda: True)
    cfg = SamplingConfig(n=1, max_new_tokens=2)
    samples, stats = generate(PROMPTS, tiny_llm_path, cfg, "auto")
    assert stats["backend"] == "transformers" and samples.height == 3
    with pytest.raises(gen.GenerationError, match="did not start"):
        generate(PROMPTS, tiny_llm_path, cfg, "vllm")


@pytest.mark.slow
@needs_vllm
def test_vllm_adapter_merged_and_as_lora(default_policy_path: str, tmp_path: Path) -> None:
    adapter = _random_adapter(default_policy_path, tmp_path / "round_01" / "adapter")
    cfg = SamplingConfig(n=1, max_new_tokens=8, seed=1, temperature=0.0)
    merged, stats = generate(PROMPTS, default_policy_path, cfg, "vllm", adapter=adapter)
    assert stats["lora_mode"] == "merged" and stats["served"].endswith("merged")
    with VLLMEngine(default_policy_path, enable_lora=True, max_lora_rank=8) as engine:
        lora, stats = generate(
            PROMPTS, default_policy_path, cfg, "vllm", adapter=adapter, engine=engine
        )
    assert stats["lora_mode"] == "lora"
    base, _ = generate(PROMPTS, default_policy_path, cfg, "vllm")
    assert lora["text"].to_list() != base["text"].to_list()
    assert merged["text"].to_list() != base["text"].to_list()


@pytest.mark.gpu
def test_vllm_on_one_gpu(default_policy_path: str) -> None:
    gpus = available_gpus()
    if not gpus:
        pytest.skip("no GPU")
    samples, stats = generate(PROMPTS, default_policy_path, VLLM_CFG, "vllm", gpu=gpus[-1])
    _check_samples(samples, PROMPTS, VLLM_CFG)
    assert stats["gpu"] == gpus[-1]
