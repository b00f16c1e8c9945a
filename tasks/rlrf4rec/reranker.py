"""Train and evaluate the knowledge-augmented rerankers (DLCM, PRM) on a prepared run folder.

- :func:`train_reranker` trains on the train users' lists, selects the checkpoint by validation
  MAP@5 (never test) with early stopping, and writes the model (``model.safetensors`` +
  ``config.json``) and ``train_log.json`` into ``out_dir``. All randomness comes from
  ``TrainConfig.seed``.
- :func:`evaluate_reranker` scores a split's lists and returns MAP@K / NDCG@K for K in
  {1, 3, 5, 7} plus the per-list values (for paired confidence intervals);
  :func:`reference_results` gives the reference rows: the initial (shuffled) order, a
  train-popularity scorer and the oracle.
- Knowledge: ``user_vectors`` (``user_id`` Int64, ``vector`` List[Float32]) gives one
  knowledge vector per user; ``None`` trains the base row without knowledge. ``item_vectors``
  (``item_id``, ``vector``) adds the adaptor's item task; the vectors are stored in the model,
  so scoring later needs only the user vectors.
- Cross-fitting for the reward (see :mod:`tasks.rlrf4rec.reward`): with ``TrainConfig.exclude_fold =
  k`` the train users of fold ``k`` (:func:`user_folds`) are left out of training.


``data_dir`` is always the run folder that holds ``data/`` (as
:func:`tasks.data.prepare.load_prepared`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from models.base import Arch, RerankerConfig
from models.metrics import KS, map_at_k_per_list, metrics_per_list
from models.rerankers import Reranker, build_reranker, load_reranker
from tasks.common.io import atomic_dir, write_json, write_parquet
from tasks.data.prepare import PreparedData, load_prepared
from tasks.rlrf4rec.encode import frame_vectors
from tasks.rlrf4rec.knowledge_training import DrawTable, knowledge_contrast, other_user_rows

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
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


@dataclass
class ItemIndex:
    """Item vocabulary of a run: sorted ids, first-genre index per item, genre names."""

    item_ids: np.ndarray  # [n_items] int64, increasing
    item_genre: np.ndarray  # [n_items] int64, 0 = no genre
    genre_names: list[str]


def build_item_index(items: pl.DataFrame) -> ItemIndex:
    """The catalogue of ``items.parquet``; an item's genre is the first of its ``genres``."""
    items = items.sort("item_id")
    first = items["genres"].list.first().fill_null("").to_list()
    names = sorted({g for g in first if g})
    index = {g: i + 1 for i, g in enumerate(names)}
    genre = np.array([index.get(g, 0) for g in first], dtype=np.int64)
    return ItemIndex(items["item_id"].to_numpy().astype(np.int64), genre, names)


@dataclass
class ListArrays:
    """A set of lists as arrays: ``item_ids`` / ``labels`` ``[N, L]``, ids ``[N]``."""

    list_id: np.ndarray
    user_id: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return int(self.list_id.shape[0])


def list_arrays(lists: pl.DataFrame) -> ListArrays:
    """Arrays of a ``lists.parquet`` frame (its order kept; lists must share one length)."""
    n = lists.height
    if n == 0:
        empty = np.zeros((0, 0), dtype=np.int64)
        return ListArrays(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, empty)
    lengths = lists["item_ids"].list.len()
    if lengths.min() != lengths.max():
        raise ValueError("lists must all have the same length")
    width = int(lengths[0])
    items = lists["item_ids"].explode().to_numpy().astype(np.int64).reshape(n, width)
    labels = lists["labels"].explode().to_numpy().astype(np.float32).reshape(n, width)
    return ListArrays(
        lists["list_id"].to_numpy().astype(np.int64),
        lists["user_id"].to_numpy().astype(np.int64),
        items,
        labels,
    )


