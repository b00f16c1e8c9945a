"""The RLRF4Rec reward: how well a user's lists are reranked with one sampled knowledge text.

For each (user, sample) the frozen knowledge-augmented reranker scores the user's reward lists
with the user's knowledge vector replaced by the sample's; the reward is the mean MAP@5 and
NDCG@5 over those lists. :func:`score_samples` does this for every sample in one batched pass
per reward model: the (sample, list) pairs are built with a join, run through the model in
chunks of ``batch_size`` lists, and averaged with a group-by (no Python loop over samples).
:func:`score_samples_naive` is the one-sample-at-a-time reference (tests and benchmark).

Which lists score a train user's samples: cross-fitting over user folds
--------------------------------------------------------------------------
:func:`train_reward_model` splits the non-test users into ``n_folds`` folds
(:func:`tasks.rlrf4rec.reranker.user_folds`, seeded) and trains one reranker per fold ``k`` on the
train users *outside* fold ``k`` (``TrainConfig.exclude_fold = k``). A user of fold ``k`` is scored
by model ``k`` on *all* of their lists (:func:`reward_lists`): lists that model never trained on, of
a user it never saw. Why this rather than holding out each train user's last chunks:

- it is the condition the reward should predict: the final Table I rerankers are evaluated on
  test users they never trained on, so the reward asks "does this text help a reranker on a
  user it has not seen?";
- no memorised user: a reranker trained on a user's round-0 vector can key on that vector's
  position (a user id in disguise); with a held-out slice, samples close to the round-0 text
  would score high for that reason, not for their content;
- less noise: a user's reward averages all their lists (about 20 on ML-100K) rather than a
  slice of one to a few, and no training list is lost (every train list trains K-1 models);
- cost: K models on (K-1)/K of the data each: with K = 2, the cost of one full training.

Rewards of users in different folds come from different models; this is harmless because the pairing
compares samples of the same user only. Validation users belong to folds too (they are never trained
on; every fold model uses them for checkpoint selection). Test users are left out by default (their
lists are the final evaluation); ``splits=("train", "valid", "test")`` scores them with model 0. A
plain model folder from :func:`tasks.rlrf4rec.reranker.train_reranker` is accepted too: every user
is then scored by that one model on all their lists (in-sample for its train users; a warning says
so).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from models.metrics import map_at_k_per_list, ndcg_at_k_per_list, soft_auc_per_list
from models.rerankers import Reranker
from tasks.common.io import write_json
from tasks.data.prepare import PreparedData, load_prepared
from tasks.rlrf4rec.encode import frame_vectors
from tasks.rlrf4rec.reranker import (
    TrainConfig,
    list_arrays,
    load_model_with_items,
    train_reranker,
    user_folds,
)

log = logging.getLogger(__name__)

REWARD_FILE = "reward.json"
TIE_BREAK_WEIGHT = 0.01
# The per-sample rewards pairing can read: the paper's NDCG@5 (and MAP@5), soft-AUC (continuous,
# see models.metrics), and NDCG@5 + TIE_BREAK_WEIGHT x soft-AUC: NDCG@5 decides unless two
# samples are within about TIE_BREAK_WEIGHT / 2 of each other, soft-AUC breaks its ties.
# ``genres`` is not a reranker's reward but the diagnostic text reward of
# :mod:`tasks.rlrf4rec.genre_reward`, which the score stage adds beside them.
REWARD_COLUMNS = {
    "ndcg@5": "ndcg_at_5",
    "map@5": "map_at_5",
    "soft_auc": "soft_auc",
    "ndcg@5+auc": "ndcg_at_5_auc",
    "genres": "genre_share",
}
RANKER_REWARDS = ("ndcg_at_5", "map_at_5", "soft_auc", "ndcg_at_5_auc")
REWARD_SPLITS = ("train", "valid")
REWARD_K = 5
OUT_SCHEMA = {
    "user_id": pl.Int64,
    "sample_idx": pl.Int64,
    "map_at_5": pl.Float64,
    "ndcg_at_5": pl.Float64,
    "soft_auc": pl.Float64,
    "ndcg_at_5_auc": pl.Float64,
    "n_lists": pl.Int64,
}


# --------------------------------------------------------------------------- lists and models


def reward_lists(
    data: PreparedData,
    n_folds: int = 2,
    fold_seed: int = 0,
    splits: Sequence[str] = REWARD_SPLITS,
) -> pl.DataFrame:
    """The lists that score each user's samples, with the fold whose model scores them.

    Args:
        data: the prepared run.
        n_folds, fold_seed: the fold assignment (must match the reward model's).
        splits: users of these splits get reward lists (test users get fold 0).

    Returns:
        ``list_id``, ``user_id``, ``split``, ``fold``, ``item_ids``, ``labels``: all lists of
        the users of ``splits``, in ``list_id`` order.
    """
    bad = sorted(set(splits) - {"train", "valid", "test"})
    if bad:
        raise ValueError(f"splits must be among train/valid/test, got {bad}")
    folds = user_folds(data.users, n_folds, fold_seed).select("user_id", "fold")
    return (
        data.lists.filter(pl.col("split").is_in(list(splits)))
        .join(folds, on="user_id", how="left")
        .with_columns(pl.col("fold").fill_null(0))
        .select("list_id", "user_id", "split", "fold", "item_ids", "labels")
        .sort("list_id")
    )


def train_reward_model(
    data_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    user_vectors: pl.DataFrame,
    item_vectors: pl.DataFrame | None = None,
    n_folds: int = 2,
    show_progress: bool = False,
) -> dict:
    """Train the cross-fitted reward model: ``out_dir/fold_<k>`` for k < ``n_folds``.

    Each fold model is :func:`tasks.rlrf4rec.reranker.train_reranker` with ``exclude_fold=k``;
    ``reward.json`` (written last, atomically) lists the folds and their training summaries.

    Args:
        data_dir: run folder holding ``data/``.
        out_dir: reward model folder.
        cfg: training settings (``n_folds`` and ``exclude_fold`` are set here).
        user_vectors: round-0 knowledge vectors of the train and valid users.
        item_vectors: optional item knowledge vectors.
        n_folds: number of user folds (>= 2).
        show_progress: progress bars while training.

    Returns:
        The content of ``reward.json``.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2 for cross-fitting, got {n_folds}")
    if user_vectors is None:
        raise ValueError("user_vectors is required: the reward model reads knowledge")
    out_dir = Path(out_dir)
    (out_dir / REWARD_FILE).unlink(missing_ok=True)
    folds = []
    for k in range(n_folds):
        fold_cfg = replace(cfg, n_folds=n_folds, exclude_fold=k)
        summary = train_reranker(
            data_dir, out_dir / f"fold_{k}", fold_cfg, user_vectors, item_vectors, show_progress
        )
        folds.append({"fold": k, "dir": f"fold_{k}", "summary": summary})
    meta = {
        "n_folds": n_folds,
        "fold_seed": cfg.fold_seed,
        "backbone": cfg.backbone,
        "config": cfg.to_dict(),
        "folds": folds,
    }
    write_json(meta, out_dir / REWARD_FILE)
    return meta


def _load_reward_models(
    model_dir: Path, item_vectors: pl.DataFrame | None
) -> tuple[list[Reranker], int, int]:
    """The fold models (or one plain model), ``n_folds`` and ``fold_seed``."""
    model_dir = Path(model_dir)
    spec = model_dir / REWARD_FILE
    if spec.is_file():
        meta = json.loads(spec.read_text())
        models = [load_model_with_items(model_dir / f["dir"], item_vectors) for f in meta["folds"]]
        return models, int(meta["n_folds"]), int(meta["fold_seed"])
    log.warning(
        "%s is a single reranker, not a cross-fitted reward model: its train users are scored "
        "on lists it trained on (use train_reward_model)",
        model_dir,
    )
    return [load_model_with_items(model_dir, item_vectors)], 1, 0


def _check_samples(samples: pl.DataFrame, dim: int) -> np.ndarray:
    for col in ("user_id", "sample_idx", "vector"):
        if col not in samples.columns:
            raise ValueError(f"samples has no {col!r} column (needs user_id, sample_idx, vector)")
    if samples.select(pl.struct("user_id", "sample_idx").is_duplicated().any()).item():
        raise ValueError("samples has duplicate (user_id, sample_idx) rows")
    vecs = frame_vectors(samples, "vector") if samples.height else np.zeros((0, dim), np.float32)
    if samples.height and vecs.shape[1] != dim:
        raise ValueError(f"samples' vectors have width {vecs.shape[1]}, the model expects {dim}")
    if not np.isfinite(vecs).all():
        raise ValueError("samples' vectors hold non-finite values")
    return vecs


def _prepare(model_dir, data_dir, samples, item_vectors, splits):
    models, n_folds, fold_seed = _load_reward_models(Path(model_dir), item_vectors)
    if not models[0].cfg.knowledge:
        raise ValueError(f"{model_dir} is a base model: it reads no knowledge vector to reward")
    vecs = _check_samples(samples, models[0].cfg.user_dim)
    data = load_prepared(data_dir)
    lists = reward_lists(data, max(n_folds, 1), fold_seed, splits)
    if n_folds == 1:
        lists = lists.with_columns(pl.lit(0, dtype=pl.Int64).alias("fold"))
    return models, vecs, lists


def _finish(samples: pl.DataFrame, per_sample: pl.DataFrame) -> pl.DataFrame:
    out = (
        samples.select(pl.col("user_id").cast(pl.Int64), pl.col("sample_idx").cast(pl.Int64))
        .with_row_index("_s")
        .join(per_sample, on="_s", how="left")
        .with_columns(pl.col("n_lists").fill_null(0))
        .sort("_s")
        .drop("_s")
    )
    out = out.with_columns(
        (pl.col("ndcg_at_5") + TIE_BREAK_WEIGHT * pl.col("soft_auc")).alias("ndcg_at_5_auc")
    )
    none = out.filter(pl.col("n_lists") == 0)
    if none.height:
        log.warning(
            "%d samples of %d users have no reward list (test or unknown users): "
            "their reward is null",
            none.height,
            none["user_id"].n_unique(),
        )
    return out.select(list(OUT_SCHEMA)).cast(OUT_SCHEMA)


# --------------------------------------------------------------------------- scoring


def _chunk_end(n: np.ndarray, start: int, stop: int, batch_size: int) -> int:
    """End of a chunk of lists from ``start`` holding about ``batch_size`` (list, sample)
    pairs once padded to the chunk's largest sample count (``n`` ascending)."""
    end = min(stop, start + max(1, batch_size // int(n[start])))
    while end - start > 1 and (end - start) * int(n[end - 1]) > batch_size:
        end = start + max(1, batch_size // int(n[end - 1]))
    return end


def _dense_rows(
    flat: np.ndarray, offsets: np.ndarray, n: np.ndarray, start: int, end: int, width: int
) -> np.ndarray:
    """``[end - start, width]`` sample rows of lists ``start:end``, padded with -1."""
    lengths = n[start:end]
    out = np.full((end - start, width), -1, dtype=np.int64)
    which = np.repeat(np.arange(end - start), lengths)
    rank = np.arange(lengths.sum()) - np.repeat(offsets[start:end] - offsets[start], lengths)
    out[which, rank] = flat[offsets[start] : offsets[end]]
    return out


def score_samples(
    model_dir: Path,
    data_dir: Path,
    samples: pl.DataFrame,
    item_vectors: pl.DataFrame | None = None,
    batch_size: int = 2048,
    splits: Sequence[str] = REWARD_SPLITS,
    show_progress: bool = False,
) -> pl.DataFrame:
    """Per-(user, sample) MAP@5, NDCG@5 and soft-AUC on the user's reward lists, batched.

    Args:
        model_dir: a reward model from :func:`train_reward_model` (or a plain reranker folder).
        data_dir: run folder holding ``data/``.
        samples: ``user_id`` Int64, ``sample_idx`` Int64, ``vector`` List[Float32] (the
            sample's knowledge vector, same encoder as the reward model's training vectors).
        item_vectors: replaces the item vectors stored in the model (optional).
        batch_size: (list, sample) pairs per forward pass (a few kB each; a few thousand
            keep the working set in cache).
        splits: users of these splits are scored (others get a null reward and n_lists 0).
        show_progress: progress bar over chunks.

    Returns:
        ``user_id``, ``sample_idx``, ``map_at_5``, ``ndcg_at_5``, ``soft_auc`` (means over the
        user's reward lists; :mod:`models.metrics`), ``ndcg_at_5_auc`` (:data:`REWARD_COLUMNS`),
        ``n_lists``, in the order of ``samples``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    models, vecs, lists = _prepare(model_dir, data_dir, samples, item_vectors, splits)
    arrays = list_arrays(lists)
    # Every reward list with the rows of its user's samples, grouped by fold, fewest first.
    per_user = (
        samples.select(pl.col("user_id").cast(pl.Int64))
        .with_row_index("_s")
        .group_by("user_id")
        .agg(pl.col("_s").sort())
    )
    table = (
        lists.select("user_id", "fold")
        .with_row_index("_l")
        .join(per_user, on="user_id", how="inner")
        .with_columns(pl.col("_s").list.len().alias("_n"))
        .sort("fold", "_n", "_l")
    )
    fold = table["fold"].to_numpy()
    l_all = table["_l"].to_numpy().astype(np.int64)
    n_all = table["_n"].to_numpy().astype(np.int64)
    s_flat = table["_s"].explode().to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_all)])
    sums = np.zeros((3, samples.height), dtype=np.float64)  # map@5, ndcg@5, soft-AUC sums
    counts = np.zeros(samples.height, dtype=np.int64)
    bounds = np.searchsorted(fold, np.arange(len(models) + 1))
    bar = tqdm(total=int(n_all.sum()), desc="reward", unit="pair", disable=not show_progress)
    with torch.inference_mode():
        for k, model in enumerate(models):  # one pass per fold model, not per sample
            model.eval()
            tables = model.pair_tables()  # the item and position side, once per model
            start = bounds[k]
            while start < bounds[k + 1]:
                end = _chunk_end(n_all, start, bounds[k + 1], batch_size)
                n_max = int(n_all[end - 1])
                rows = _dense_rows(s_flat, offsets, n_all, start, end, n_max)  # [c, n_max]
                valid = rows >= 0
                used, local = np.unique(rows[valid], return_inverse=True)
                local_rows = np.full(rows.shape, -1, dtype=np.int64)
                local_rows[valid] = local  # rows of the chunk's own samples
                scores = model.score_pairs(
                    torch.from_numpy(arrays.item_ids[l_all[start:end]]),
                    torch.from_numpy(vecs[used]),
                    torch.from_numpy(local_rows),
                    tables,
                ).numpy()  # [c, n_max, L]
                chunk_labels = arrays.labels[l_all[start:end]][:, None, :]  # [c, 1, L]
                labels = np.broadcast_to(chunk_labels, scores.shape)[valid]  # [pairs, L]
                who = rows[valid]
                sums[0] += np.bincount(
                    who, map_at_k_per_list(labels, scores[valid], REWARD_K), samples.height
                )
                sums[1] += np.bincount(
                    who, ndcg_at_k_per_list(labels, scores[valid], REWARD_K), samples.height
                )
                sums[2] += np.bincount(
                    who, soft_auc_per_list(labels, scores[valid]), samples.height
                )
                counts += np.bincount(who, minlength=samples.height)
                bar.update(int(valid.sum()))
                start = end
    bar.close()
    seen = np.flatnonzero(counts)
    per_sample = pl.DataFrame(
        {
            "_s": pl.Series(seen, dtype=pl.UInt32),
            "map_at_5": sums[0, seen] / counts[seen],
            "ndcg_at_5": sums[1, seen] / counts[seen],
            "soft_auc": sums[2, seen] / counts[seen],
            "n_lists": counts[seen],
        }
    )
    return _finish(samples, per_sample)


def score_samples_naive(
    model_dir: Path,
    data_dir: Path,
    samples: pl.DataFrame,
    item_vectors: pl.DataFrame | None = None,
    splits: Sequence[str] = REWARD_SPLITS,
    limit: int | None = None,
) -> pl.DataFrame:
    """Reference implementation: one forward pass per sample (tests and benchmark only).

    Same output as :func:`score_samples`; ``limit`` scores only the first ``limit`` samples.
    """
    if limit is not None:
        samples = samples.head(limit)
    models, vecs, lists = _prepare(model_dir, data_dir, samples, item_vectors, splits)
    by_user = lists.with_row_index("_l").group_by("user_id").agg("_l", pl.col("fold").first())
    rows = dict(zip(by_user["user_id"].to_list(), by_user["_l"].to_list(), strict=True))
    folds = dict(zip(by_user["user_id"].to_list(), by_user["fold"].to_list(), strict=True))
    arrays = list_arrays(lists)
    out = []
    with torch.inference_mode():
        for s, uid in enumerate(samples["user_id"].to_list()):
            if uid not in rows:
                continue
            idx = np.asarray(sorted(rows[uid]), dtype=np.int64)
            model = models[folds[uid]]
            model.eval()
            batch = {
                "item_ids": torch.from_numpy(arrays.item_ids[idx]),
                "user_vec": torch.from_numpy(vecs[s : s + 1]).expand(len(idx), -1),
            }
            scores = model(batch).float().numpy()
            labels = arrays.labels[idx]
            out.append(
                (
                    s,
                    float(map_at_k_per_list(labels, scores, REWARD_K).mean()),
                    float(ndcg_at_k_per_list(labels, scores, REWARD_K).mean()),
                    float(soft_auc_per_list(labels, scores).mean()),
                    len(idx),
                )
            )
    per_sample = pl.DataFrame(
        out,
        schema={
            "_s": pl.UInt32,
            "map_at_5": pl.Float64,
            "ndcg_at_5": pl.Float64,
            "soft_auc": pl.Float64,
            "n_lists": pl.Int64,
        },
        orient="row",
    )
    return _finish(samples, per_sample)
