"""One vLLM sampling job: in a given engine, in an engine kept by :mod:`tasks.llm.engine_pool`,
or in a fresh engine started for the job and stopped after (:func:`run_vllm`)."""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from tasks.llm import engine_pool
from tasks.llm.chat import stop_token_ids
from tasks.llm.sampling import SamplingConfig
from tasks.llm.vllm_engine import CacheDemand, VLLMEngine, lora_rank, model_max_len


@contextlib.contextmanager
def _engine_for(fresh: VLLMEngine, reusable: bool) -> Iterator[tuple[VLLMEngine, bool]]:
    """``(engine, started)``: a kept engine of :mod:`tasks.llm.engine_pool` when a flow keeps
    them (never for a LoRA request), else ``fresh``, started for this job and closed after."""
    pool = engine_pool.active()
    if pool is not None and reusable:
        with pool.lease(fresh) as leased:
            yield leased
        return
    with fresh:
        yield fresh, True


def run_vllm(
    prompt_ids: list[list[int]],
    model: str,
    cfg: SamplingConfig,
    lora: dict[str, Any] | None,
    gpu: int | None,
    engine: VLLMEngine | None,
    engine_opts: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run one vLLM job in ``engine``, or in a fresh engine started for it and stopped after.

    Returns the rows keyed by ``idx`` (the prompt's position) and the worker's stats.
    """
    longest = max(len(p) for p in prompt_ids)
    need = longest + cfg.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="vllm-job-") as tmp:
        tmpd = Path(tmp)
        pl.DataFrame(
            {
                "idx": pl.Series(range(len(prompt_ids)), dtype=pl.Int64),
                "prompt_token_ids": pl.Series(prompt_ids, dtype=pl.List(pl.Int64)),
            }
        ).write_parquet(tmpd / "prompts.parquet")
        job = {
            "prompts_path": str(tmpd / "prompts.parquet"),
            "out_path": str(tmpd / "samples.parquet"),
            "stats_path": str(tmpd / "stats.json"),
            "sampling": {
                "n": cfg.n,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "max_tokens": cfg.max_new_tokens,
                "seed": cfg.seed,
                "stop_token_ids": stop_token_ids(model),  # the model's, as the HF backend's
            },
            "lora": lora,
        }
        if engine is not None:
            if need > engine.max_model_len:
                raise ValueError(
                    f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds "
                    f"the engine's max_model_len={engine.max_model_len}"
                )
            stats = engine.run(job)
            stats["engine_start_seconds"] = 0.0
        else:
            max_len = engine_opts.pop("max_model_len", None) or min(
                model_max_len(model), 256 * math.ceil(need / 256)
            )
            if need > max_len:
                raise ValueError(
                    f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds "
                    f"the model's {max_len} tokens: cut the history (max_prompt_tokens)"
                )
            fresh = VLLMEngine(
                model,
                gpu=gpu,
                enable_lora=lora is not None,
                max_lora_rank=lora_rank(Path(lora["path"])) if lora else 16,
                max_model_len=max_len,
                seed=cfg.seed,
                kv_demand=CacheDemand(tuple(map(len, prompt_ids)), cfg.n, cfg.max_new_tokens),
                **engine_opts,
            )
            with _engine_for(fresh, reusable=lora is None) as (engine, started):
                stats = engine.run(job)
            stats["engine_start_seconds"] = engine.engine_start_seconds if started else 0.0
            stats["engine_reused"] = not started
        rows = pl.read_parquet(tmpd / "samples.parquet")
    return rows, stats
