"""Does the reward read the text? The reward diagnostics of a run folder, for today's reward
model and for candidate reward models, all on the same samples.

On a run folder of ``python -m flows.iterate`` (it needs ``prompts.parquet``,
``item_vectors.parquet``, ``round_00/samples.parquet``: one text per user, and
``round_01/samples.parquet``: N texts per sampled train and validation user), each candidate
trains a cross-fitted reward model as the flow does (the run's reward settings and seed), then
:func:`tasks.rlrf4rec.reward_diagnostics.diagnose` scores round 1's samples: text sensitivity
(another user's vector, a zero vector), spread, reliability against a second model trained with
the next seed, and the knowledge ablation of the reward model on the validation users' round-0
texts. It prints one row per candidate and reward column, the reward model's validation
NDCG@5, and the seconds.

Candidates (``--candidates``, comma-separated; ``today`` = the flow's reward model as the run
built it):

- ``today``: trained on round-0 texts in the run's encoding, scores in it;
- ``answer`` / ``split``: the same in the answer-alone / split encoding;
- ``profile-kar`` / ``profile-answer`` / ``profile-split``: trained on the profile-and-history
  text (what the policy reads, no answer), scores in the kar / answer / split encoding;
- ``draws-answer``: trained on several texts per user, drawn at random each epoch (round 0's
  text and round 1's N samples, answer-alone);
- ``profile-draws-answer``: draws over the profile-and-history text and round 0's answer;
- ``contrastive-kar`` / ``contrastive-answer``: round-0 texts with the knowledge-contrastive term
  (``--contrastive``, default 1.0);
- any of them with ``@ENCODER`` (say ``answer@all-mpnet-base-v2``): another sentence encoder.

Usage::

    python bench/bench_reward_diagnostics.py --run runs/quick-ml-100k
    python bench/bench_reward_diagnostics.py --run runs/x --candidates today,answer,profile-answer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tasks.data.prepare import load_prepared  # noqa: E402
from tasks.rlrf4rec.encode import (  # noqa: E402
    encode_knowledge,
    encode_texts,
    item_texts,
    vectors_frame,
)
from tasks.rlrf4rec.reranker import TrainConfig  # noqa: E402
from tasks.rlrf4rec.reward import REWARD_COLUMNS, train_reward_model  # noqa: E402
from tasks.rlrf4rec.reward_diagnostics import diagnose  # noqa: E402


@dataclass(frozen=True)
class Candidate:
    """A reward model design: what it trains on, what encoding it scores, its options."""

    train: str  # round0 | profile | round0+samples | profile+round0
    encoding: str  # kar | answer | split (and the encoding of round-0 training texts)
    contrastive: float = 0.0

    @property
    def draws(self) -> bool:
        return "+" in self.train


CANDIDATES = {
    "today": None,  # the run's own encoding, filled in main
    "answer": Candidate("round0", "answer"),
    "split": Candidate("round0", "split"),
    "profile-kar": Candidate("profile", "kar"),
    "profile-answer": Candidate("profile", "answer"),
    "profile-split": Candidate("profile", "split"),
    "draws-answer": Candidate("round0+samples", "answer"),
    "profile-draws-answer": Candidate("profile+round0", "answer"),
    "contrastive-kar": Candidate("round0", "kar", 1.0),
    "contrastive-answer": Candidate("round0", "answer", 1.0),
}


def sample_vectors(
    samples: pl.DataFrame, prefix: dict[int, str], encoder: str, encoding: str
) -> pl.DataFrame:
    """``user_id``, ``sample_idx``, ``vector`` of ``samples`` in ``encoding``."""
    users = samples["user_id"].to_list()
    vecs = encode_knowledge(
        [prefix[u] for u in users], samples["text"].to_list(), encoder, encoding
    )
    return vectors_frame(users, vecs).with_columns(samples["sample_idx"].cast(pl.Int64))


def training_vectors(
    cand: Candidate,
    round0: pl.DataFrame,
    round1: pl.DataFrame,
    prefix: dict[int, str],
    encoder: str,
) -> pl.DataFrame:
    """The reward model's training vectors (``user_id``, ``vector``; several rows per user
    for the draw candidates, round 0's first)."""
    users = round0["user_id"].to_list()
    parts = []
    for source in cand.train.split("+"):
        if source == "round0":
            frame = sample_vectors(round0, prefix, encoder, cand.encoding)
        elif source == "profile":
            frame = vectors_frame(users, encode_texts([prefix[u] for u in users], encoder))
        elif source == "samples":
            frame = sample_vectors(round1, prefix, encoder, cand.encoding)
        else:
            raise ValueError(f"unknown training source {source!r}")
        parts.append(frame.select("user_id", "vector"))
    return pl.concat(parts)


