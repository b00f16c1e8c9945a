"""The stages of the second pipeline (You et al.): evaluate, SFT, preference pairs, DPO, online RL.

The stages only (:func:`tasks.common.stage.stage`); what they compute lives beside them
(:mod:`tasks.direct.scoring`, :mod:`tasks.pairing`, :mod:`tasks.llm.reward_model`,
:mod:`tasks.direct.report`). Each reads upstream artefacts, writes files under
``runs/<run>/direct/seed_<s>/<stage>/`` and returns an :class:`Artefact`; it is served again
only when its parameters, upstream artefacts and code are unchanged.

- **evaluate**: one answer per test window with the stage's policy and the shared decoding
  settings (greedy by default), parsed and mapped (:mod:`tasks.direct.title_mapping`), scored with
  NDCG@5, Precision@5 and Recall@5 (:mod:`models.direct_metrics`) against the ground truth.
- **SFT**: (prompt, ground-truth titles as a Python list) pairs of the train windows.
- **preference pairs**: ``n`` sampled answers per train prompt from the SFT policy, scored with
  NDCG@5 (plus the optional format bonus) and paired by :func:`tasks.pairing.build_pairs`
  (``all_pairs``, the paper: every pair with different rewards, the higher one chosen).
- **DPO**: on those pairs, continuing the SFT adapter, with the SFT policy as reference.
- **online RL**: TRL GRPO/RLOO training the SFT adapter further, reward = NDCG@5 of the mapped
  answer, with a KL term (``beta``) towards the SFT policy (TRL's frozen copy of that adapter).
- **RLHF** (the paper's PPO row, with a reward model): a reward model (the base LLM with a
  scalar head and LoRA, TRL ``RewardTrainer``) trained on the preference pairs (on the answers
  alone by default, as You et al.; ``rm_input``), then online RL with that model's score as the
  reward, with the same KL term.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tasks.common.io import write_json, write_parquet
from tasks.common.stage import Artefact, InputRef, stage
from tasks.direct.baselines import BaselineConfig
from tasks.direct.scoring import (
    NDCGReward,
    load_direct,
    pair_stats,
    score_answers,
    score_lists,
    sft_examples,
)
from tasks.direct.title_mapping import MappingConfig
from tasks.direct.windows import WindowConfig, select
from tasks.llm.online_rl import OnlineRLConfig
from tasks.llm.policy import Policy
from tasks.llm.reward_model import RewardModelConfig, RewardModelScore, train_llm_reward_model
from tasks.llm.sampling import SamplingConfig
from tasks.llm.sft import SFTConfig
from tasks.llm.stages import trained_artefact
from tasks.pairing import PairingConfig, build_pairs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- generation


def _generate(
    windows: pl.DataFrame, policy: Policy, cfg: SamplingConfig, backend: str, round_idx: int
) -> tuple[pl.DataFrame, dict]:
    from tasks.llm.generate import generate

    model, adapter = policy.serving()
    return generate(
        windows.select("window_id", "prompt"),
        model,
        cfg,
        backend=backend,  # type: ignore[arg-type]
        adapter=adapter,
        round_idx=round_idx,
        key="window_id",
    )


# --------------------------------------------------------------------------- stages


@stage("direct-data")
def direct_data(
    dataset: str,
    *,
    data_dir: InputRef | None,
    windows: WindowConfig,
    zip_table: InputRef | None,
    out: Path,
) -> Artefact:
    """Load the data set, build the windows of one seed and write them under ``out``."""
    from tasks.data.datasets import load_dataset
    from tasks.direct.windows import prepare_direct

    data = load_dataset(dataset, data_dir.path if data_dir else None)
    counts = prepare_direct(data, out, windows, zip_table.path if zip_table else None)
    return Artefact(str(out), stats={"counts": counts})


@stage("direct-baselines")
def baselines(
    data: Artefact, *, cfg: BaselineConfig, max_eval_users: int | None, out: Path
) -> Artefact:
    """Most-popular and item-kNN on the evaluated test windows."""
    from tasks.direct.baselines import recommend

    windows, catalogue = load_direct(data.path)
    ratings = pl.read_parquet(Path(data.path) / "ratings.parquet")
    test = select(windows, "test", max_eval_users)
    train_users = windows.filter(pl.col("split") == "train")["user_id"].unique().to_list()
    recs = recommend(test, ratings, train_users, cfg, catalogue.canonical_of)
    write_parquet(recs, Path(out) / "recommendations.parquet")
    metrics = {
        name: score_lists(recs[name].to_list(), test, catalogue, cfg.k)
        for name in ("popular", "item_knn")
    }
    write_json(metrics, Path(out) / "metrics.json")
    return Artefact(str(out), stats={"metrics": _plain(metrics)})


@stage("direct-evaluate")
def evaluate(
    data: Artefact,
    policy: Policy,
    *,
    name: str,
    sampling: SamplingConfig,
    backend: str,
    max_eval_users: int | None,
    mapping: MappingConfig,
    out: Path,
) -> Artefact:
    """Answer every evaluated test window with ``policy``; map and score the answers.

    ``out`` is the folder of ``answers.parquet`` (the artefact) and ``metrics.json``.
    """
    windows, catalogue = load_direct(data.path)
    test = select(windows, "test", max_eval_users)
    samples, gen_stats = _generate(test, policy, sampling, backend, 0)
    scored, summary = score_answers(samples, test, catalogue, mapping)
    answers, metrics = Path(out) / "answers.parquet", Path(out) / "metrics.json"
    write_parquet(scored, answers)
    write_json({"stage": name, "metrics": summary, "generation": gen_stats}, metrics)
    log.info("%s: ndcg@5 %.4f on %d test windows", name, summary["ndcg@5"], test.height)
    stats = {"metrics": _plain(summary), "generation": _plain(gen_stats)}
    return Artefact(str(answers), stats=stats, extra=(str(metrics),))


@stage("direct-sft")
def sft(
    data: Artefact, base: InputRef, *, cfg: SFTConfig, max_train_users: int | None, out: Path
) -> Artefact:
    """SFT of a LoRA adapter on (prompt, ground-truth titles) of the train windows."""
    from tasks.llm.sft import train_sft

    windows, _ = load_direct(data.path)
    examples = sft_examples(select(windows, "train", max_train_users))
    examples_path = Path(out).with_name("sft_examples.parquet")
    write_parquet(examples, examples_path)
    result = train_sft(base.path, examples, Path(out), cfg)
    metrics = {**result.get("metrics", {}), "n_examples": examples.height}
    return trained_artefact(result, out, {"metrics": metrics}, extra=(str(examples_path),))


@stage("direct-preferences")
def preferences(
    data: Artefact,
    policy: Policy,
    *,
    sampling: SamplingConfig,
    backend: str,
    max_train_users: int | None,
    mapping: MappingConfig,
    format_bonus: float,
    pairing: PairingConfig,
    out: Path,
) -> Artefact:
    """``n`` answers per train prompt from ``policy`` (SFT's), scored, turned into pairs.

    ``format_bonus`` enters the ``reward`` column the pairs are built on (see
    :func:`tasks.direct.scoring.reward_of`); ``pairing`` pairs per ``window_id``.

    The artefact is ``out/pairs.parquet``; ``samples.parquet`` and ``stats.json`` sit beside.
    """
    windows, catalogue = load_direct(data.path)
    train = select(windows, "train", max_train_users)
    samples, gen_stats = _generate(train, policy, sampling, backend, 1)
    scored, summary = score_answers(samples, train, catalogue, mapping, format_bonus)
    pairs, pairing_stats = build_pairs(scored, train, pairing)
    out = Path(out)
    write_parquet(scored, out / "samples.parquet")
    write_parquet(pairs, out / "pairs.parquet")
    stats = {
        **pair_stats(scored, pairs, pairing.key),
        "pairing": pairing_stats.as_dict(),
        "mapping": summary,
    }
    write_json({"stats": stats, "generation": gen_stats}, out / "stats.json")
    return Artefact(
        str(out / "pairs.parquet"),
        stats={"stats": _plain(stats), "generation": _plain(gen_stats)},
        extra=(str(out / "samples.parquet"), str(out / "stats.json")),
    )


@stage("direct-reward-model")
def reward_model(base: InputRef, pairs: Artefact, *, cfg: RewardModelConfig, out: Path) -> Artefact:
    """Train the RLHF reward model on the preference pairs (skipped with no pair)."""
    frame = pl.read_parquet(pairs.path)
    if frame.height == 0:
        log.warning("reward model skipped: no preference pairs")
        return Artefact(str(out), skipped="no preference pairs")
    result = train_llm_reward_model(base.path, frame, out, cfg)
    stats = {"metrics": result["metrics"], "rm_input": cfg.rm_input}
    return trained_artefact(result, out, stats, extra=(str(Path(out) / "rm_input.json"),))


@stage("direct-online-rl")
def online_rl(
    data: Artefact,
    policy: Policy,
    *,
    cfg: OnlineRLConfig,
    max_train_users: int | None,
    mapping: MappingConfig,
    reward_model: Artefact | None,
    format_bonus: float,
    out: Path,
) -> Artefact:
    """Online RL (TRL GRPO/RLOO + LoRA) from ``policy``'s adapter on the train prompts.

    The reward is NDCG@5 of the mapped answer, or, with ``reward_model``, the score of the
    reward model trained on the preference pairs (the paper's RLHF).
    """
    from tasks.llm.online_rl import train_online_rl

    windows, catalogue = load_direct(data.path)
    train = select(windows, "train", max_train_users)
    prompts = train.select(
        "prompt", "ground_truth_item_ids", "context_item_ids", "history_item_ids"
    )
    reward: Callable[..., list[float]]
    if reward_model is not None:
        reward = RewardModelScore(
            policy.base.path, reward_model.path, rm_input=reward_model.stats.get("rm_input")
        )
    else:
        reward = NDCGReward(catalogue, mapping, format_bonus)
    if cfg.batch_size > prompts.height:
        # A step takes batch_size prompts: fewer prompts than that would give no step at all.
        log.warning("online RL: %d prompts < batch_size %d; using batch_size %d",
                    prompts.height, cfg.batch_size, prompts.height)  # fmt: skip
        cfg = replace(cfg, batch_size=prompts.height)
    result = train_online_rl(
        policy.base.path, prompts, reward, Path(out), cfg, init_adapter=policy.adapter
    )
    stats = {"metrics": result.get("metrics", {}), "reference": result.get("reference")}
    return trained_artefact(result, out, stats)


def _plain(obj: Any) -> Any:
    """JSON-safe copy (floats, ints, strings, lists, dicts; NaN kept as None).

    The twin of :func:`tasks.direct.report.plain`, kept here so that an edit of the report
    leaves the stages' code version (and their cached results) alone.
    """
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    return str(obj)
