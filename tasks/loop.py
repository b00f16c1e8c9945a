"""The stages of the RLRF4Rec loop as Prefect tasks over files.

Each task reads its inputs from paths, writes its artefacts atomically under the run folder
and returns a small dict (paths, counts, timings), never a large object. All tasks persist
their result and cache on their inputs and their own source (``INPUTS + TASK_SOURCE``), so a
finished stage is never recomputed and a killed run resumes at the first unfinished stage.
Every task takes ``run_uid`` (a random id written once into the run folder) so that deleting a
run folder also invalidates the cached results that point into it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.io import write_json, write_parquet

log = logging.getLogger(__name__)

CACHED = {"persist_result": True, "cache_policy": INPUTS + TASK_SOURCE}


def _timed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


# --------------------------------------------------------------------------- prompts


@task(name="build-prompts", **CACHED)
def prompts_task(run: str, dataset: str, out_path: str, run_uid: str = "") -> dict:
    """One KAR preference prompt per user of the prepared data: ``user_id, split, prefix,
    prompt``."""
    from tasks.data import load_prepared
    from tasks.prompts import prompt_table

    t0 = time.perf_counter()
    data = load_prepared(run)
    table = prompt_table(data.users, data.history, data.items, dataset)
    write_parquet(table, Path(out_path))
    return {"path": out_path, "users": table.height, "seconds": _timed(t0)}


@task(name="select-prompts", **CACHED)
def select_prompts_task(
    prompts_path: str, splits: list[str], n_shards: int, out_dir: str, run_uid: str = ""
) -> dict:
    """The prompts of the users in ``splits``, cut into ``n_shards`` parquet shards."""
    from tasks.generate import shard_users

    table = pl.read_parquet(prompts_path).filter(pl.col("split").is_in(splits))
    shards = shard_users(table["user_id"].to_list(), n_shards)
    paths = []
    for k, users in enumerate(shards):
        path = Path(out_dir) / f"prompts_shard{k:02d}.parquet"
        write_parquet(table.filter(pl.col("user_id").is_in(users)), path)
        paths.append(str(path))
    return {"shards": paths, "users": table.height}


# --------------------------------------------------------------------------- sampling


@task(name="sample", **CACHED)
def sample_task(
    prompts_path: str,
    out_path: str,
    model: str,
    sampling: dict,
    backend: str,
    adapter: str | None = None,
    round_idx: int = 0,
    gpu: int | None = None,
    run_uid: str = "",
) -> dict:
    """N samples per prompt of one shard (one engine, one GPU where there are several)."""
    from tasks.generate import SamplingConfig, generate

    t0 = time.perf_counter()
    prompts = pl.read_parquet(prompts_path)
    samples, stats = generate(
        prompts.select("user_id", "prompt"),
        model,
        SamplingConfig(**sampling),
        backend=backend,  # type: ignore[arg-type]
        adapter=adapter,
        round_idx=round_idx,
        gpu=gpu,
    )
    write_parquet(samples, Path(out_path))
    return {"path": out_path, "stats": stats, "seconds": _timed(t0)}


@task(name="merge-samples", **CACHED)
def merge_samples_task(shard_results: list[dict], out_path: str, run_uid: str = "") -> dict:
    """Concatenate the shards' samples and sum their generation statistics."""
    t0 = time.perf_counter()
    frames = [pl.read_parquet(r["path"]) for r in shard_results]
    samples = pl.concat(frames).sort(["user_id", "sample_idx"])
    write_parquet(samples, Path(out_path))
    tokens = sum(r["stats"].get("generated_tokens", 0) for r in shard_results)
    gen_seconds = max((r["stats"].get("seconds", 0.0) for r in shard_results), default=0.0)
    stats = {
        "samples": samples.height,
        "users": samples["user_id"].n_unique(),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / gen_seconds if gen_seconds else 0.0,
        "mean_tokens": float(samples["n_tokens"].mean()) if samples.height else 0.0,
        "mean_chars": float(samples["text"].str.len_chars().mean()) if samples.height else 0.0,
        "degenerate_share": float(samples["degenerate"].mean()) if samples.height else 0.0,
        "backend": shard_results[0]["stats"].get("backend") if shard_results else None,
    }
    return {
        "path": out_path,
        "stats": stats,
        "seconds": _timed(t0) + sum(r["seconds"] for r in shard_results),
    }


# --------------------------------------------------------------------------- encoding


