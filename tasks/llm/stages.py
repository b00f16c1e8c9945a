"""The policy-training stage both pipelines share: LoRA-DPO on preference pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from tasks.common.stage import Artefact, stage
from tasks.llm.dpo import DPOConfig
from tasks.llm.policy import Policy

log = logging.getLogger(__name__)


@stage("dpo")
def dpo(policy: Policy, pairs: Artefact, *, cfg: DPOConfig, out: Path) -> Artefact:
    """LoRA-DPO of ``policy`` on ``pairs`` (``prompt``, ``chosen``, ``rejected``), continuing its
    adapter: ``out`` holds ``adapter/`` (the artefact's path), ``metrics.json``, ``config.json``
    and, with ``cfg.merge``, ``merged/``.

    A sampler may later write a merged checkpoint into ``out/merged`` itself; it is not one of
    this stage's outputs, so it does not invalidate them. With no pair, nothing is trained: the
    result is ``skipped`` and the policy stays as it was (:meth:`Policy.after`).
    """
    from tasks.llm.dpo import train_dpo

    frame = pl.read_parquet(pairs.path)
    if frame.height == 0:
        log.warning("%s: no preference pairs (all dropped); the policy is unchanged", pairs.path)
        return Artefact(str(out), skipped="no preference pairs")
    result = train_dpo(
        policy.base.path,
        frame.select("prompt", "chosen", "rejected"),
        Path(out),
        cfg,
        init_adapter=policy.adapter,
    )
    return trained_artefact(result, out)


def trained_artefact(
    result: dict[str, Any],
    out: str | Path,
    stats: dict[str, Any] | None = None,
    extra: tuple[str, ...] = (),
) -> Artefact:
    """The artefact of a LoRA trainer's ``out``: ``adapter/`` (its path), the ``metrics.json``,
    ``config.json`` and ``merged/`` it wrote, and ``stats`` (default ``{"metrics": ...}``)."""
    out = Path(out)
    files = [str(out / name) for name in ("metrics.json", "config.json") if (out / name).exists()]
    if result.get("merged_dir"):
        files.append(str(out / "merged"))
    stats = stats if stats is not None else {"metrics": result.get("metrics", {})}
    return Artefact(
        str(out / "adapter"),
        stats=json.loads(json.dumps(stats, default=str)),
        extra=(*files, *extra),
    )


@stage("log-ratios")
def log_ratios(policy: Policy, texts: Artefact, *, out: Path) -> Artefact:
    """Each text's summed log-probability under ``policy`` and under its base model (the
    reference of DPO's default), and its token count: ``texts`` (``prompt``, ``text`` and any
    id columns) with ``logp_policy``, ``logp_ref`` and ``n_tokens`` added (fp32)."""
    from tasks.common.io import write_parquet
    from tasks.llm.dpo import completion_token_logps, policy_and_reference_logps

    frame = pl.read_parquet(texts.path)
    prompts, answers = frame["prompt"].to_list(), frame["text"].to_list()
    base = policy.base.path
    if policy.adapter:
        mine, ref, n_tokens = policy_and_reference_logps(base, policy.adapter, prompts, answers)
    else:  # an untrained policy is its own reference
        mine, n_tokens = completion_token_logps(base, prompts, answers)
        ref = mine
    frame = frame.with_columns(
        pl.Series("logp_policy", mine, dtype=pl.Float64),
        pl.Series("logp_ref", ref, dtype=pl.Float64),
        pl.Series("n_tokens", n_tokens, dtype=pl.Int64),
    )
    write_parquet(frame, Path(out))
    return Artefact(str(out), stats={"texts": frame.height})
