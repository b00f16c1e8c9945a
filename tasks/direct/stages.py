"""The stages of the second pipeline (You et al.): evaluate, SFT, preference pairs, DPO, online RL.

Pure functions first (they take frames and return frames), then the stages
(:func:`tasks.common.stage.stage`): each reads upstream artefacts, writes files under
``runs/<run>/direct/seed_<s>/<stage>/`` and returns an :class:`Artefact`; it is served again
only when its parameters, upstream artefacts and code are unchanged.

- **evaluate**: one answer per test window with the stage's policy and the shared decoding
  settings (greedy by default), parsed and mapped (:mod:`tasks.direct.title_mapping`), scored with
  NDCG@5, Precision@5 and Recall@5 (:mod:`models.direct_metrics`) against the ground truth.
- **SFT**: (prompt, ground-truth titles as a Python list) pairs of the train windows.
- **preference pairs**: ``n`` sampled answers per train prompt from the SFT policy, scored with
  NDCG@5; ``all_pairs`` (the paper: every pair with different NDCG@5, the higher one chosen) or
  ``best_worst``.
- **DPO**: on those pairs, continuing the SFT adapter, with the SFT policy as reference.
- **online RL**: TRL GRPO/RLOO from the SFT adapter, reward = NDCG@5 of the mapped answer.
- **RLHF** (the paper's PPO row, with a reward model): a reward model (the base LLM with a
  scalar head and LoRA, TRL ``RewardTrainer``) trained on the preference pairs, then online RL
  with that model's score as the reward.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from models.direct_metrics import mean_ci, metrics_at_k
from tasks.common.io import atomic_dir, atomic_path, write_json, write_parquet
from tasks.common.stage import Artefact, InputRef, stage
from tasks.direct.baselines import BaselineConfig
from tasks.direct.title_mapping import Catalogue, MappingConfig, format_titles, mapping_counts
from tasks.direct.windows import WindowConfig, select
from tasks.llm.generate import SamplingConfig
from tasks.llm.online_rl import OnlineRLConfig
from tasks.llm.policy import Policy
from tasks.llm.sft import SFTConfig
from tasks.llm.stages import trained_artefact

log = logging.getLogger(__name__)

K = 5

# The paper's Table 1 (MovieLens-100K, Llama-3.2-1B-Instruct), in %.
PAPER_TABLE1 = {
    "Base": {"ndcg@5": 0.624, "precision@5": 0.606, "recall@5": 0.512},
    "SFT": {"ndcg@5": 1.687, "precision@5": 1.818, "recall@5": 1.441},
    "DPO": {"ndcg@5": 1.726, "precision@5": 1.890, "recall@5": 1.497},
    "RLHF": {"ndcg@5": 1.821, "precision@5": 1.818, "recall@5": 1.489},
}
ROW_NAMES = {
    "base": "Base",
    "sft": "SFT",
    "dpo": "DPO",
    "rl": "RL (NDCG@5 reward)",
    "rlhf": "RLHF (reward model)",
    "popular": "Most popular",
    "item_knn": "Item-kNN",
}
PAPER_ROW = {"base": "Base", "sft": "SFT", "dpo": "DPO", "rl": "RLHF", "rlhf": "RLHF"}

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
    by_window = {
        row["window_id"]: row
        for row in windows.select(
            "window_id", "user_id", "ground_truth_item_ids", "context_item_ids"
        ).iter_rows(named=True)
    }
    rows, answers = [], []
    for wid, sidx, text in samples.select("window_id", "sample_idx", "text").iter_rows():
        w = by_window.get(wid)
        if w is None:
            raise ValueError(f"samples: window_id {wid} is not in the windows")
        ans = catalogue.map_answer(text, mapping, context=w["context_item_ids"])
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


@dataclass(frozen=True)
class DirectPairing:
    """How the second pipeline pairs its sampled answers (see :func:`preference_pairs`)."""

    mode: Literal["all_pairs", "best_worst"] = "all_pairs"
    min_margin: float = 0.0
    max_pairs_per_prompt: int | None = None
    format_bonus: float = 0.0


def preference_pairs(
    scored: pl.DataFrame,
    windows: pl.DataFrame,
    mode: str = "all_pairs",
    min_margin: float = 0.0,
    max_pairs_per_prompt: int | None = None,
) -> pl.DataFrame:
    """Pairs of answers to the same prompt with different scores (the higher one chosen).

    Args:
        scored: per-answer frame of :func:`score_answers` (``window_id``, ``text`` and
            ``reward``, else ``ndcg``: NDCG@5, with the optional format bonus).
        windows: the windows (for the prompts).
        mode: ``all_pairs`` (the paper: every one of the n-choose-2 pairs whose scores differ)
            or ``best_worst`` (one pair per prompt: a best and a worst answer).
        min_margin: drop pairs whose NDCG@5 difference is not above this.
        max_pairs_per_prompt: keep at most this many pairs of a prompt (largest margins).

    Identical texts never form a pair. Returns ``window_id``, ``prompt``, ``chosen``,
    ``rejected``, ``chosen_score``, ``rejected_score``.
    """
    if mode not in ("all_pairs", "best_worst"):
        raise ValueError(f"pairing must be 'all_pairs' or 'best_worst', got {mode!r}")
    prompt_of = dict(zip(windows["window_id"].to_list(), windows["prompt"].to_list(), strict=True))
    out = []
    grouped = scored.sort(["window_id", "sample_idx"]).group_by("window_id", maintain_order=True)
    for (wid,), group in grouped:
        col = "reward" if "reward" in group.columns else "ndcg"
        answers = list(zip(group["text"].to_list(), group[col].to_list(), strict=True))
        pairs: list[tuple[float, str, str, float, float]] = []
        if mode == "all_pairs":
            for (ta, sa), (tb, sb) in itertools.combinations(answers, 2):
                if ta == tb or abs(sa - sb) <= min_margin:
                    continue
                (tc, sc), (tr, sr) = ((ta, sa), (tb, sb)) if sa > sb else ((tb, sb), (ta, sa))
                pairs.append((sc - sr, tc, tr, sc, sr))
        else:
            best = max(answers, key=lambda a: a[1])
            worst = min(answers, key=lambda a: a[1])
            if best[0] != worst[0] and best[1] - worst[1] > min_margin:
                pairs.append((best[1] - worst[1], best[0], worst[0], best[1], worst[1]))
        pairs.sort(key=lambda p: -p[0])
        if max_pairs_per_prompt is not None:
            pairs = pairs[:max_pairs_per_prompt]
        for _, tc, tr, sc, sr in pairs:
            out.append(
                {
                    "window_id": wid,
                    "prompt": prompt_of[wid],
                    "chosen": tc,
                    "rejected": tr,
                    "chosen_score": sc,
                    "rejected_score": sr,
                }
            )
    return pl.DataFrame(
        out,
        schema={
            "window_id": pl.Int64,
            "prompt": pl.Utf8,
            "chosen": pl.Utf8,
            "rejected": pl.Utf8,
            "chosen_score": pl.Float64,
            "rejected_score": pl.Float64,
        },
    )


def pair_stats(scored: pl.DataFrame, pairs: pl.DataFrame) -> dict[str, float]:
    """How many prompts gave pairs, and the spread of the sampled answers' NDCG@5."""
    per_prompt = scored.group_by("window_id").agg(
        pl.col("ndcg").max().alias("best"), pl.col("ndcg").min().alias("worst")
    )
    return {
        "prompts": per_prompt.height,
        "answers": scored.height,
        "pairs": pairs.height,
        "prompts_with_pairs": pairs["window_id"].n_unique() if pairs.height else 0,
        "prompts_all_zero": int((per_prompt["best"] == 0).sum()),
        "mean_ndcg": float(scored["ndcg"].mean() or 0.0),
        "mean_best_ndcg": float(per_prompt["best"].mean() or 0.0),
        "mean_margin": float((pairs["chosen_score"] - pairs["rejected_score"]).mean() or 0.0)
        if pairs.height
        else 0.0,
        # a gap above the largest format bonus can only come from NDCG@5
        "pairs_ndcg_decided": int(
            ((pairs["chosen_score"] - pairs["rejected_score"]) > MAX_FORMAT_BONUS).sum()
        ),
    }