def run_candidate(
    name: str,
    cand: Candidate,
    *,
    run: Path,
    base_cfg: TrainConfig,
    n_folds: int,
    encoder: str,
    frames: dict,
    out: Path,
) -> dict:
    t0 = time.perf_counter()
    prefix, round0, round1 = frames["prefix"], frames["round0"], frames["round1"]
    train_vecs = training_vectors(cand, round0, round1, prefix, encoder)
    scored_vecs = sample_vectors(round1, prefix, encoder, cand.encoding)
    ablation = sample_vectors(round0, prefix, encoder, cand.encoding).select("user_id", "vector")
    items = frames["items"]
    if encoder != frames["run_encoder"]:  # item vectors in the candidate's encoder too
        data = load_prepared(run)
        vecs = encode_texts(item_texts(data.items), encoder)
        items = vectors_frame(data.items["item_id"].to_numpy(), vecs, id_col="item_id")
    t_encode = time.perf_counter() - t0
    cfg = replace(base_cfg, knowledge_draws=cand.draws, contrastive=cand.contrastive)
    model = out / name / "reward_model"
    meta = train_reward_model(run, model, cfg, train_vecs, items, n_folds=n_folds)
    valid = float(np.mean([f["summary"]["valid"]["ndcg@5"] for f in meta["folds"]]))
    figures = diagnose(
        model,
        run,
        round0=train_vecs,
        vectors=scored_vecs,
        scored=frames["scored"],
        items=items,
        cfg=cfg,
        n_folds=n_folds,
        reward_col=frames["reward_col"],
        seed=frames["seed"],
        second_model=out / name / "second_model",
        ablation_vectors=ablation,
    )
    figures["reward_model_valid_ndcg@5"] = valid
    figures["seconds"]["encode"] = t_encode
    figures["seconds"]["all"] = time.perf_counter() - t0
    figures["candidate"] = {"name": name, **cand.__dict__, "encoder": encoder}
    return figures


def table(results: list[dict]) -> str:
    head = (
        "| candidate | reward | changed, another user's | mean abs. change | changed, zeroed |"
        " within / between sd | pairs ordered alike | same best | ablation NDCG@5 (95% CI) |"
        " RM valid NDCG@5 | seconds |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for res in results:
        ab = res["knowledge_ablation"]
        ablation = (
            f"{ab['diff']:+.4f} [{ab['ci_low']:+.4f}, {ab['ci_high']:+.4f}] (n {ab['n']})"
            if ab.get("n")
            else ""
        )
        for col, fig in res["columns"].items():
            if col == "genre_share":
                continue
            rel, swapped = fig["reliability"], fig["swapped"]
            rows.append(
                f"| {res['candidate']['name']} | {col} |"
                f" {swapped['changed_share']:.1%} | {swapped['mean_abs_change']:.4f} |"
                f" {fig['zeroed']['changed_share']:.1%} | {fig['spread']['ratio']:.4f} |"
                f" {rel['pair_agreement']:.1%} ({rel['pairs']}) | {rel['best_agreement']:.1%} |"
                f" {ablation} | {res['reward_model_valid_ndcg@5']:.4f} |"
                f" {res['seconds']['all']:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", type=Path, required=True, help="a run folder of flows.iterate")
    ap.add_argument("--candidates", default="today", help=f"among {', '.join(CANDIDATES)}")
    ap.add_argument("--encoder", default=None, help="default: the run's encoder")
    ap.add_argument("--contrastive", type=float, default=1.0, help="weight of the term")
    ap.add_argument("--out", type=Path, help="folder for the models (default RUN/bench_diag)")
    ap.add_argument("--json", type=Path, help="write every figure here too")
    args = ap.parse_args()

    from tasks.data.assets import encoder_model

    run = args.run.resolve()
    results_path = run / "results.json"
    settings = json.loads(results_path.read_text())["settings"] if results_path.is_file() else {}
    run_encoding = settings.get("knowledge_encoding", "kar")
    reward_col = REWARD_COLUMNS[settings.get("reward", "ndcg@5")]
    meta = json.loads((run / "reward_model" / "reward.json").read_text())
    cfg_dict = {k: v for k, v in meta["config"].items() if k != "exclude_fold"}
    base_cfg = TrainConfig(**{**cfg_dict, "mlp": tuple(cfg_dict["mlp"])})
    prompts = pl.read_parquet(run / "prompts.parquet")
    non_test = prompts.filter(pl.col("split") != "test")["user_id"].implode()
    frames = {
        "prefix": dict(prompts.select("user_id", "prefix").iter_rows()),
        "round0": pl.read_parquet(run / "round_00" / "samples.parquet").filter(
            pl.col("user_id").is_in(non_test)
        ),
        "round1": pl.read_parquet(run / "round_01" / "samples.parquet"),
        "scored": pl.read_parquet(run / "round_01" / "scored.parquet"),
        "items": pl.read_parquet(run / "item_vectors.parquet"),
        "reward_col": reward_col,
        "seed": int(meta["config"]["seed"]),
        "run_encoder": encoder_model(settings.get("encoder") or "all-MiniLM-L6-v2"),
    }
    out = (args.out or run / "bench_diag").resolve()
    results = []
    for spec in args.candidates.split(","):
        name, _, enc_name = spec.partition("@")
        if name not in CANDIDATES:
            raise SystemExit(
                f"--candidates: unknown {name!r}; choose among {', '.join(CANDIDATES)}"
            )
        cand = CANDIDATES[name] or Candidate("round0", run_encoding)
        if name.startswith("contrastive"):
            cand = replace(cand, contrastive=args.contrastive)
        encoder = encoder_model(enc_name or args.encoder or settings.get("encoder") or
                                "all-MiniLM-L6-v2")  # fmt: skip
        try:
            res = run_candidate(
                spec.replace("/", "_"),
                cand,
                run=run,
                base_cfg=base_cfg,
                n_folds=int(meta["n_folds"]),
                encoder=encoder,
                frames=frames,
                out=out,
            )
        except Exception as exc:  # one candidate's failure must not lose the others' figures
            print(f"{spec}: failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        results.append(res)
        print(f"{spec}: done in {res['seconds']['all']:.0f} s", flush=True)
        print(table([res]).splitlines()[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    if not results:
        raise SystemExit("no candidate finished")
    print()
    print(
        f"run {run.name}: round 1's {results[0]['samples']} samples of {results[0]['users']} "
        f"users; pairing reward {reward_col}; reward model {base_cfg.backbone}, seed "
        f"{frames['seed']} (second model {frames['seed'] + 1})"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
