"""Why a user's samples tie, and which levers tell them apart (issue: "a reward that can tell
samples apart").

On a run folder of ``python -m flows.iterate`` (it needs ``round_00/samples.parquet``, the
round-0 knowledge, and ``round_01/samples.parquet``, N base-policy texts per train user), for each
knowledge encoding (:func:`tasks.rlrf4rec.encode.encode_knowledge`: ``kar``, ``answer``,
``split``) the benchmark trains the cross-fitted reward model on the round-0 vectors of that
encoding, as the flow does, scores the round-1 samples, and prints per reward column
(``ndcg_at_5``, ``map_at_5``, ``soft_auc``):

- the share of train users whose N samples all get the same reward (dropped by best/worst
  pairing);
- the mean within-user spread (max - min) and standard deviation of the reward, and the
  between-user standard deviation of the users' mean rewards (the scale a text could move);
- the reward model's validation NDCG@5 (mean of its folds).

``--sample T:N,...`` adds fresh base-policy samples at temperature T with N texts per user
(vLLM where it starts), scored by every encoding's reward model: the temperature and N levers.

Usage::

    python bench/bench_ties.py --run runs/quick-ml-100k [--sample 0.7:4,1.3:4,1.0:8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.rlrf4rec.encode import KNOWLEDGE_ENCODINGS, encode_knowledge, vectors_frame  # noqa: E402
from tasks.rlrf4rec.reranker import TrainConfig  # noqa: E402
from tasks.rlrf4rec.reward import score_samples, train_reward_model  # noqa: E402
from tasks.rlrf4rec.reward_diagnostics import spread  # noqa: E402

REWARD_COLUMNS = ("ndcg_at_5", "map_at_5", "soft_auc")


def tie_figures(scored: pl.DataFrame, col: str) -> dict[str, float]:
    """Tie share and spreads of one reward column over users with at least 2 samples."""
    per_user = (
        scored.group_by("user_id")
        .agg((pl.col(col).max() - pl.col(col).min()).alias("spread"), pl.len().alias("n"))
        .filter(pl.col("n") >= 2)
    )
    sds = spread(scored, col)  # within- and between-user sd, as the reward diagnostics
    return {
        "users": per_user.height,
        "tied_share": float((per_user["spread"] <= 0).mean()),
        "spread_mean": float(per_user["spread"].mean()),
        "within_sd": sds["within_sd"],
        "between_sd": sds["between_sd"],
    }


def vectors_of(samples: pl.DataFrame, prefix: dict[int, str], encoder: str, encoding: str):
    users = samples["user_id"].to_list()
    vecs = encode_knowledge(
        [prefix[u] for u in users], samples["text"].to_list(), encoder, encoding
    )
    frame = vectors_frame(users, vecs)
    return frame.with_columns(samples["sample_idx"].cast(pl.Int64))


def fresh_samples(run: Path, policy: str, temperature: float, n: int, max_new_tokens: int):
    from tasks.llm.generate import generate
    from tasks.llm.sampling import SamplingConfig

    prompts = pl.read_parquet(run / "prompts.parquet").filter(pl.col("split") == "train")
    cfg = SamplingConfig(
        n=n, temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens, seed=7
    )
    samples, stats = generate(prompts.select("user_id", "prompt"), policy, cfg)
    return samples, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder of flows.iterate")
    ap.add_argument("--encodings", default=",".join(KNOWLEDGE_ENCODINGS))
    ap.add_argument("--encoder", default="all-MiniLM-L6-v2")
    ap.add_argument("--policy", default="SmolLM2-135M-Instruct")
    ap.add_argument("--sample", default="", help="extra sample sets T:N, comma-separated")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    from tasks.data.assets import encoder_model, policy_model

    run = args.run.resolve()
    encoder = encoder_model(args.encoder)
    prompts = pl.read_parquet(run / "prompts.parquet")
    prefix = dict(prompts.select("user_id", "prefix").iter_rows())
    round0 = pl.read_parquet(run / "round_00" / "samples.parquet")
    round0 = round0.filter(
        pl.col("user_id").is_in(prompts.filter(pl.col("split") != "test")["user_id"].implode())
    )
    train = prompts.filter(pl.col("split") == "train")["user_id"].implode()
    first = pl.read_parquet(run / "round_01" / "samples.parquet").filter(
        pl.col("user_id").is_in(train)
    )
    sets = {f"round_01 T=1.0 N={first.group_by('user_id').len()['len'].max()}": first}
    for spec in filter(None, args.sample.split(",")):
        t, n = spec.split(":")
        t0 = time.perf_counter()
        samples, stats = fresh_samples(
            run, policy_model(args.policy), float(t), int(n), args.max_new_tokens
        )
        print(
            f"sampled T={t} N={n}: {samples.height} texts in {time.perf_counter() - t0:.1f} s "
            f"({stats.get('backend')})",
            flush=True,
        )
        sets[f"fresh T={t} N={n}"] = samples
    meta = json.loads((run / "reward_model" / "reward.json").read_text())
    cfg_dict = {k: v for k, v in meta["config"].items() if k not in ("exclude_fold",)}
    cfg = TrainConfig(**{**cfg_dict, "mlp": tuple(cfg_dict["mlp"])})
    items = pl.read_parquet(run / "item_vectors.parquet")
    rows = []
    for encoding in args.encodings.split(","):
        t0 = time.perf_counter()
        user_vecs = vectors_of(round0, prefix, encoder, encoding).select("user_id", "vector")
        model_dir = run / "bench_ties" / encoding
        rm = train_reward_model(run, model_dir, cfg, user_vecs, items, n_folds=meta["n_folds"])
        valid = float(np.mean([f["summary"]["valid"]["ndcg@5"] for f in rm["folds"]]))
        print(
            f"{encoding}: reward model trained in {time.perf_counter() - t0:.1f} s, "
            f"valid NDCG@5 {valid:.4f}",
            flush=True,
        )
        for name, samples in sets.items():
            vec = vectors_of(samples, prefix, encoder, encoding)
            scored = score_samples(model_dir, run, vec, items).drop_nulls("ndcg_at_5")
            for col in REWARD_COLUMNS:
                rows.append(
                    {
                        "encoding": encoding,
                        "samples": name,
                        "reward": col,
                        "valid_ndcg@5": valid,
                        **tie_figures(scored, col),
                    }
                )
    print()
    print(
        "| encoding | samples | reward | users | tied | within-user spread | within sd | "
        "between-user sd | within/between | RM valid NDCG@5 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["within_sd"] / r["between_sd"] if r["between_sd"] else float("nan")
        print(
            f"| {r['encoding']} | {r['samples']} | {r['reward']} | {r['users']} | "
            f"{r['tied_share']:.0%} | {r['spread_mean']:.5f} | {r['within_sd']:.5f} | "
            f"{r['between_sd']:.4f} | {ratio:.4f} | {r['valid_ndcg@5']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
