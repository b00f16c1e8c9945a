"""The stages of the RLRF4Rec loop, each a :func:`tasks.common.stage.stage` over files.

Every stage reads upstream :class:`Artefact` values, writes its ``out`` atomically under the run
folder and returns an :class:`Artefact` (path, fingerprint, seconds, stats). The stage mechanism
serves it again only when its parameters, its upstream artefacts and its code are unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from tasks.common.io import write_json, write_parquet
from tasks.common.stage import Artefact, InputRef, partial_dir, stage
from tasks.llm.policy import Policy

if TYPE_CHECKING:
    from tasks.data.datasets import AmazonConfig
    from tasks.data.lists import ListsConfig
    from tasks.llm.generate import SamplingConfig
    from tasks.pairing import PairingConfig
    from tasks.rlrf4rec.reranker import TrainConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- values


CHUNK_USERS = 128
"""Users per generation job of a sampling shard. Each finished job is kept in the stage's
:func:`tasks.common.stage.partial_dir`, so a stopped or killed sampling stage resumes at its
first unfinished job (a 1.5B policy's knowledge pass on a 2-core CPU is hours long). Job ``j``
samples with seed ``seed + j``; a shard of at most 128 users is one job with the stage's seed."""
ADDITIVE_STATS = (
    "seconds",
    "load_seconds",
    "generate_seconds",
    "generated_tokens",
    "prompt_tokens",
    "n_prompts",
    "n_degenerate",
)


@dataclass(frozen=True)
class Shard:
    """One of ``count`` sampling shards (one engine each), on ``gpu`` when there are GPUs."""

    index: int = 0
    count: int = 1
    gpu: int | None = None


def run_folder(data: Artefact) -> Path:
    """The run folder of a prepared ``data/`` artefact."""
    return Path(data.path).parent


# --------------------------------------------------------------------------- data and prompts


@stage("prepare-data")
def prepare_data(
    dataset: str,
    *,
    data_dir: InputRef | None,
    lists: ListsConfig,
    max_users: int | None,
    amazon: AmazonConfig | None = None,
    out: Path,
) -> Artefact:
    """The data set as KAR reranking lists under ``out`` (``<run>/data``); ``amazon`` chooses
    how Amazon-Books is built (default: its k-core)."""
    from tasks.data.prepare import prepare

    counts = prepare(
        dataset,
        Path(out).parent,
        data_dir.path if data_dir else None,
        lists,
        max_users=max_users,
        amazon=amazon,
    )
    return Artefact(str(out), stats=counts)


@stage("build-prompts")
def build_prompts(
    data: Artefact,
    dataset: str,
    *,
    max_prompt_tokens: int | None = None,
    tokenizer: InputRef | None = None,
    style: str = "default",
    out: Path,
) -> Artefact:
    """One KAR preference prompt per user: ``user_id, split, prefix, prompt``, in ``style``
    (:mod:`tasks.rlrf4rec.prompts`: ``"default"`` or KAR's texts, ``"kar"``).

    With ``max_prompt_tokens`` the policy's ``prompt`` keeps the most recent history entries
    that fit in that many tokens (counted with ``tokenizer``, the policy's, in its chat
    template); ``prefix``, the head of every knowledge text, keeps the whole history.
    Amazon-Books prepared the ``kar`` way takes KAR's book prompts
    (:mod:`tasks.rlrf4rec.book_prompts`).
    """
    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec.book_prompts import kar_book_prompt_table
    from tasks.rlrf4rec.prompts import prompt_table

    prepared = load_prepared(run_folder(data))
    kar_books = (prepared.meta.get("amazon") or {}).get("build") == "kar"
    # same arguments and columns; the style is MovieLens' (KAR's book prompts have one text)
    make_table = (
        kar_book_prompt_table if kar_books else functools.partial(prompt_table, style=style)
    )
    frames = (prepared.users, prepared.history, prepared.items, dataset)
    table = make_table(*frames)
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("build_prompts: max_prompt_tokens needs the policy's tokenizer")
        capped = make_table(*frames, max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer.path)
        table = table.with_columns(capped["prompt"])  # both in user-id order
    write_parquet(table, Path(out))
    return Artefact(
        str(out),
        stats={
            "users": table.height,
            "mean_prompt_chars": float(table["prompt"].str.len_chars().mean()),
        },
    )


# --------------------------------------------------------------------------- sampling


@stage("sample")
def sample(
    prompts: Artefact,
    policy: Policy,
    *,
    splits: tuple[str, ...],
    sampling: SamplingConfig,
    backend: str,
    shard: Shard,
    round_idx: int,
    train_users: tuple[int, ...] | None = None,
    out: Path,
) -> Artefact:
    """``sampling.n`` texts per user of ``splits`` in this shard (of the train users, only
    ``train_users`` when given)."""
    from tasks.llm.generate import SAMPLES_SCHEMA, generate, shard_users

    table = pl.read_parquet(prompts.path).filter(pl.col("split").is_in(list(splits)))
    if train_users is not None:
        table = table.filter(
            (pl.col("split") != "train") | pl.col("user_id").is_in(list(train_users))
        )
    shards = shard_users(table["user_id"].to_list(), shard.count)
    if shard.index >= len(shards):  # fewer users than shards (a small split): nothing to do
        write_parquet(pl.DataFrame(schema=SAMPLES_SCHEMA), Path(out))
        return Artefact(str(out), stats={"generated_tokens": 0, "seconds": 0.0})
    users = shards[shard.index]
    model, adapter = policy.serving()
    parts = partial_dir()
    frames, chunk_stats = [], []
    kept = len(list(parts.glob("users*.parquet")))  # finished by a run that was stopped
    for i in range(0, len(users), CHUNK_USERS):
        path = parts / f"users{i:06d}.parquet"
        if not path.exists():
            samples, stats = generate(
                table.filter(pl.col("user_id").is_in(users[i : i + CHUNK_USERS])).select(
                    "user_id", "prompt"
                ),
                model,
                replace(sampling, seed=sampling.seed + i // CHUNK_USERS),
                backend=backend,  # type: ignore[arg-type]
                adapter=adapter,
                round_idx=round_idx,
                gpu=shard.gpu,
            )
            write_json(_plain(stats), path.with_suffix(".json"))
            write_parquet(samples, path)
        frames.append(pl.read_parquet(path))
        chunk_stats.append(json.loads(path.with_suffix(".json").read_text()))
    write_parquet(pl.concat(frames), Path(out))
    return Artefact(str(out), stats={**summed_generation_stats(chunk_stats), "jobs_kept": kept})


def summed_generation_stats(chunks: list[dict]) -> dict:
    """The generation statistics of consecutive jobs as one job's: counts and seconds summed,
    ``tokens_per_s`` recomputed, the rest (``backend``, ``served``, ...) from the first."""
    out = dict(chunks[0])
    for key in ADDITIVE_STATS:
        if key in out:
            out[key] = sum(c.get(key, 0) for c in chunks)
    if out.get("generate_seconds"):
        out["tokens_per_s"] = out.get("generated_tokens", 0) / out["generate_seconds"]
    return out


@stage("merge-samples")
def merge_samples(shards: list[Artefact], out: Path) -> Artefact:
    """The shards' samples in one table, with the generation statistics summed."""
    samples = pl.concat([pl.read_parquet(s.path) for s in shards]).sort(["user_id", "sample_idx"])
    write_parquet(samples, Path(out))
    tokens = sum(s.stats.get("generated_tokens", 0) for s in shards)
    gen_seconds = max((s.stats.get("seconds", 0.0) for s in shards), default=0.0)
    n = samples.height
    stats = {
        "samples": n,
        "users": samples["user_id"].n_unique(),
        "generated_tokens": tokens,
        "tokens_per_s": tokens / gen_seconds if gen_seconds else 0.0,
        "mean_tokens": float(samples["n_tokens"].mean()) if n else 0.0,
        "mean_chars": float(samples["text"].str.len_chars().mean()) if n else 0.0,
        "degenerate_share": float(samples["degenerate"].mean()) if n else 0.0,
        "backend": next((s.stats["backend"] for s in shards if "backend" in s.stats), None),
        "sample_seconds": sum(s.seconds for s in shards),  # a resumed stage's: its run's only
        # every job's loading and generating, jobs kept from a stopped run included
        "generation_seconds": sum(s.stats.get("seconds", 0.0) for s in shards),
        "jobs_kept": sum(s.stats.get("jobs_kept", 0) for s in shards),
    }
    return Artefact(str(out), stats=stats)


# --------------------------------------------------------------------------- encoding


@stage("encode-knowledge")
def encode_knowledge(
    samples: Artefact,
    prompts: Artefact,
    *,
    encoder: InputRef,
    encoding: str = "kar",
    out: Path,
) -> Artefact:
    """Each sample's knowledge text as a vector: ``user_id, sample_idx, vector``
    (List[Float32]); ``encoding`` as in :func:`tasks.rlrf4rec.encode.encode_knowledge` (``kar``:
    profile and history, ". ", answer, as one text)."""
    from tasks.rlrf4rec.encode import encode_knowledge as encode

    frame = pl.read_parquet(samples.path)
    prefix = dict(pl.read_parquet(prompts.path).select("user_id", "prefix").iter_rows())
    prefixes = [prefix[u] for u in frame["user_id"].to_list()]
    vectors = encode(prefixes, frame["text"].to_list(), encoder.path, encoding)
    write_parquet(frame.select("user_id", "sample_idx").with_columns(_vector_column(vectors)), out)
    return Artefact(str(out), stats={"texts": frame.height, "encoding": encoding})


@stage("encode-profiles")
def encode_profiles(prompts: Artefact, *, encoder: InputRef, out: Path) -> Artefact:
    """Every user's profile-and-history text (what the policy reads, without an answer) as a
    knowledge vector, ``user_id, sample_idx (0), vector``: Table I's reference row, the
    knowledge an LLM's text has to beat."""
    from tasks.rlrf4rec.encode import encode_texts

    frame = pl.read_parquet(prompts.path).select("user_id", "prefix").sort("user_id")
    vectors = encode_texts(frame["prefix"].to_list(), encoder.path)
    ids = frame.select("user_id", pl.lit(0, dtype=pl.Int64).alias("sample_idx"))
    write_parquet(ids.with_columns(_vector_column(vectors)), out)
    return Artefact(str(out), stats={"texts": frame.height})


@stage("item-knowledge")
def item_knowledge(
    data: Artefact,
    policy: Policy,
    *,
    dataset: str,
    style: str,
    sampling: SamplingConfig,
    backend: str,
    out: Path,
) -> Artefact:
    """The policy's answer to KAR's item prompt for every listed item (:mod:`tasks.rlrf4rec.
    item_knowledge`): ``item_id, prompt, text, n_tokens, finish_reason, degenerate``."""
    from tasks.data.prepare import load_prepared
    from tasks.llm.generate import generate
    from tasks.rlrf4rec.item_knowledge import item_prompts

    prompts = item_prompts(load_prepared(run_folder(data)), dataset, style)  # type: ignore[arg-type]
    model, adapter = policy.serving()
    samples, gen = generate(
        prompts,
        model,
        sampling,
        backend=backend,  # type: ignore[arg-type]
        adapter=adapter,
        key="item_id",
    )
    answers = samples.select("item_id", "text", "n_tokens", "finish_reason", "degenerate")
    frame = prompts.join(answers, on="item_id", how="left").sort("item_id")
    write_parquet(frame, Path(out))
    stats = {
        "source": "llm",
        "items": frame.height,
        "mean_tokens": float(frame["n_tokens"].mean()),
        "degenerate_share": float(frame["degenerate"].mean()),
        **{k: gen[k] for k in ("backend", "generated_tokens", "prompt_tokens", "tokens_per_s")},
        "load_seconds": gen["load_seconds"],
        "generate_seconds": gen["generate_seconds"],
    }
    return Artefact(str(out), stats=stats)


@stage("read-item-knowledge")
def read_item_knowledge(source: InputRef, *, out: Path) -> Artefact:
    """A user's item-knowledge file (parquet or JSON, :func:`tasks.rlrf4rec.item_knowledge.
    read_item_knowledge`) as ``item_id, text``."""
    from tasks.rlrf4rec.item_knowledge import read_item_knowledge as read

    frame = read(source.path)
    write_parquet(frame, Path(out))
    return Artefact(str(out), stats={"source": source.path, "items": frame.height})


@stage("encode-items")
def encode_items(
    data: Artefact, knowledge: Artefact | None = None, *, encoder: InputRef, out: Path
) -> Artefact:
    """Every item's vector: ``item_id, vector``; from its ``knowledge`` text (answer only, as
    KAR encodes it) where it has one, else from its title and genres."""
    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec.encode import encode_texts
    from tasks.rlrf4rec.item_knowledge import item_knowledge_texts

    items = load_prepared(run_folder(data)).items
    source = str(knowledge.stats.get("source", "file")) if knowledge else "title"
    texts, counts = item_knowledge_texts(
        items, pl.read_parquet(knowledge.path) if knowledge else None, source=source
    )
    vectors = encode_texts(texts, encoder.path)
    write_parquet(items.select("item_id").with_columns(_vector_column(vectors)), Path(out))
    return Artefact(str(out), stats={"source": source, **counts})


def _vector_column(vectors: np.ndarray) -> pl.Series:
    return pl.Series("vector", vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))


def user_vectors(vectors: Artefact | None) -> pl.DataFrame | None:
    """One vector per user (sample 0) from an encoded-samples artefact; None stays None."""
    if vectors is None:
        return None
    frame = pl.read_parquet(vectors.path)
    return (
        frame.sort(["user_id", "sample_idx"])
        .unique("user_id", keep="first")
        .select("user_id", "vector")
    )


# --------------------------------------------------------------------------- rerankers


@stage("train-reranker")
def train_reranker(
    data: Artefact,
    vectors: Artefact | None,
    items: Artefact | None,
    *,
    cfg: TrainConfig,
    out: Path,
) -> Artefact:
    """A DLCM/PRM reranker, with knowledge when ``vectors`` is given."""
    from tasks.rlrf4rec.reranker import train_reranker as train

    info = train(
        run_folder(data),
        Path(out),
        cfg,
        user_vectors=user_vectors(vectors),
        item_vectors=pl.read_parquet(items.path) if vectors is not None and items else None,
    )
    return Artefact(str(out), stats=_plain(info))


@stage("evaluate-reranker")
def evaluate_reranker(
    model: Artefact,
    data: Artefact,
    vectors: Artefact | None,
    items: Artefact | None,
    *,
    out: Path,
) -> Artefact:
    """Test-user metrics of a trained reranker: ``out`` = ``metrics.json`` and, beside it,
    ``per_list.parquet``."""
    from tasks.rlrf4rec.reranker import evaluate_reranker as evaluate

    result = evaluate(
        Path(model.path),
        run_folder(data),
        user_vectors=user_vectors(vectors),
        item_vectors=pl.read_parquet(items.path) if vectors is not None and items else None,
        split="test",
    )
    per_list = Path(out).with_name("per_list.parquet")
    write_json(result.metrics, Path(out))
    write_parquet(result.per_list, per_list)
    metrics = {k: float(v) for k, v in result.metrics.items() if _is_number(v)}
    return Artefact(str(out), stats=metrics, extra=(str(per_list),))


@stage("train-reward-model")
def train_reward_model(
    data: Artefact,
    vectors: Artefact,
    items: Artefact | None,
    *,
    cfg: TrainConfig,
    n_folds: int,
    out: Path,
) -> Artefact:
    """The cross-fitted reward reranker on round-0 knowledge (see :mod:`tasks.rlrf4rec.reward`)."""
    from tasks.rlrf4rec.reward import train_reward_model as train

    meta = train(
        run_folder(data),
        Path(out),
        cfg,
        user_vectors(vectors),
        pl.read_parquet(items.path) if items else None,
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
    return Artefact(str(out), stats=stats)


# --------------------------------------------------------------------------- reward and pairs


@stage("score-samples")
def score(
    reward_model: Artefact,
    data: Artefact,
    *,
    vectors: Artefact,
    samples: Artefact,
    items: Artefact | None,
    prompts: Artefact,
    out: Path,
) -> Artefact:
    """Reward of every (user, sample) on the user's lists (:func:`tasks.rlrf4rec.reward.
    score_samples`), with the user's ``split``. Stats: per reward column its mean, min, max and
    mean within-user spread over the train users, the same means prefixed ``valid.`` for the
    validation users, and ``tied_users`` (train users whose samples all got one NDCG@5).
    ``genre_share`` is the diagnostic text reward (:mod:`tasks.rlrf4rec.genre_reward`; null for
    a user whose lists hold no positive)."""
    from tasks.rlrf4rec.reward import REWARD_COLUMNS, score_samples

    vec = pl.read_parquet(vectors.path).with_columns(pl.col("sample_idx").cast(pl.Int64))
    scores = score_samples(
        Path(reward_model.path),
        run_folder(data),
        vec,
        item_vectors=pl.read_parquet(items.path) if items else None,
    )
    texts = pl.read_parquet(samples.path).with_columns(pl.col("sample_idx").cast(pl.Int64))
    scores = scores.with_columns(pl.col("sample_idx").cast(pl.Int64)).drop_nulls("ndcg_at_5")
    split = pl.read_parquet(prompts.path).select("user_id", "split")
    scored = (
        texts.join(scores, on=["user_id", "sample_idx"], how="inner")
        .join(split, on="user_id", how="left")
        .sort(["user_id", "sample_idx"])
    )  # a join's row order is not fixed: sorted, the same inputs give the same bytes
    scored = scored.with_columns(_genre_shares(data, scored))
    write_parquet(scored, Path(out))
    stats: dict[str, float] = {}
    for name, part in (
        ("", scored.filter(pl.col("split") == "train")),
        ("valid.", scored.filter(pl.col("split") == "valid")),
    ):
        if not part.height:
            continue
        for col in REWARD_COLUMNS.values():
            stats[f"{name}{col}_mean"] = float(part[col].mean())
            if name:
                continue
            stats[f"{col}_min"] = float(part[col].min())
            stats[f"{col}_max"] = float(part[col].max())
            spread = part.group_by("user_id").agg(pl.col(col).max() - pl.col(col).min())
            stats[f"{col}_user_spread"] = float(spread[col].mean())
            if col == "ndcg_at_5":
                stats["tied_users"] = int((spread[col] <= 0).sum())
                stats["users"] = spread.height
    return Artefact(str(out), stats=stats)


@stage("pair")
def pair(
    scored: Artefact,
    prompts: Artefact,
    *,
    cfg: PairingConfig,
    splits: tuple[str, ...] = ("train",),
    out: Path,
) -> Artefact:
    """Chosen/rejected pairs from the scored samples of the users of ``splits``."""
    from tasks.pairing import build_pairs

    frame = pl.read_parquet(scored.path).drop_nulls(cfg.reward_col)
    if "split" in frame.columns:
        frame = frame.filter(pl.col("split").is_in(list(splits)))
    pairs, stats = build_pairs(frame, pl.read_parquet(prompts.path), cfg)
    write_parquet(pairs, Path(out))
    return Artefact(str(out), stats=stats.as_dict())


@stage("diagnostic-texts")
def diagnostic_texts(
    own: Artefact, previous: Artefact, prompts: Artefact, *, users: int, reward_col: str, out: Path
) -> Artefact:
    """The texts a policy's log-ratios are measured on, for the first ``users`` validation
    users: ``kind`` = ``own`` (the policy's first sample of each user, ``own`` scored samples)
    and ``chosen`` / ``rejected`` (the best/worst pair of the previous policy's samples,
    ``previous``, as DPO would have built it); with ``user_id``, ``prompt``, ``text``."""
    from tasks.rlrf4rec.learning import heldout_pairs

    table = pl.read_parquet(prompts.path)
    valid = table.filter(pl.col("split") == "valid")["user_id"].sort().head(users)
    policy_prompt = table.select("user_id", "prompt")

    def valid_rows(artefact: Artefact) -> pl.DataFrame:
        return pl.read_parquet(artefact.path).filter(pl.col("user_id").is_in(valid.implode()))

    mine = (
        valid_rows(own)
        .sort("user_id", "sample_idx")
        .unique("user_id", keep="first", maintain_order=True)
        .join(policy_prompt, on="user_id")
        .select(pl.lit("own").alias("kind"), "user_id", "prompt", "text")
    )
    pairs = heldout_pairs(valid_rows(previous), policy_prompt, reward_col)
    frames = [mine]
    for kind in ("chosen", "rejected"):
        frames.append(
            pairs.select(
                pl.lit(kind).alias("kind"), "user_id", "prompt", pl.col(kind).alias("text")
            )
        )
    texts = pl.concat(frames)
    write_parquet(texts, Path(out))
    return Artefact(str(out), stats={"own": mine.height, "pairs": pairs.height})


def _genre_shares(data: Artefact, scored: pl.DataFrame) -> pl.Series:
    """The diagnostic genre reward of each scored sample (null: no top genre)."""
    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec.genre_reward import genre_share, top_genres

    prepared = load_prepared(run_folder(data))
    top = top_genres(prepared.lists, prepared.items)
    shares = genre_share(scored["user_id"].to_list(), scored["text"].to_list(), top)
    return pl.Series("genre_share", shares, dtype=pl.Float64, nan_to_null=True)


@stage("reward-diagnostics")
def reward_diagnostics(
    reward_model: Artefact,
    data: Artefact,
    *,
    round0: Artefact,
    vectors: Artefact,
    scored: Artefact,
    items: Artefact | None,
    cfg: TrainConfig,
    n_folds: int,
    reward_col: str,
    seed: int,
    out: Path,
) -> Artefact:
    """Does the reward read the text? (:mod:`tasks.rlrf4rec.reward_diagnostics`) on one
    round's samples (``vectors``, ``scored``): text sensitivity, spread, reliability against
    a reward model trained with seed ``cfg.seed + 1`` (``out/second_model``), and the reward
    model's knowledge ablation on the validation users' round-0 vectors (``round0``).
    Writes ``out/diagnostics.json``; its figures are the stats."""
    from tasks.rlrf4rec.reward_diagnostics import diagnose

    figures = diagnose(
        Path(reward_model.path),
        run_folder(data),
        round0=user_vectors(round0),
        vectors=pl.read_parquet(vectors.path).with_columns(pl.col("sample_idx").cast(pl.Int64)),
        scored=pl.read_parquet(scored.path),
        items=pl.read_parquet(items.path) if items else None,
        cfg=cfg,
        n_folds=n_folds,
        reward_col=reward_col,
        seed=seed,
        second_model=Path(out) / "second_model",
    )
    write_json(figures, Path(out) / "diagnostics.json")
    return Artefact(str(out), stats=_plain(figures))


# --------------------------------------------------------------------------- helpers


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _plain(obj: object) -> dict:
    """A JSON-safe copy of a stats dict (what the manifest stores)."""
    import json

    return json.loads(json.dumps(obj, default=str))
