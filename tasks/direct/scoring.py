"""Scoring the second pipeline's answers: load a direct data folder, parse and map answers,
NDCG@5 / Precision@5 / Recall@5 against the ground truth, the reward (NDCG@5 plus an optional
format bonus) of DPO pairing and online RL, the SFT examples and the preference-pair statistics.

Pure functions over frames; the stages of :mod:`tasks.direct.stages` call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from models.direct_metrics import metrics_at_k
from tasks.direct.title_mapping import Catalogue, MappingConfig, format_titles, mapping_counts
from tasks.llm.reward_model import completion_text

K = 5

ANSWER_SCHEMA = {
    "window_id": pl.Int64,
    "user_id": pl.Int64,
    "sample_idx": pl.Int64,
    "text": pl.Utf8,
    "format": pl.Utf8,
    "titles": pl.List(pl.Utf8),
    "item_ids": pl.List(pl.Int64),
    "matched": pl.List(pl.Utf8),
    "n_mapped": pl.Int64,
    "n_unmapped": pl.Int64,
    "n_duplicates": pl.Int64,
    "n_repeats": pl.Int64,
    "ndcg": pl.Float64,
    "precision": pl.Float64,
    "recall": pl.Float64,
    "reward": pl.Float64,
}

# The smallest gap between two different NDCG@5 values (binary relevance, |truth| <= 5) is
# 0.00603: a format bonus up to this keeps every NDCG@5 difference decisive and only breaks ties.
MAX_FORMAT_BONUS = 0.005


# --------------------------------------------------------------------------- loading


def load_direct(data_path: str | Path) -> tuple[pl.DataFrame, Catalogue]:
    """Windows and catalogue of a folder written by :func:`tasks.direct.windows.prepare_direct`."""
    folder = Path(data_path)
    if not (folder / "windows.parquet").is_file():
        raise FileNotFoundError(f"{folder}: no windows.parquet (run the direct data stage first)")
    windows = pl.read_parquet(folder / "windows.parquet")
    catalogue = Catalogue.from_items(pl.read_parquet(folder / "items.parquet"))
    return windows, catalogue


# --------------------------------------------------------------------------- scoring answers


def score_answers(
    samples: pl.DataFrame,
    windows: pl.DataFrame,
    catalogue: Catalogue,
    mapping: MappingConfig | None = None,
    format_bonus: float = 0.0,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Parse, map and score every answer of ``samples`` (``window_id``, ``sample_idx``, ``text``).

    Returns the per-answer frame (``ANSWER_SCHEMA``) and a summary: mean NDCG@k, Precision@k,
    Recall@k over the answers and every count of :func:`tasks.direct.title_mapping.mapping_counts`.
    ``reward`` is NDCG@k plus ``format_bonus`` times the share of the k slots filled with
    distinct catalogue titles (:func:`reward_of`).
    """
    mapping = mapping or MappingConfig()
    check_format_bonus(format_bonus)
    k = mapping.k
    by_window = {row["window_id"]: row for row in _mapping_inputs(windows).iter_rows(named=True)}
    rows, answers = [], []
    for wid, sidx, text in samples.select("window_id", "sample_idx", "text").iter_rows():
        w = by_window.get(wid)
        if w is None:
            raise ValueError(f"samples: window_id {wid} is not in the windows")
        ans = catalogue.map_answer(
            text, mapping, context=w["prompt_item_ids"], history=w["history_item_ids"]
        )
        answers.append(ans)
        m = metrics_at_k(ans.item_ids, catalogue.canonical(w["ground_truth_item_ids"]), k)
        rows.append(
            {
                "window_id": wid,
                "user_id": w["user_id"],
                "sample_idx": sidx,
                "text": text,
                "format": ans.fmt,
                "titles": ans.titles,
                "item_ids": ans.item_ids,
                "matched": ans.matched,
                "n_mapped": ans.n_mapped,
                "n_unmapped": ans.n_unmapped,
                "n_duplicates": ans.n_duplicates,
                "n_repeats": ans.n_repeats,
                "ndcg": m[f"ndcg@{k}"],
                "precision": m[f"precision@{k}"],
                "recall": m[f"recall@{k}"],
                "reward": reward_of(m[f"ndcg@{k}"], ans.n_mapped, k, format_bonus),
            }
        )
    frame = pl.DataFrame(rows, schema=ANSWER_SCHEMA)
    summary: dict[str, float] = {
        f"ndcg@{k}": float(frame["ndcg"].mean() or 0.0),
        f"precision@{k}": float(frame["precision"].mean() or 0.0),
        f"recall@{k}": float(frame["recall"].mean() or 0.0),
    }
    summary.update(mapping_counts(answers, k))
    return frame, summary


def _mapping_inputs(windows: pl.DataFrame) -> pl.DataFrame:
    """Per window: its ground truth, the prompt's own movies and the movies rated before it.

    The prompt's movies are the liked and hated ones it shows (the window's ratings when those
    columns are absent); the history is every movie rated before the window's end (the window
    itself when ``history_item_ids`` is absent).
    """
    cols = set(windows.columns)
    shown = (
        pl.concat_list("liked_item_ids", "hated_item_ids")
        if {"liked_item_ids", "hated_item_ids"} <= cols
        else pl.col("context_item_ids")
    )
    history = pl.col("history_item_ids") if "history_item_ids" in cols else shown
    return windows.select(
        "window_id",
        "user_id",
        "ground_truth_item_ids",
        shown.alias("prompt_item_ids"),
        pl.concat_list(history, "context_item_ids").alias("history_item_ids"),
    )


