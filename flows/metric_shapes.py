"""The shapes of what the flows put into MLflow, so that its charts tell a run's story:

- a quantity measured once per round is one key with ``step = round`` (``seconds.dpo``,
  ``fig4.dlcm.ndcg_at_5``), never one key per round (``seconds.round_01.dpo``);
- a trainer's per-step figures (DPO, SFT, RL and reward-model loss) are a curve in the stage's
  child run, ``step = optimiser step``, read from TRL's log history in ``metrics.json``;
- counts of the data (users, lists, ratings) are parameters, not metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SKIP_KEYS = ("step", "epoch", "train_runtime", "total_flos")


def per_stage(seconds: Mapping[str, float], tag: str) -> dict[str, float]:
    """``{"round_01.dpo": 3.0}`` as ``{"dpo": 3.0}`` (the round becomes the step)."""
    prefix = f"{tag}."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in seconds.items()}


def step_history(metrics_json: str | Path) -> list[dict[str, Any]]:
    """TRL's log history from a trainer's ``metrics.json``: one dict per logged step."""
    try:
        history = json.loads(Path(metrics_json).read_text()).get("log_history", [])
    except (OSError, ValueError):
        return []
    return [h for h in history if "step" in h and "train_runtime" not in h]


def log_training_curve(tracker: Any, run_id: str, artefact: Any, name: str) -> int:
    """Each logged optimiser step of a trained stage (``artefact`` from
    :func:`tasks.llm.stages.trained_artefact`) as ``{name}_step.<figure>`` with ``step = the
    optimiser step``; the number of steps logged."""
    files = [f for f in getattr(artefact, "extra", ()) if str(f).endswith("metrics.json")]
    if not files:
        return 0
    history = step_history(files[0])
    for row in history:
        figures = {
            f"{name}_step.{k}": v
            for k, v in row.items()
            if k not in SKIP_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        tracker.metrics(run_id, figures, step=int(row["step"]))
    return len(history)