@task(name="encode-knowledge", **CACHED)
def encode_task(
    samples_path: str, prompts_path: str, out_path: str, encoder: str, run_uid: str = ""
) -> dict:
    """Encode each sample's knowledge text (profile and history, ". ", answer).

    Writes ``user_id, sample_idx, vector`` (List[Float32]).
    """
    from tasks.encode import encode_texts
    from tasks.prompts import knowledge_text

    t0 = time.perf_counter()
    samples = pl.read_parquet(samples_path)
    prefix = dict(pl.read_parquet(prompts_path).select("user_id", "prefix").iter_rows())
    texts = [
        knowledge_text(prefix[u], t)
        for u, t in zip(samples["user_id"].to_list(), samples["text"].to_list(), strict=True)
    ]
    vectors = encode_texts(texts, encoder)
    out = samples.select("user_id", "sample_idx").with_columns(
        pl.Series("vector", vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))
    )
    write_parquet(out, Path(out_path))
    return {"path": out_path, "texts": len(texts), "seconds": _timed(t0)}


@task(name="encode-items", **CACHED)
def encode_items_task(run: str, out_path: str, encoder: str, run_uid: str = "") -> dict:
    """Encode every item's text (title and genres): ``item_id, vector``."""
    from tasks.data import load_prepared
    from tasks.encode import encode_texts, item_texts

    t0 = time.perf_counter()
    items = load_prepared(run).items
    vectors = encode_texts(item_texts(items), encoder)
    out = items.select("item_id").with_columns(
        pl.Series("vector", vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))
    )
    write_parquet(out, Path(out_path))
    return {"path": out_path, "items": out.height, "seconds": _timed(t0)}


def user_vectors(vectors_path: str | None) -> pl.DataFrame | None:
    """One vector per user (sample 0) from an encoded-samples parquet; None stays None."""
    if vectors_path is None:
        return None
    frame = pl.read_parquet(vectors_path)
    return (
        frame.sort(["user_id", "sample_idx"])
        .unique("user_id", keep="first")
        .select("user_id", "vector")
    )


def _read_optional(path: str | None) -> pl.DataFrame | None:
    return pl.read_parquet(path) if path else None


# --------------------------------------------------------------------------- rerankers


@task(name="train-reranker", **CACHED)
def train_reranker_task(
    run: str,
    out_dir: str,
    train_cfg: dict,
    vectors_path: str | None,
    item_vectors_path: str | None,
    run_uid: str = "",
) -> dict:
    """Train a DLCM/PRM reranker (with knowledge when ``vectors_path`` is given)."""
    from tasks.reranker import TrainConfig, train_reranker

    t0 = time.perf_counter()
    info = train_reranker(
        Path(run),
        Path(out_dir),
        TrainConfig(**train_cfg),
        user_vectors=user_vectors(vectors_path),
        item_vectors=_read_optional(item_vectors_path) if vectors_path else None,
    )
    return {"model_dir": out_dir, "train": _jsonable(info), "seconds": _timed(t0)}


@task(name="train-reward-model", **CACHED)
def train_reward_task(
    run: str,
    out_dir: str,
    train_cfg: dict,
    vectors_path: str,
    item_vectors_path: str | None,
    n_folds: int = 2,
    run_uid: str = "",
) -> dict:
    """Train the cross-fitted reward reranker on round-0 knowledge (see :mod:`tasks.reward`)."""
    from tasks.reranker import TrainConfig
    from tasks.reward import train_reward_model

    t0 = time.perf_counter()
    meta = train_reward_model(
        Path(run),
        Path(out_dir),
        TrainConfig(**train_cfg),
        user_vectors(vectors_path),
        _read_optional(item_vectors_path),
        n_folds=n_folds,
    )
    valid = [f["summary"].get("valid", {}) for f in meta["folds"]]
    stats = {
        "folds": meta["n_folds"],
        "valid_map@5": float(np.mean([v.get("map@5", np.nan) for v in valid])),
        "valid_ndcg@5": float(np.mean([v.get("ndcg@5", np.nan) for v in valid])),
        "best_epoch_mean": float(
            np.mean([f["summary"].get("best_epoch", 0) for f in meta["folds"]])
        ),
    }
    return {"model_dir": out_dir, "train": stats, "seconds": _timed(t0)}