def score_lists(
    recommended: Sequence[Sequence[int]],
    windows: pl.DataFrame,
    catalogue: Catalogue,
    k: int = K,
) -> dict[str, float]:
    """Mean metrics of id lists (the reference recommenders) on ``windows``' ground truth."""
    gts = [catalogue.canonical(g) for g in windows["ground_truth_item_ids"].to_list()]
    rows = [
        metrics_at_k(catalogue.canonical(r), g, k) for r, g in zip(recommended, gts, strict=True)
    ]
    keys = (f"ndcg@{k}", f"precision@{k}", f"recall@{k}")
    out = {key: float(np.mean([r[key] for r in rows])) if rows else 0.0 for key in keys}
    out.update(
        answers=len(rows),
        parse_failure_rate=0.0,
        mapped_title_rate=1.0,
        repeat_share=0.0,
        slot_fill_rate=float(np.mean([len(r) for r in recommended]) / k) if rows else 0.0,
    )
    return out


def check_format_bonus(format_bonus: float) -> None:
    if not 0.0 <= format_bonus <= MAX_FORMAT_BONUS:
        raise ValueError(
            f"format_bonus must be in [0, {MAX_FORMAT_BONUS}] (above that it could outweigh an "
            f"NDCG@5 difference), got {format_bonus}"
        )


def reward_of(ndcg: float, n_mapped: int, k: int = K, format_bonus: float = 0.0) -> float:
    """NDCG@k, plus ``format_bonus`` x (distinct mapped titles / k) to break NDCG ties.

    With ``format_bonus`` 0 (the paper) this is NDCG@k itself. A small bonus ranks, among
    answers with the same NDCG@k (typically all 0 for a small model), the ones that follow the
    list format with real catalogue titles higher: DPO then gets pairs and RL a gradient.
    """
    return ndcg + format_bonus * min(n_mapped, k) / k


# --------------------------------------------------------------------------- SFT and pairs


def sft_examples(windows: pl.DataFrame) -> pl.DataFrame:
    """``prompt`` and ``completion`` (the ground-truth titles as a Python list of strings)."""
    return windows.select(
        "prompt",
        pl.col("ground_truth_titles")
        .map_elements(lambda t: format_titles(list(t)), return_dtype=pl.Utf8)
        .alias("completion"),
    )


def pair_stats(
    scored: pl.DataFrame, pairs: pl.DataFrame, key: str = "window_id"
) -> dict[str, float]:
    """How many prompts gave pairs, and the spread of the sampled answers' NDCG@5.

    ``pairs`` follows :func:`tasks.pairing.pair_schema` of ``key`` (its ``margin`` is the
    reward difference, format bonus included).
    """
    per_prompt = scored.group_by(key).agg(
        pl.col("ndcg").max().alias("best"), pl.col("ndcg").min().alias("worst")
    )
    return {
        "prompts": per_prompt.height,
        "answers": scored.height,
        "pairs": pairs.height,
        "prompts_with_pairs": pairs[key].n_unique() if pairs.height else 0,
        "prompts_all_zero": int((per_prompt["best"] == 0).sum()),
        "mean_ndcg": float(scored["ndcg"].mean() or 0.0),
        "mean_best_ndcg": float(per_prompt["best"].mean() or 0.0),
        "mean_margin": float(pairs["margin"].mean() or 0.0) if pairs.height else 0.0,
        # a gap above the largest format bonus can only come from NDCG@5
        "pairs_ndcg_decided": int((pairs["margin"] > MAX_FORMAT_BONUS).sum()),
    }


# --------------------------------------------------------------------------- rewards


class NDCGReward:
    """Reward of an answer = NDCG@k of its mapped titles against the window's ground truth.

    Called by the online-RL trainer as ``reward(prompts, completions, extra)`` where ``extra``
    holds the per-prompt columns ``ground_truth_item_ids``, ``context_item_ids`` and, where
    given, ``history_item_ids`` (excluded at mapping together with the context, by default).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        mapping: MappingConfig | None = None,
        format_bonus: float = 0.0,
    ) -> None:
        check_format_bonus(format_bonus)
        self.catalogue = catalogue
        self.mapping = mapping or MappingConfig()
        self.format_bonus = format_bonus
        self.__name__ = f"ndcg@{self.mapping.k}"

    def score(
        self,
        completion: str,
        ground_truth: Sequence[int],
        context: Sequence[int],
        history: Sequence[int] = (),
    ) -> float:
        k = self.mapping.k
        ans = self.catalogue.map_answer(
            completion, self.mapping, context=context or (), history=history or ()
        )
        ndcg = metrics_at_k(ans.item_ids, self.catalogue.canonical(ground_truth), k)[f"ndcg@{k}"]
        return reward_of(ndcg, ans.n_mapped, k, self.format_bonus)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], extra: dict[str, Sequence]
    ) -> list[float]:
        gts = extra["ground_truth_item_ids"]
        ctx = extra.get("context_item_ids") or [()] * len(completions)
        hist = extra.get("history_item_ids") or [()] * len(completions)
        return [
            self.score(completion_text(c), list(g), list(x or ()), list(h or ()))
            for c, g, x, h in zip(completions, gts, ctx, hist, strict=True)
        ]
