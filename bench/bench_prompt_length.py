"""What a shorter history in the policy's prompt costs and what it does to the reward.

On a finished quick-profile run (``--run``: its data, prompts, item vectors and frozen reward
model), for each cap in ``--caps`` the base policy samples round 1's N texts per train user from
prompts whose history is cut to the cap (``max_prompt_tokens``, whole entries, oldest first;
``full`` is no cap), on the round's seed. Each text is encoded with the user's *full* profile
and history (as the flow's knowledge stage does), so only the policy's answer differs, and
scored by the reward model. Printed per cap: prompt tokens, generation seconds and tokens/s,
the mean reward (NDCG@5 and MAP@5 over the user's reward lists, averaged over the N samples),
and the per-user paired difference from ``full`` with its 95% bootstrap interval.

    .venv/bin/python bench/bench_prompt_length.py --run runs/quick-ml-100k [--caps full,300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from models.stats import paired_bootstrap_ci  # noqa: E402
from tasks.data.assets import default_encoder_folder, policy_model  # noqa: E402
from tasks.data.prepare import load_prepared  # noqa: E402
from tasks.llm.generate import generate  # noqa: E402
from tasks.llm.sampling import SamplingConfig  # noqa: E402
from tasks.rlrf4rec.encode import encode_texts  # noqa: E402
from tasks.rlrf4rec.prompts import knowledge_text, prompt_table  # noqa: E402
from tasks.rlrf4rec.reward import score_samples  # noqa: E402

METRICS = ("ndcg_at_5", "map_at_5")


def rewards(run: Path, cap: int | None, cfg: SamplingConfig, model: str, encoder: str) -> dict:
    """Sample, encode (full prefix) and score the train users' texts with prompts cut to ``cap``."""
    data = load_prepared(run)
    full = pl.read_parquet(run / "prompts.parquet").filter(pl.col("split") == "train")
    table = prompt_table(
        data.users,
        data.history,
        data.items,
        data.meta.get("dataset", "ml-100k"),
        user_ids=full["user_id"].to_list(),
        max_prompt_tokens=cap,
        tokenizer=model,
    )
    samples, stats = generate(table.select("user_id", "prompt"), model, cfg, "vllm")
    prefix = dict(full.select("user_id", "prefix").iter_rows())
    texts = [
        knowledge_text(prefix[u], t)
        for u, t in zip(samples["user_id"].to_list(), samples["text"].to_list(), strict=True)
    ]
    vectors = samples.select("user_id", pl.col("sample_idx").cast(pl.Int64)).with_columns(
        pl.Series("vector", encode_texts(texts, encoder).tolist(), dtype=pl.List(pl.Float32))
    )
    scores = score_samples(
        run / "reward_model",
        run,
        vectors,
        item_vectors=pl.read_parquet(run / "item_vectors.parquet"),
    )
    per_user = scores.drop_nulls(METRICS[0]).group_by("user_id").agg(pl.col(METRICS).mean())
    return {"per_user": per_user.sort("user_id"), "stats": stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished quick-profile run folder")
    parser.add_argument("--caps", default="full,300", help="prompt token caps; full = none")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--seed", type=int, default=1042, help="round 1's sampling seed (42 + 1000)"
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    run = Path(args.run)
    model, encoder = policy_model(), str(default_encoder_folder())
    cfg = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed)
    caps = [None if c.strip() == "full" else int(c) for c in args.caps.split(",") if c.strip()]
    results = {cap: rewards(run, cap, cfg, model, encoder) for cap in caps}
    base = results[caps[0]]["per_user"]
    print(f"\n=== prompt length: {base.height} train users x n={cfg.n}, {run} ===")
    print(
        f"{'cap':>6}{'prompt tok':>12}{'gen s':>8}{'tokens/s':>10}  reward (vs {caps[0] or 'full'})"
    )
    out = []
    for cap in caps:
        r, s = results[cap]["per_user"], results[cap]["stats"]
        joined = base.join(r, on="user_id", suffix="_cap")
        line = (
            f"{cap or 'full':>6}{s['prompt_tokens']:>12}{s['seconds']:>8.1f}"
            f"{s['tokens_per_s']:>10.1f}"
        )
        row = {"cap": cap, **{k: s[k] for k in ("prompt_tokens", "seconds", "tokens_per_s")}}
        for m in METRICS:
            ci = paired_bootstrap_ci(joined[f"{m}_cap"].to_numpy(), joined[m].to_numpy())
            row[m] = {"mean": float(r[m].mean()), **ci}
            line += (
                f"  {m} {r[m].mean():.4f} ({ci['mean_diff']:+.4f}, 95% "
                f"[{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}])"
            )
        print(line)
        out.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