# --------------------------------------------------------------------------- rewards


class NDCGReward:
    """Reward of an answer = NDCG@k of its mapped titles against the window's ground truth.

    Called by the online-RL trainer as ``reward(prompts, completions, extra)`` where ``extra``
    holds the per-prompt columns ``ground_truth_item_ids`` and ``context_item_ids``.
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

    def score(self, completion: str, ground_truth: Sequence[int], context: Sequence[int]) -> float:
        k = self.mapping.k
        ans = self.catalogue.map_answer(completion, self.mapping, context=context or ())
        ndcg = metrics_at_k(ans.item_ids, self.catalogue.canonical(ground_truth), k)[f"ndcg@{k}"]
        return reward_of(ndcg, ans.n_mapped, k, self.format_bonus)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], extra: dict[str, Sequence]
    ) -> list[float]:
        gts = extra["ground_truth_item_ids"]
        ctx = extra.get("context_item_ids") or [()] * len(completions)
        return [
            self.score(_as_text(c), list(g), list(x or ()))
            for c, g, x in zip(completions, gts, ctx, strict=True)
        ]


def _as_text(completion: Any) -> str:
    """A completion as text (TRL passes conversational completions as message lists)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


class RewardModelScore:
    """Reward of an answer = the scalar score of a trained reward model (the RLHF row).

    The model is the base LLM with a one-output classification head and a LoRA adapter
    (:func:`train_reward_model`); it scores the chat-formatted (prompt, answer) conversation.
    """

    def __init__(self, model: str, adapter_dir: str, batch_size: int = 8) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from tasks.rlrf4rec.prompts import load_tokenizer

        self.tok = load_tokenizer(model)
        base = AutoModelForSequenceClassification.from_pretrained(
            model, num_labels=1, dtype=torch.float32
        )
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tok.pad_token_id or self.tok.eos_token_id
        self.model = PeftModel.from_pretrained(base, adapter_dir).eval()
        self.batch_size = batch_size
        self.__name__ = "reward_model"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        texts = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                tokenize=False,
            )
            for p, c in zip(prompts, completions, strict=True)
        ]
        out: list[float] = []
        pad_side = self.tok.padding_side
        self.tok.padding_side = "right"
        try:
            for i in range(0, len(texts), self.batch_size):
                batch = self.tok(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                with torch.inference_mode():
                    logits = self.model(**batch).logits[:, 0]
                out.extend(float(x) for x in logits)
        finally:
            self.tok.padding_side = pad_side
        return out

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], extra: dict[str, Sequence]
    ) -> list[float]:
        return self.score([_as_text(p) for p in prompts], [_as_text(c) for c in completions])