def user_folds(users: pl.DataFrame, n_folds: int = 2, seed: int = 0) -> pl.DataFrame:
    """Assign every non-test user to one of ``n_folds`` folds (seeded, balanced).

    Args:
        users: ``users.parquet`` (``user_id``, ``split``).
        n_folds: number of folds (>= 1).
        seed: seed of the permutation of the sorted user ids.

    Returns:
        ``user_id`` Int64, ``split`` Utf8, ``fold`` Int64 for the train and valid users.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    part = users.filter(pl.col("split") != "test").sort("user_id").select("user_id", "split")
    perm = np.random.default_rng(seed).permutation(part.height)
    fold = np.empty(part.height, dtype=np.int64)
    fold[perm] = np.arange(part.height) % n_folds
    return part.with_columns(pl.Series("fold", fold, dtype=pl.Int64))


def training_lists(data: PreparedData, cfg: TrainConfig) -> pl.DataFrame:
    """The lists a reranker trains on: the train split, less fold ``cfg.exclude_fold``."""
    lists = data.lists.filter(pl.col("split") == "train")
    if cfg.exclude_fold is not None:
        folds = user_folds(data.users, cfg.n_folds, cfg.fold_seed)
        held = folds.filter(pl.col("fold") == cfg.exclude_fold)["user_id"]
        lists = lists.filter(~pl.col("user_id").is_in(held.implode()))
    return lists


# --------------------------------------------------------------------------- vectors


class VectorTable:
    """Knowledge vectors keyed by id: ``matrix`` ``[n, dim]`` and ``rows(ids)``."""

    def __init__(self, frame: pl.DataFrame, id_col: str, what: str) -> None:
        if id_col not in frame.columns or "vector" not in frame.columns:
            raise ValueError(
                f"{what} must have columns {id_col!r} and 'vector', got {frame.columns}"
            )
        if frame[id_col].is_duplicated().any():
            dup = frame.filter(pl.col(id_col).is_duplicated())[id_col].unique().to_list()[:5]
            raise ValueError(f"{what} has more than one vector for {id_col} {dup}")
        self.what = what
        self.ids = frame[id_col].to_numpy().astype(np.int64)
        self.matrix = frame_vectors(frame, "vector")
        if not np.isfinite(self.matrix).all():
            raise ValueError(f"{what} holds non-finite values")
        order = np.argsort(self.ids)
        self._sorted, self._order = self.ids[order], order

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``matrix``; raises naming the ids that have no vector."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids).clip(max=max(len(self._sorted) - 1, 0))
        ok = (self._sorted[pos] == ids) if len(self._sorted) else np.zeros(len(ids), bool)
        if not ok.all():
            missing = np.unique(ids[~ok])
            raise ValueError(
                f"{self.what} has no vector for {len(missing)} ids, e.g. {missing[:5].tolist()}"
            )
        return self._order[pos]


def _item_matrix(item_vectors: pl.DataFrame, catalogue: ItemIndex) -> np.ndarray:
    table = VectorTable(item_vectors, "item_id", "item_vectors")
    return table.matrix[table.rows(catalogue.item_ids)]


# --------------------------------------------------------------------------- scoring


def make_batch(
    items: np.ndarray, user_rows: np.ndarray | None, users: np.ndarray | None
) -> dict[str, torch.Tensor]:
    """A model batch for lists ``items`` ``[b, L]`` whose users are ``user_rows`` of ``users``."""
    batch = {"item_ids": torch.from_numpy(items)}
    if users is not None and user_rows is not None:
        uniq, inv = np.unique(user_rows, return_inverse=True)
        batch["user_vec"] = torch.from_numpy(users[uniq])
        batch["user_index"] = torch.from_numpy(inv.astype(np.int64))
    return batch


@torch.inference_mode()
def predict_scores(
    model: Reranker,
    item_ids: np.ndarray,
    users: np.ndarray | None = None,
    user_rows: np.ndarray | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Scores of lists with a model in eval mode.

    Args:
        model: the reranker.
        item_ids: ``[N, L]`` raw item ids.
        users: ``[U, dim]`` user knowledge vectors (knowledge models).
        user_rows: ``[N]`` row of ``users`` for each list.
        batch_size: lists per forward pass.

    Returns:
        ``[N, L]`` float32 logits.
    """
    if model.cfg.knowledge and (users is None or user_rows is None):
        raise ValueError("this model reads user knowledge: pass user vectors")
    was_training = model.training
    model.eval()
    out = np.zeros(item_ids.shape, dtype=np.float32)
    for start in range(0, item_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        rows = user_rows[sl] if user_rows is not None else None
        out[sl] = model(make_batch(item_ids[sl], rows, users)).float().numpy()
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Metrics of one system on one split.

    Attributes:
        name: the system (``"dlcm"``, ``"prm+knowledge"``, ``"popularity"``, ...).
        split: ``train`` / ``valid`` / ``test``.
        metrics: ``{"map@1": ..., "ndcg@7": ...}`` means over lists.
        per_list: ``list_id``, ``user_id`` and one column per metric, one row per list.
    """

    name: str
    split: str
    metrics: dict[str, float]
    per_list: pl.DataFrame = field(repr=False)

    @property
    def n_lists(self) -> int:
        return self.per_list.height

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "n_lists": self.n_lists,
            "metrics": self.metrics,
        }


def evaluate_scores(
    name: str, split: str, arrays: ListArrays, scores: np.ndarray, ks=KS
) -> EvalResult:
    """An :class:`EvalResult` from scores ``[N, L]`` of ``arrays``' lists."""
    if arrays.n == 0:
        raise ValueError(f"no lists to evaluate in split {split!r}")
    per = metrics_per_list(arrays.labels, scores, ks)
    frame = pl.DataFrame(
        {"list_id": arrays.list_id, "user_id": arrays.user_id}
        | {k: v.astype(np.float64) for k, v in per.items()}
    )
    return EvalResult(name, split, {k: float(v.mean()) for k, v in per.items()}, frame)


def write_eval(result: EvalResult, path: str | Path, per_list: bool = True) -> Path:
    """Write ``result`` as JSON to ``path`` (and its per-list values beside it as parquet,
    ``<stem>.per_list.parquet``). Both writes are atomic. Returns ``path``."""
    path = Path(path)
    write_json(result.to_dict(), path)
    if per_list:
        write_parquet(result.per_list, path.with_name(f"{path.stem}.per_list.parquet"))
    return path


def _split_lists(data: PreparedData, split: str) -> pl.DataFrame:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return data.lists.filter(pl.col("split") == split).sort("list_id")


def popularity(data: PreparedData) -> pl.DataFrame:
    """``item_id``, ``count``: ratings of each item by train-split users (all their ratings)."""
    train_users = data.users.filter(pl.col("split") == "train")["user_id"]
    return (
        data.ratings.filter(pl.col("user_id").is_in(train_users.implode()))
        .group_by("item_id")
        .agg(pl.len().alias("count"))
    )


def reference_results(data_dir: str | Path, split: str = "test") -> dict[str, EvalResult]:
    """Reference rows on ``split``: ``initial`` (the shuffled order), ``popularity`` (train
    popularity, ties by position) and ``oracle`` (labels)."""
    data = load_prepared(data_dir)
    arrays = list_arrays(_split_lists(data, split))
    n, width = arrays.item_ids.shape
    initial = np.broadcast_to(-np.arange(width, dtype=np.float32), (n, width))
    pop = popularity(data)
    counts = dict(zip(pop["item_id"].to_list(), pop["count"].to_list(), strict=True))
    lookup = np.vectorize(lambda i: counts.get(int(i), 0), otypes=[np.float32])
    pop_scores = lookup(arrays.item_ids) if n else np.zeros((0, width), np.float32)
    return {
        "initial": evaluate_scores("initial", split, arrays, initial),
        "popularity": evaluate_scores("popularity", split, arrays, pop_scores),
        "oracle": evaluate_scores("oracle", split, arrays, arrays.labels),
    }


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
    valid = list_arrays(_split_lists(data, "valid"))
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
            item_matrix = _item_matrix(item_vectors, catalogue)
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
        matrix = _item_matrix(item_vectors, cat)
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
    arrays = list_arrays(_split_lists(data, split))
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