@task(name="evaluate-reranker", **CACHED)
def evaluate_task(
    model_dir: str,
    run: str,
    vectors_path: str | None,
    item_vectors_path: str | None,
    out_dir: str,
    run_uid: str = "",
) -> dict:
    """Evaluate a trained reranker on the test users: metrics JSON + per-list parquet."""
    from tasks.reranker import evaluate_reranker

    t0 = time.perf_counter()
    result = evaluate_reranker(
        Path(model_dir),
        Path(run),
        user_vectors=user_vectors(vectors_path),
        item_vectors=_read_optional(item_vectors_path) if vectors_path else None,
        split="test",
    )
    out = Path(out_dir)
    write_json(result.metrics, out / "metrics.json")
    write_parquet(result.per_list, out / "per_list.parquet")
    return {
        "metrics": {k: float(v) for k, v in result.metrics.items() if _is_number(v)},
        "per_list": str(out / "per_list.parquet"),
        "seconds": _timed(t0),
    }


# --------------------------------------------------------------------------- reward and pairs


@task(name="score-samples", **CACHED)
def score_task(
    reward_model_dir: str,
    run: str,
    vectors_path: str,
    samples_path: str,
    item_vectors_path: str | None,
    out_path: str,
    run_uid: str = "",
) -> dict:
    """Reward of every (user, sample): MAP@5 and NDCG@5 on the user's reward lists."""
    from tasks.reward import score_samples

    t0 = time.perf_counter()
    vectors = pl.read_parquet(vectors_path).with_columns(pl.col("sample_idx").cast(pl.Int64))
    scores = score_samples(
        Path(reward_model_dir), Path(run), vectors, item_vectors=_read_optional(item_vectors_path)
    )
    samples = pl.read_parquet(samples_path).with_columns(pl.col("sample_idx").cast(pl.Int64))
    scores = scores.with_columns(pl.col("sample_idx").cast(pl.Int64)).drop_nulls("ndcg_at_5")
    scored = samples.join(scores, on=["user_id", "sample_idx"], how="inner")
    write_parquet(scored, Path(out_path))
    stats = {}
    for col in ("map_at_5", "ndcg_at_5"):
        stats[f"{col}_mean"] = float(scored[col].mean())
        stats[f"{col}_min"] = float(scored[col].min())
        stats[f"{col}_max"] = float(scored[col].max())
        spread = scored.group_by("user_id").agg(pl.col(col).max() - pl.col(col).min())
        stats[f"{col}_user_spread"] = float(spread[col].mean())
    return {"path": out_path, "stats": stats, "seconds": _timed(t0)}


@task(name="pair", **CACHED)
def pair_task(
    scored_path: str,
    prompts_path: str,
    out_path: str,
    strategy: str,
    min_margin: float,
    reward_col: str,
    run_uid: str = "",
) -> dict:
    """Chosen/rejected pairs from the scored samples."""
    from tasks.pairing import build_pairs

    t0 = time.perf_counter()
    pairs, stats = build_pairs(
        pl.read_parquet(scored_path),
        pl.read_parquet(prompts_path),
        strategy,  # type: ignore[arg-type]
        min_margin,
        reward_col,
    )
    write_parquet(pairs, Path(out_path))
    return {"path": out_path, "stats": stats.as_dict(), "seconds": _timed(t0)}


# --------------------------------------------------------------------------- DPO


@task(name="dpo", **CACHED)
def dpo_task(
    model: str,
    pairs_path: str,
    out_dir: str,
    dpo_cfg: dict,
    init_adapter: str | None = None,
    run_uid: str = "",
) -> dict:
    """LoRA-DPO on the round's pairs; returns the adapter (and merged checkpoint) paths.

    A round whose pairs were all dropped trains nothing: the previous policy is kept and the
    result says ``skipped``.
    """
    from tasks.dpo import DPOConfig, train_dpo

    t0 = time.perf_counter()
    pairs = pl.read_parquet(pairs_path)
    if pairs.height == 0:
        log.warning("%s: no preference pairs (all dropped); the policy is unchanged", pairs_path)
        return {
            "adapter_dir": init_adapter,
            "merged_dir": None,
            "metrics": {},
            "skipped": True,
            "seconds": _timed(t0),
        }
    result = train_dpo(model, pairs, Path(out_dir), DPOConfig(**dpo_cfg), init_adapter=init_adapter)
    result = _jsonable(result)
    result["skipped"] = False
    result["seconds"] = _timed(t0)
    write_json(result, Path(out_dir) / "result.json")
    return result


# --------------------------------------------------------------------------- helpers


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _jsonable(obj: object) -> object:
    """Round-trip through JSON so that only plain types reach Prefect's result store."""
    return json.loads(json.dumps(obj, default=str))