@dataclass(frozen=True)
class RewardModelConfig:
    """Reward-model training (TRL ``RewardTrainer``, LoRA on the LLM); lr 5e-5 is the paper's."""

    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 1
    max_steps: int = -1
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    max_length: int = 1024
    seed: int = 0


def train_reward_model(
    model: str,
    pairs: pl.DataFrame,
    out_dir: str | Path,
    cfg: RewardModelConfig | None = None,
) -> dict[str, Any]:
    """Train a reward model on the preference pairs (TRL ``RewardTrainer``, LoRA on the LLM).

    Writes ``adapter/`` and ``metrics.json`` under ``out_dir``; returns ``{"adapter_dir",
    "metrics"}`` (pairwise training accuracy included).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from tasks.llm.dpo import assistant_messages, require_columns, user_messages
    from tasks.rlrf4rec.prompts import load_tokenizer

    c = cfg or RewardModelConfig()
    require_columns(pairs, ("prompt", "chosen", "rejected"), "pairs")
    out_dir = Path(out_dir)
    tok = load_tokenizer(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(c.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=1, dtype=torch.float32
    )
    base.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_dict(
        {
            "prompt": user_messages(pairs["prompt"].to_list()),
            "chosen": assistant_messages(pairs["chosen"].to_list()),
            "rejected": assistant_messages(pairs["rejected"].to_list()),
        }
    )
    lora = LoraConfig(
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="SEQ_CLS",
    )
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "trainer"),
            per_device_train_batch_size=c.batch_size,
            learning_rate=c.lr,
            num_train_epochs=c.epochs,
            max_steps=c.max_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=c.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            max_length=c.max_length,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=base, args=args, train_dataset=data, processing_class=tok, peft_config=lora
        )
        result = trainer.train()
        history = list(trainer.state.log_history)
        acc = [h["accuracy"] for h in history if "accuracy" in h]
        metrics = {
            "loss": float(result.training_loss),
            "accuracy": float(np.mean(acc)) if acc else float("nan"),
            "n_pairs": pairs.height,
            "steps": int(trainer.state.global_step),
            "train_seconds": time.perf_counter() - t0,
        }
        trainer.model.save_pretrained(str(tmp / "adapter"))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        (tmp / "metrics.json").write_text(
            json.dumps({"metrics": metrics, "log_history": history}, indent=2, default=str)
        )
    return {"adapter_dir": str(out_dir / "adapter"), "metrics": metrics}


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
    pairing: DirectPairing,
    out: Path,
) -> Artefact:
    """``n`` answers per train prompt from ``policy`` (SFT's), scored, turned into pairs.

    The artefact is ``out/pairs.parquet``; ``samples.parquet`` and ``stats.json`` sit beside.
    """
    windows, catalogue = load_direct(data.path)
    train = select(windows, "train", max_train_users)
    samples, gen_stats = _generate(train, policy, sampling, backend, 1)
    scored, summary = score_answers(samples, train, catalogue, mapping, pairing.format_bonus)
    pairs = preference_pairs(
        scored, train, pairing.mode, pairing.min_margin, pairing.max_pairs_per_prompt
    )
    out = Path(out)
    write_parquet(scored, out / "samples.parquet")
    write_parquet(pairs, out / "pairs.parquet")
    stats = {**pair_stats(scored, pairs), "mapping": summary}
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
    result = train_reward_model(base.path, frame, out, cfg)
    return trained_artefact(result, out, {"metrics": result["metrics"]})


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
    prompts = train.select("prompt", "ground_truth_item_ids", "context_item_ids")
    reward: Callable[..., list[float]]
    if reward_model is not None:
        reward = RewardModelScore(policy.base.path, reward_model.path)
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
    return trained_artefact(result, out, {"metrics": result.get("metrics", {})})


def _plain(obj: Any) -> Any:
    """JSON-safe copy (floats, ints, strings, lists, dicts; NaN kept as None)."""
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


# --------------------------------------------------------------------------- report

METRICS = ("ndcg@5", "precision@5", "recall@5")
RATES = ("mapped_title_rate", "parse_failure_rate")


def summarise(per_seed: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Mean, 95% CI half-width and per-seed values of every metric of every row."""
    table: dict[str, dict[str, dict]] = {}
    for row, seeds in per_seed.items():
        table[row] = {}
        for metric in METRICS + RATES:
            values = [seeds[s].get(metric) for s in sorted(seeds)]
            values = [v for v in values if v is not None]
            mean, half = mean_ci(values) if values else (float("nan"), float("nan"))
            table[row][metric] = {
                "mean": mean,
                "ci95": half,
                "per_seed": {str(s): seeds[s].get(metric) for s in sorted(seeds)},
            }
    return table


def _pct(summary: dict, n_seeds: int) -> str:
    mean, half = summary["mean"], summary["ci95"]
    if mean is None or not math.isfinite(mean):
        return "-"
    if n_seeds > 1 and half is not None and math.isfinite(half):
        return f"{100 * mean:.3f} ± {100 * half:.3f}"
    return f"{100 * mean:.3f}"


def render_report(results: dict) -> str:
    """``report.md``: the paper's Table 1 layout with our rows, the paper's numbers beside."""
    table = results["table"]
    n_seeds = len(results["seeds"])
    ci = " (mean ± 95% CI over seeds)" if n_seeds > 1 else ""
    lines = [
        "# The second pipeline (You et al.) on " + results["dataset"],
        "",
        f"Policy `{results['policy']}`; {results['test_windows']} test users evaluated per seed; "
        f"seeds {', '.join(map(str, results['seeds']))}; profile `{results['profile']}`.",
        "",
        f"## Table 1: metrics in %{ci}",
        "",
        "| Row | NDCG@5 | Precision@5 | Recall@5 | mapped-title rate | parse-failure rate "
        "| paper NDCG@5 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ("base", "sft", "dpo", "rl", "rlhf", "popular", "item_knn"):
        if row not in table:
            continue
        t = table[row]
        paper = PAPER_TABLE1.get(PAPER_ROW.get(row, ""), {}).get("ndcg@5")
        paper_txt = f"{paper:.3f}" if paper is not None else "-"
        if row == "rl":
            paper_txt += " (RLHF)"
        rates = [_pct(t[r], n_seeds) for r in RATES]
        if row in ("popular", "item_knn"):
            rates = ["n/a", "n/a"]
        lines.append(
            f"| {ROW_NAMES[row]} | "
            + " | ".join(_pct(t[m], n_seeds) for m in METRICS)
            + f" | {rates[0]} | {rates[1]} | {paper_txt} |"
        )
    lines += [
        "",
        "The paper's Table 1 (ML-100K, Llama-3.2-1B-Instruct, %): "
        + "; ".join(
            f"{row} NDCG@5 {v['ndcg@5']:.3f} / P@5 {v['precision@5']:.3f} / R@5 {v['recall@5']:.3f}"
            for row, v in PAPER_TABLE1.items()
        )
        + ".",
        "",
        "Mapped-title rate: distinct catalogue titles the answers' titles mapped to, over the "
        "titles parsed. Parse-failure rate: answers from which no title could be read. "
        "Duplicates after mapping count once; a title below the score cut-off is unmapped.",
    ]
    notes = results.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    stages = results.get("stages", {})
    if stages:
        lines += ["", "## Stage details (first seed)", ""]
        for name, info in stages.items():
            figures = ", ".join(f"{k} {v}" for k, v in info.items()) or "-"
            lines.append(f"- **{name}**: {figures}")
    timings = results.get("timings", {})
    if timings:
        lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines.append(f"| **wall (flow)** | {results.get('wall_seconds', 0.0):.1f} |")
    examples = results.get("examples") or []
    if examples:
        lines += ["", "## Sample recommendations (first test user, first seed)", ""]
        lines += ["| stage | answer (mapped titles) |", "|---|---|"]
        for stage, titles in examples:
            cell = "; ".join(t if t else "(unmapped/duplicate)" for t in titles) or "(none)"
            lines.append(f"| {stage} | {cell.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``report.md`` and ``results.json`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(render_report(results))
    write_json(_plain(results), out / "results.json")
    return {"report": str(report), "results": str(out / "results.json")}


def example_rows(stage_paths: dict[str, str], windows: pl.DataFrame) -> list[tuple[str, list]]:
    """Ground truth and each stage's mapped answer for the first evaluated test window."""
    first = select(windows, "test", 1)
    if first.height == 0:
        return []
    wid = first["window_id"][0]
    out: list[tuple[str, list]] = [("ground truth", first["ground_truth_titles"][0].to_list())]
    for name, path in stage_paths.items():
        if not path or not Path(path).is_file():
            continue
        ans = pl.read_parquet(path).filter(pl.col("window_id") == wid)
        if ans.height:
            ids, matched = ans["item_ids"][0].to_list(), ans["matched"][0].to_list()
            shown = [m if i is not None else None for i, m in zip(ids, matched, strict=True)]
            out.append((name, shown))
    return out
