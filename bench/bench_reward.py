"""Benchmark of the reward model on MovieLens-100K (CPU): training, reward and encoder speed.

Prints:

- encoder throughput: texts/s encoding profile texts into an empty cache (cold), then the same
  texts again (cache hits);
- reranker training: seconds per epoch for DLCM and PRM, base and knowledge-augmented;
- reward throughput: (user, sample) pairs scored per second by
  :func:`tasks.rlrf4rec.reward.score_samples`
  (batched) and by a naive loop that scores one sample at a time
  (:func:`tasks.rlrf4rec.reward.score_samples_naive`), measured in the same run, and their ratio
  (the batched path must be at least 20x faster).

Usage::

    python bench/bench_reward.py [--run runs/x] [--epochs 2] [--threads 1] [--json out.json]

Without ``--run`` MovieLens-100K is prepared into a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.data.prepare import load_prepared, prepare  # noqa: E402
from tasks.rlrf4rec.encode import encode_texts, frame_vectors, vectors_frame  # noqa: E402
from tasks.rlrf4rec.reranker import TrainConfig, train_reranker  # noqa: E402
from tasks.rlrf4rec.reward import score_samples, score_samples_naive, train_reward_model  # noqa: E402
from tasks.rlrf4rec.table1 import build_vectors, knowledge_texts  # noqa: E402


def bench_encoder(texts: list[str], encoder: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        encode_texts(texts, encoder, cache_dir=Path(cache))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        encode_texts(texts, encoder, cache_dir=Path(cache))
        hit = time.perf_counter() - t0
    return {
        "texts": len(texts),
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "cold_texts_per_s": len(texts) / cold,
        "cache_hit_texts_per_s": len(texts) / hit,
    }


def make_samples(users: pl.DataFrame, per_user: int, seed: int = 0) -> pl.DataFrame:
    """``per_user`` noisy copies of each user's vector (stand-ins for sampled texts)."""
    rng = np.random.default_rng(seed)
    base = frame_vectors(users)
    rows = np.repeat(np.arange(users.height), per_user)
    noise = rng.normal(0, 0.02, (len(rows), base.shape[1])).astype(np.float32)
    vec = base[rows] + noise
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    frame = vectors_frame(users["user_id"].to_numpy()[rows], vec)
    idx = pl.Series("sample_idx", np.tile(np.arange(per_user), users.height), dtype=pl.Int64)
    return frame.with_columns(idx).select("user_id", "sample_idx", "vector")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="prepared run (default: prepare one)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed training")
    p.add_argument("--samples-per-user", type=int, default=4, help="reward samples per user")
    p.add_argument(
        "--naive-samples",
        type=int,
        default=0,
        help="samples scored by the naive loop (default 0: all, the same work as batched)",
    )
    p.add_argument("--repeats", type=int, default=3, help="batched runs / naive slices")
    p.add_argument("--encode-n", type=int, default=256, help="texts in the cold encoder test")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more threads oversubscribe the "
        "cores; 0 keeps torch's default)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    run = args.run
    if run is None:
        run = Path(tmp.name) / "run"
        prepare("ml-100k", run)
    data = load_prepared(run)
    figures: dict = {"threads": torch.get_num_threads(), "run": str(run)}

    texts = knowledge_texts(run, "profile")
    enc = bench_encoder(texts["text"].to_list()[: args.encode_n], args.encoder)
    figures["encoder"] = enc
    print(
        f"encoder {args.encoder}: {enc['cold_texts_per_s']:.1f} texts/s cold "
        f"({enc['texts']} profile texts, {enc['mean_chars']:.0f} chars), "
        f"{enc['cache_hit_texts_per_s']:.0f} texts/s on cache hits"
    )
    users, items = build_vectors(run, texts, args.encoder, item_text=True, show_progress=False)

    out = Path(tmp.name) / "models"
    figures["train"] = {}
    n_train = data.lists.filter(pl.col("split") == "train").height
    for backbone in ("dlcm", "prm"):
        for row, uv, iv in (("base", None, None), ("knowledge", users, items)):
            cfg = TrainConfig(backbone=backbone, epochs=args.epochs, patience=args.epochs)
            s = train_reranker(run, out / f"{backbone}-{row}", cfg, uv, iv)
            figures["train"][f"{backbone}/{row}"] = s["seconds_per_epoch"]
            print(
                f"train {backbone:4s} {row:9s}: {s['seconds_per_epoch']:.2f} s/epoch "
                f"({n_train} lists, batch {cfg.batch_size})"
            )

    samples = make_samples(users, args.samples_per_user)
    figures["reward"] = {}
    for backbone in ("dlcm", "prm"):
        cfg = TrainConfig(backbone=backbone, epochs=1, patience=1)
        rm = out / f"reward-{backbone}"
        train_reward_model(run, rm, cfg, users, items)
        # Interleave batched runs and slices of the naive loop so that both see the same
        # machine load; batched: median of the runs, naive: all slices together.
        batched = score_samples(rm, run, samples)  # warm-up (and the reference output)
        scored = int((batched["n_lists"] > 0).sum())
        n_list_pairs = int(batched["n_lists"].sum())
        naive_in = samples.filter(
            pl.col("user_id").is_in(batched.filter(pl.col("n_lists") > 0)["user_id"].implode())
        )
        if args.naive_samples:
            naive_in = naive_in.head(args.naive_samples)
        t_batched, t_n, parts = [], 0.0, []
        bounds = np.linspace(0, naive_in.height, args.repeats + 1).astype(int)
        for r in range(args.repeats):
            t0 = time.perf_counter()
            score_samples(rm, run, samples)
            t_batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parts.append(score_samples_naive(rm, run, naive_in[bounds[r] : bounds[r + 1]]))
            t_n += time.perf_counter() - t0
        t_b = float(np.median(t_batched))
        naive = pl.concat(parts)
        check = batched.join(naive, on=["user_id", "sample_idx"], suffix="_naive")
        max_diff = float(
            max(
                (check["map_at_5"] - check["map_at_5_naive"]).abs().max(),
                (check["ndcg_at_5"] - check["ndcg_at_5_naive"]).abs().max(),
            )
        )
        rate_b, rate_n = scored / t_b, naive.height / t_n
        figures["reward"][backbone] = {
            "samples": scored,
            "list_pairs": n_list_pairs,
            "batched_pairs_per_s": rate_b,
            "batched_list_pairs_per_s": n_list_pairs / t_b,
            "naive_pairs_per_s": rate_n,
            "speedup": rate_b / rate_n,
            "max_abs_diff": max_diff,
        }
        print(
            f"reward {backbone:4s}: batched {rate_b:,.0f} (user, sample) pairs/s "
            f"({scored} samples, {n_list_pairs:,} list scorings in {t_b:.2f} s); naive loop "
            f"{rate_n:,.1f} pairs/s ({naive.height} samples); speedup {rate_b / rate_n:.0f}x "
            f"{'OK' if rate_b / rate_n >= 20 else 'BELOW 20x'}; max |diff| {max_diff:.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
