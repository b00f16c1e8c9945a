"""Train and evaluate the knowledge-augmented rerankers (DLCM, PRM) on a prepared run folder.

- :func:`train_reranker` trains on the train users' lists, selects the checkpoint by validation
  MAP@5 (never test) with early stopping, and writes the model (``model.safetensors`` +
  ``config.json``) and ``train_log.json`` into ``out_dir``. All randomness comes from
  ``TrainConfig.seed``.
- :func:`evaluate_reranker` scores a split's lists and returns MAP@K / NDCG@K for K in
  {1, 3, 5, 7} plus the per-list values (for paired confidence intervals; an
  :class:`tasks.rlrf4rec.reranker_results.EvalResult`);
  :func:`tasks.rlrf4rec.reranker_results.reference_results` gives the reference rows: the
  initial (shuffled) order, a train-popularity scorer and the oracle.
- Knowledge: ``user_vectors`` (``user_id`` Int64, ``vector`` List[Float32]) gives one
  knowledge vector per user; ``None`` trains the base row without knowledge. ``item_vectors``
  (``item_id``, ``vector``) adds the adaptor's item task; the vectors are stored in the model,
  so scoring later needs only the user vectors.
- Cross-fitting for the reward (see :mod:`tasks.rlrf4rec.reward`): with ``TrainConfig.exclude_fold =
  k`` the train users of fold ``k`` (:func:`tasks.rlrf4rec.reranker_data.user_folds`) are
  left out of training.

The arrays a model reads (lists, catalogue, vectors, batches) are built by
:mod:`tasks.rlrf4rec.reranker_data`. ``data_dir`` is always the run
folder that holds ``data/`` (as :func:`tasks.data.prepare.load_prepared`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from models.base import Arch, RerankerConfig
from models.metrics import map_at_k_per_list
from models.rerankers import Reranker, build_reranker, load_reranker
from tasks.common.io import atomic_dir, write_json
from tasks.data.prepare import PreparedData, load_prepared
from tasks.rlrf4rec.knowledge_training import DrawTable, knowledge_contrast, other_user_rows
from tasks.rlrf4rec.reranker_data import (
    ItemIndex,
    VectorTable,
    build_item_index,
    catalogue_vectors,
    list_arrays,
    make_batch,
    predict_scores,
    user_folds,
)
from tasks.rlrf4rec.reranker_results import EvalResult, evaluate_scores, split_lists

log = logging.getLogger(__name__)

SELECT_METRIC = "map@5"
TRAIN_LOG = "train_log.json"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """How a reranker is trained.

    The defaults are a fast CPU setting; :meth:`paper` gives the paper's (batch 64, lr 1e-3,
    50 epochs) on KAR's architecture (``arch="kar"``, dropout 0, PRM MLP (200, 80)).

    Attributes:
        backbone: ``"dlcm"`` or ``"prm"``.
        epochs: maximum epochs.
        batch_size: lists per optimiser step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        patience: stop after this many epochs without a better validation MAP@5.
        seed: the one seed of initialisation, shuffling and dropout.
        dropout: backbone and adaptor dropout.
        arch: ``"default"`` (this project's first backbones) or ``"kar"`` (KAR's code; see
            :data:`models.base.Arch`).
        embed_dim, hidden, n_heads, mlp, n_shared, n_specific, expert_hidden, expert_out:
            model shape (:class:`models.base.RerankerConfig`).
        eval_batch_size: lists per forward pass when scoring.
        exclude_fold: leave the train users of this fold out of training (reward cross-fitting).
        n_folds, fold_seed: the fold assignment (:func:`user_folds`).
        num_threads: torch intra-op threads while training (None = leave as is).
        knowledge_draws: ``user_vectors`` may hold several vectors per user; each training
            list reads one drawn at random every epoch (:mod:`tasks.rlrf4rec.knowledge_training`).
        contrastive: weight of the knowledge-contrastive term (0 = off; same module).
    """

    backbone: Literal["dlcm", "prm"] = "dlcm"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 4
    seed: int = 0
    dropout: float = 0.1
    arch: Arch = "default"
    embed_dim: int = 32
    hidden: int = 64
    n_heads: int = 2
    mlp: tuple[int, ...] = (64,)
    n_shared: int = 2
    n_specific: int = 6
    expert_hidden: int = 128
    expert_out: int = 32
    eval_batch_size: int = 4096
    exclude_fold: int | None = None
    n_folds: int = 2
    fold_seed: int = 0
    num_threads: int | None = None
    knowledge_draws: bool = False
    contrastive: float = 0.0

    def __post_init__(self) -> None:
        if self.backbone not in ("dlcm", "prm"):
            raise ValueError(f"TrainConfig.backbone must be 'dlcm' or 'prm', got {self.backbone!r}")
        for name in ("epochs", "batch_size", "patience", "eval_batch_size", "n_folds"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not self.contrastive >= 0:
            raise ValueError(f"TrainConfig.contrastive must be >= 0, got {self.contrastive}")
        if self.exclude_fold is not None and not 0 <= self.exclude_fold < self.n_folds:
            raise ValueError(
                f"TrainConfig.exclude_fold must be in [0, n_folds={self.n_folds}), "
                f"got {self.exclude_fold}"
            )
        object.__setattr__(self, "mlp", tuple(int(m) for m in self.mlp))

    @classmethod
    def paper(cls, backbone: Literal["dlcm", "prm"], **overrides) -> TrainConfig:
        """The paper's reward-model settings: batch 64, lr 1e-3, 50 epochs (patience 10), on
        KAR's backbones as KAR's ``RS/main_rerank.py`` builds them: ``arch="kar"``, dropout 0
        everywhere (KAR's ``--dropout``, ``--convert_dropout``, ``--attn_dp`` defaults), PRM
        MLP (200, 80) (``--final_mlp_arch``); widths as today (embed 32, GRU 64, 2 heads,
        adaptor 2 shared + 6 specific experts 128 -> 32)."""
        kw = {"backbone": backbone, "epochs": 50, "batch_size": 64, "lr": 1e-3, "patience": 10}
        kw |= {"arch": "kar", "dropout": 0.0, "mlp": (200, 80)}
        kw.update(overrides)
        return cls(**kw)

    def model_config(
        self, n_items: int, n_genres: int, user_dim: int, item_dim: int, genre_names=()
    ) -> RerankerConfig:
        return RerankerConfig(
            backbone=self.backbone,
            n_items=n_items,
            n_genres=n_genres,
            embed_dim=self.embed_dim,
            user_dim=user_dim,
            item_dim=item_dim,
            n_shared=self.n_shared,
            n_specific=self.n_specific,
            expert_hidden=self.expert_hidden,
            expert_out=self.expert_out,
            hidden=self.hidden,
            n_heads=self.n_heads,
            mlp=self.mlp,
            dropout=self.dropout,
            arch=self.arch,
            genre_names=tuple(genre_names),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp"] = list(self.mlp)
        return d


# --------------------------------------------------------------------------- data


def training_lists(data: PreparedData, cfg: TrainConfig) -> pl.DataFrame:
    """The lists a reranker trains on: the train split, less fold ``cfg.exclude_fold``."""
    lists = data.lists.filter(pl.col("split") == "train")
    if cfg.exclude_fold is not None:
        folds = user_folds(data.users, cfg.n_folds, cfg.fold_seed)
        held = folds.filter(pl.col("fold") == cfg.exclude_fold)["user_id"]
        lists = lists.filter(~pl.col("user_id").is_in(held.implode()))
    return lists


# --------------------------------------------------------------------------- training


def _set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic torch kernels inside the block, the caller's setting restored after.

    With more than one intra-op thread some CPU backward kernels sum in a scheduling-dependent
    order: two trainings with the same seed then differ by about 1e-7 in the weights, which is
    enough to flip near-tied reward scores and so the chosen/rejected pairs. Measured here on
    the quick profile's reward model: 2 threads gave weight differences up to 4.8e-7 between
    identical runs, 0.0 in this mode.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@deterministic_torch()
def train_reranker(
    data_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    user_vectors: pl.DataFrame | None = None,
    item_vectors: pl.DataFrame | None = None,
    show_progress: bool = False,
) -> dict:
    """Train a reranker and write it to ``out_dir`` (replaced atomically when complete).

    Args:
        data_dir: run folder holding ``data/``.
        out_dir: where the model (``model.safetensors``, ``config.json``) and
            ``train_log.json`` go.
        cfg: training settings.
        user_vectors: ``user_id`` Int64, ``vector`` List[Float32]: one knowledge vector per
            user of the train (and valid) lists; None trains the base row without knowledge.
        item_vectors: ``item_id``, ``vector``: item knowledge vectors for every catalogue
            item (same width as the user vectors); None leaves out the adaptor's item task.
        show_progress: show a progress bar over epochs.

    Returns:
        ``best_epoch``, ``epochs_run``, ``valid`` (metrics of the selected checkpoint on the
        valid split), ``seconds_per_epoch`` (training passes only), ``train_lists``,
        ``model_dir``.
    """
    if item_vectors is not None and user_vectors is None:
        raise ValueError("item_vectors needs user_vectors (item knowledge alone is not a row)")
    started = time.perf_counter()
    data = load_prepared(data_dir)
    catalogue = build_item_index(data.items)
    train = list_arrays(training_lists(data, cfg))
    valid = list_arrays(split_lists(data, "valid"))
    if train.n == 0:
        raise ValueError(f"{data_dir}: no training lists (split 'train' after fold exclusion)")
    if valid.n == 0:
        raise ValueError(f"{data_dir}: no validation lists; prepare with --valid-frac > 0")

    users = train_rows = valid_rows = table = None
    user_dim = item_dim = 0
    item_matrix = None
    if user_vectors is not None:
        table = (
            DrawTable(user_vectors)
            if cfg.knowledge_draws
            else VectorTable(user_vectors, "user_id", "user_vectors")
        )
        users, user_dim = table.matrix, table.dim
        train_rows, valid_rows = table.rows(train.user_id), table.rows(valid.user_id)
        if item_vectors is not None:
            item_matrix = catalogue_vectors(item_vectors, catalogue)
            item_dim = item_matrix.shape[1]

    gen = _set_seed(cfg.seed)
    prev_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model = build_reranker(
        cfg.model_config(
            len(catalogue.item_ids),
            len(catalogue.genre_names),
            user_dim,
            item_dim,
            catalogue.genre_names,
        )
    )
    model.set_catalogue(
        catalogue.item_ids,
        catalogue.item_genre,
        torch.from_numpy(item_matrix) if item_matrix is not None else None,
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels_t = torch.from_numpy(train.labels)
    draws = np.random.default_rng(cfg.seed)

    history: list[dict] = []
    best_score, best_epoch, best_state = -math.inf, 0, None
    train_seconds = 0.0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {cfg.backbone}", disable=not show_progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            model.train()
            if cfg.knowledge_draws and isinstance(table, DrawTable):
                train_rows = table.draw_rows(train.user_id, draws)
            perm = torch.randperm(train.n, generator=gen).numpy()
            total, steps = 0.0, 0
            for start in range(0, train.n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                if len(idx) == 1 and cfg.arch == "kar":
                    continue  # BatchNorm of a final state needs 2 lists (KAR would raise)
                rows = train_rows[idx] if train_rows is not None else None
                scores = model(make_batch(train.item_ids[idx], rows, users))
                loss = model.loss(scores, labels_t[idx])
                if cfg.contrastive and rows is not None:
                    other, differs = other_user_rows(rows, train.user_id[idx])
                    other_scores = model(make_batch(train.item_ids[idx], other, users))
                    contrast = knowledge_contrast(
                        scores, other_scores, labels_t[idx], torch.from_numpy(differs)
                    )
                    loss = loss + cfg.contrastive * contrast
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
            t_train = time.perf_counter() - t0
            train_seconds += t_train
            vscores = predict_scores(model, valid.item_ids, users, valid_rows, cfg.eval_batch_size)
            vmap = float(map_at_k_per_list(valid.labels, vscores, 5).mean())
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": total / max(steps, 1),
                    "valid_map@5": vmap,
                    "train_seconds": t_train,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.set_postfix(loss=f"{total / max(steps, 1):.4f}", valid_map5=f"{vmap:.4f}")
            log.debug("epoch %d loss %.4f valid map@5 %.4f", epoch, total / steps, vmap)
            if vmap > best_score:
                best_score, best_epoch = vmap, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    finally:
        if cfg.num_threads:
            torch.set_num_threads(prev_threads)
    model.load_state_dict(best_state)
    vscores = predict_scores(model, valid.item_ids, users, valid_rows, cfg.eval_batch_size)
    valid_metrics = evaluate_scores(cfg.backbone, "valid", valid, vscores).metrics
    summary = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "valid": valid_metrics,
        "seconds_per_epoch": train_seconds / max(len(history), 1),
        "seconds_total": time.perf_counter() - started,
        "train_lists": train.n,
        "valid_lists": valid.n,
        "knowledge": user_dim > 0,
        "item_knowledge": item_dim > 0,
        "model_dir": str(out_dir),
    }
    train_log = {"summary": summary, "config": cfg.to_dict(), "history": history}
    with atomic_dir(Path(out_dir)) as tmp:
        model.save(tmp)
        write_json(train_log, tmp / TRAIN_LOG)
    log.info(
        "trained %s%s: best epoch %d, valid map@5 %.4f, %.1f s/epoch",
        cfg.backbone,
        "+knowledge" if user_dim else "",
        best_epoch,
        valid_metrics[SELECT_METRIC],
        summary["seconds_per_epoch"],
    )
    return summary


# --------------------------------------------------------------------------- evaluation


def load_model_with_items(model_dir: Path, item_vectors: pl.DataFrame | None) -> Reranker:
    """Load a reranker; ``item_vectors`` (optional) replaces the item vectors it stores."""
    model = load_reranker(model_dir)
    if item_vectors is not None:
        if not model.cfg.item_dim:
            raise ValueError(f"item_vectors given but {model_dir} has no item knowledge")
        vocab = model.item_vocab.numpy()
        cat = ItemIndex(vocab, model.item_genre[1:].numpy(), list(model.cfg.genre_names))
        matrix = catalogue_vectors(item_vectors, cat)
        if matrix.shape[1] != model.cfg.item_dim:
            raise ValueError(
                f"item_vectors have width {matrix.shape[1]}, the model expects {model.cfg.item_dim}"
            )
        model.set_catalogue(vocab, cat.item_genre, torch.from_numpy(matrix))
    model.eval()
    return model


def evaluate_reranker(
    model_dir: Path,
    data_dir: Path,
    user_vectors: pl.DataFrame | None = None,
    item_vectors: pl.DataFrame | None = None,
    split: str = "test",
    name: str | None = None,
    batch_size: int = 4096,
) -> EvalResult:
    """Evaluate a saved reranker on a split's lists.

    Args:
        model_dir: folder written by :func:`train_reranker`.
        data_dir: run folder holding ``data/``.
        user_vectors: one vector per user of the split; required by knowledge models, an
            error for base models.
        item_vectors: replaces the item vectors stored in the model (optional).
        split: ``test`` (default), ``valid`` or ``train``.
        name: the result's name (default: backbone, ``+knowledge`` for knowledge models).
        batch_size: lists per forward pass.
    """
    model = load_model_with_items(Path(model_dir), item_vectors)
    data = load_prepared(data_dir)
    arrays = list_arrays(split_lists(data, split))
    users = rows = None
    if model.cfg.knowledge:
        if user_vectors is None:
            raise ValueError(f"{model_dir} reads user knowledge: pass user_vectors")
        table = VectorTable(user_vectors, "user_id", "user_vectors")
        if table.dim != model.cfg.user_dim:
            raise ValueError(
                f"user_vectors have width {table.dim}, the model expects {model.cfg.user_dim}"
            )
        users, rows = table.matrix, table.rows(arrays.user_id)
    elif user_vectors is not None:
        raise ValueError(f"{model_dir} is a base model (no knowledge) but user_vectors was given")
    scores = predict_scores(model, arrays.item_ids, users, rows, batch_size)
    label = name or (model.cfg.backbone + ("+knowledge" if model.cfg.knowledge else ""))
    return evaluate_scores(label, split, arrays, scores)
