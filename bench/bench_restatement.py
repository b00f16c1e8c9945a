"""Is the prompt read back what costs a policy's knowledge its worth to the reranker?

Most of Qwen2.5-Coder-1.5B's greedy texts open by reading the prompt's list of factors back
(``compare_runs``: "restates the prompt's factors"), the same words for every user. On a
finished ``--rounds 0`` run folder this cuts each round-0 text's restatement
(:func:`tasks.rlrf4rec.compare_runs.restated_words`: the words up to and including the first
sentence naming at least five of the factors), encodes what is left as the run did (its encoder
and encoding, read from the round-0 vectors' stage manifest), trains and evaluates the KAR row
again with the run's own reranker settings and seeds (read from ``eval/<backbone>/KAR/seed*/``),
and prints, per backbone, the edited KAR row and its paired 95% CI against the run's KAR row
(per-list metrics averaged over seeds, bootstrap over the test lists). Texts without a
restatement are left as they are. Nothing in the run folder is changed; the edited texts,
vectors and rerankers go to ``--out``. ``--keep-texts`` is the control: the same pass on the
texts as they are, which should give the run's KAR row back (a difference of 0 when encoding
and training are deterministic); ``--backbones`` picks the backbones (default both).

Usage::

    python bench/bench_restatement.py runs/measure-qwen15-greedy-ml-100k --out /tmp/restatement
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.stats import paired_bootstrap_ci  # noqa: E402
from tasks.common.io import write_json, write_parquet  # noqa: E402
from tasks.common.stage import Artefact, read_manifest  # noqa: E402
from tasks.rlrf4rec.compare_runs import (  # noqa: E402
    METRICS,
    load_results,
    per_list,
    prompt_factors,
    restated_words,
)
from tasks.rlrf4rec.encode import encode_knowledge  # noqa: E402
from tasks.rlrf4rec.reranker import TrainConfig, evaluate_reranker, train_reranker  # noqa: E402
from tasks.rlrf4rec.stages import user_vectors  # noqa: E402


def cut_restatement(text: str, factors: list[str]) -> str:
    """``text`` without its first :func:`restated_words` words (unchanged when it has none)."""
    n = restated_words(text, factors)
    return " ".join(text.split()[n:]) if n else text


def kar_configs(run: Path, backbone: str) -> list[TrainConfig]:
    """The reranker settings of the run's KAR row, one per seed, from the stage manifests."""
    configs = []
    for model in sorted((run / "eval" / backbone / "KAR").glob("seed*/model")):
        manifest = read_manifest(model)
        if manifest is None:
            raise FileNotFoundError(f"{model}: no stage manifest beside it")
        cfg = dict(manifest["key_body"]["arguments"]["cfg"])
        cfg["mlp"] = tuple(cfg["mlp"])
        configs.append(TrainConfig(**cfg))
    if not configs:
        raise FileNotFoundError(f"{run / 'eval' / backbone / 'KAR'}: no seed*/model")
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `--rounds 0` run folder")
    parser.add_argument("--out", type=Path, required=True, help="where the edited row goes")
    parser.add_argument(
        "--keep-texts", action="store_true", help="the control: do not cut the restatement"
    )
    parser.add_argument("--backbones", nargs="+", default=["dlcm", "prm"], choices=["dlcm", "prm"])
    args = parser.parse_args(argv)
    run, out = args.run, args.out
    params = load_results(run)["params"]
    factors = prompt_factors(params.get("dataset", "ml-100k"))

    t0 = time.perf_counter()
    samples = pl.read_parquet(run / "round_00" / "samples.parquet")
    texts = samples["text"].to_list()
    edited = texts if args.keep_texts else [cut_restatement(t, factors) for t in texts]
    words = sum(len(t.split()) for t in texts)
    kept = sum(len(t.split()) for t in edited)
    restating = sum(restated_words(t, factors) > 0 for t in texts)
    print(
        f"{run.name}: {restating} of {len(texts)} texts restate the prompt's factors"
        f" ({'kept: the control' if args.keep_texts else 'cut'}); "
        f"{words / len(texts):.1f} words per text before, {kept / len(texts):.1f} after"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(samples.with_columns(pl.Series("text", edited)), out / "samples.parquet")

    encode_args = read_manifest(run / "round_00" / "vectors.parquet")["key_body"]["arguments"]
    prefix = dict(pl.read_parquet(run / "prompts.parquet").select("user_id", "prefix").iter_rows())
    vectors = encode_knowledge(
        [prefix[u] for u in samples["user_id"].to_list()],
        edited,
        encode_args["encoder"]["input"],
        encode_args["encoding"],
    )
    frame = samples.select("user_id", "sample_idx").with_columns(
        pl.Series("vector", vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))
    )
    write_parquet(frame, out / "vectors.parquet")
    users = user_vectors(Artefact(str(out / "vectors.parquet")))
    items = pl.read_parquet(run / "item_vectors.parquet")
    print(
        f"encoded with {encode_args['encoder']['input']} ({encode_args['encoding']}) "
        f"in {time.perf_counter() - t0:.0f} s"
    )

    figures: dict[str, dict] = {}
    for backbone in args.backbones:
        runs_per_list = []
        configs = kar_configs(run, backbone)
        for cfg in configs:
            t1 = time.perf_counter()
            model = out / backbone / f"seed{cfg.seed}" / "model"
            train_reranker(run, model, cfg, user_vectors=users, item_vectors=items)
            result = evaluate_reranker(
                model, run, user_vectors=users, item_vectors=items, split="test"
            )
            runs_per_list.append(result.per_list.sort("list_id"))
            print(f"{backbone} seed {cfg.seed}: {time.perf_counter() - t1:.0f} s")
        ids = runs_per_list[0]["list_id"].to_numpy()
        figures[backbone] = {}
        for metric in METRICS:
            mine = np.mean([f[metric].to_numpy() for f in runs_per_list], axis=0)
            ref_ids, ref = per_list(run, backbone, "KAR", metric)
            if not np.array_equal(ids, ref_ids):
                raise ValueError(f"{run}: its test lists differ from the edited row's")
            ci = paired_bootstrap_ci(mine, ref)
            figures[backbone][metric] = {
                "edited": float(mine.mean()),
                "run": float(ref.mean()),
                **ci,
            }
    print(
        f"\nKAR with the restatement {'kept' if args.keep_texts else 'cut'} - the run's KAR"
        f" ({len(ids)} test lists, "
        f"seeds {[c.seed for c in configs]}), paired 95% CI:"
    )
    print("| backbone | metric | run's KAR | this pass | difference |")
    print("|---|---|---|---|---|")
    for backbone, by_metric in figures.items():
        for metric, f in by_metric.items():
            print(
                f"| {backbone} | {metric} | {f['run']:.4f} | {f['edited']:.4f} | "
                f"{f['mean_diff']:+.4f} [{f['ci_low']:+.4f}, {f['ci_high']:+.4f}] |"
            )
    write_json(figures, out / "figures.json")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
