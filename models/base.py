"""The contract every reranker follows, and the per-candidate input they share.

A reranker scores each candidate of a batch of lists:

- typed constructor from a :class:`RerankerConfig`;
- ``forward(batch) -> scores [B, L]`` (logits; higher = ranked earlier);
- ``loss(scores, labels)``: binary cross-entropy with logits, mean over all candidates;
- ``save(dir)``: ``model.safetensors`` + ``config.json``
  (:func:`models.rerankers.load_reranker` rebuilds the model).

The model carries its catalogue as buffers, so a saved model needs nothing else to score raw
item ids: the sorted item ids (``item_vocab``), each item's first-genre index (``item_genre``)
and, with item knowledge, each item's knowledge vector (``item_vec``). Index 0 of the item and
genre tables is "unknown" (an item id not in the catalogue, an item with no genre).

A batch is a mapping of tensors:

- ``item_ids``: LongTensor ``[B, L]``, raw catalogue item ids in the list's initial order;
- ``user_vec`` (knowledge models only): FloatTensor ``[B, user_dim]``, or ``[S, user_dim]``
  together with ``user_index`` LongTensor ``[B]`` giving, for each list, its row of
  ``user_vec`` (many lists sharing a user vector are then encoded once).

Per-candidate input (KAR): item-id embedding (``embed_dim``) + first-genre embedding
(``embed_dim``) + adaptor output (user task ``out_dim`` broadcast over the list, then item task
``out_dim``) = 32 + 32 + 64 = 128 by default; 64 without knowledge (the "base" row).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from models.adaptor import AdaptorConfig, ExpertGroup, HybridExpertAdaptor

# What a backbone tabulates once per catalogue for score_pairs (its first layer's item and
# position parts), by name: see Reranker.pair_tables.
ItemTables = dict[str, Tensor]

Backbone = Literal["dlcm", "prm"]
Arch = Literal["default", "kar"]
"""Architecture of the backbones. ``"default"``: this project's first settings (learned PRM
position embedding, DLCM's plain ``phi``, dropout on DLCM's input, PyTorch's default
initialisation). ``"kar"``: KAR's code (``RS/models.py``, ``RS/layers.py``, ``RS/utils.py``):
fixed sinusoidal PRM positions with position 0 all zeros, DLCM's ``phi`` with BatchNorm on the
final and the sequence states and a 2-way softmax, no input dropout, and xavier-normal
initialisation of every Linear (zero bias) and Embedding (:func:`kar_init_`)."""
ARCHS: tuple[str, ...] = ("default", "kar")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class RerankerConfig:
    """Everything needed to rebuild a reranker (written to ``config.json``).

    Attributes:
        backbone: ``"dlcm"`` or ``"prm"``.
        n_items: catalogue size (the item table has ``n_items + 1`` rows; row 0 = unknown).
        n_genres: first-genre vocabulary size (row 0 = no genre).
        list_len: maximum list length (PRM's position table).
        embed_dim: item-id and genre embedding width.
        user_dim: user knowledge vector width; 0 = no knowledge (the base row).
        item_dim: item knowledge vector width; 0 = no item knowledge. When both are set they
            must be equal (the adaptor's shared experts read both).
        n_shared, n_specific, expert_hidden, expert_out: hybrid-expert adaptor shape.
        hidden: DLCM GRU width.
        n_heads: PRM attention heads (must divide the per-candidate input width).
        mlp: PRM scoring MLP widths.
        dropout: dropout of the backbone and the adaptor.
        arch: ``"default"`` or ``"kar"`` (see :data:`Arch`).
        genre_names: the genre vocabulary (index ``i + 1`` = ``genre_names[i]``), informative.
    """

    backbone: Backbone
    n_items: int
    n_genres: int
    list_len: int = 10
    embed_dim: int = 32
    user_dim: int = 0
    item_dim: int = 0
    n_shared: int = 2
    n_specific: int = 6
    expert_hidden: int = 128
    expert_out: int = 32
    hidden: int = 64
    n_heads: int = 2
    mlp: tuple[int, ...] = (64,)
    dropout: float = 0.1
    arch: Arch = "default"
    genre_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.backbone not in ("dlcm", "prm"):
            raise ValueError(f"backbone must be 'dlcm' or 'prm', got {self.backbone!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("n_items", "list_len", "embed_dim", "hidden", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"RerankerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_genres < 0 or self.user_dim < 0 or self.item_dim < 0:
            raise ValueError("RerankerConfig.n_genres, user_dim and item_dim must be >= 0")
        if self.item_dim and not self.user_dim:
            raise ValueError("item_dim > 0 needs user_dim > 0 (item knowledge without user)")
        if self.item_dim and self.item_dim != self.user_dim:
            raise ValueError(
                f"user_dim ({self.user_dim}) and item_dim ({self.item_dim}) must be equal: the "
                "adaptor's shared experts read both; encode users and items with one encoder"
            )
        object.__setattr__(self, "mlp", tuple(int(m) for m in self.mlp))
        object.__setattr__(self, "genre_names", tuple(str(g) for g in self.genre_names))

    @property
    def knowledge(self) -> bool:
        """True when the model reads user knowledge vectors."""
        return self.user_dim > 0

    @property
    def adaptor_config(self) -> AdaptorConfig | None:
        if not self.knowledge:
            return None
        return AdaptorConfig(
            in_dim=self.user_dim,
            n_tasks=2 if self.item_dim else 1,
            n_shared=self.n_shared,
            n_specific=self.n_specific,
            hidden=self.expert_hidden,
            out_dim=self.expert_out,
            dropout=self.dropout,
        )

    @property
    def input_dim(self) -> int:
        """Per-candidate input width: 2 * embed_dim (+ adaptor output with knowledge)."""
        ad = self.adaptor_config
        return 2 * self.embed_dim + (ad.output_dim if ad else 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp"] = list(self.mlp)
        d["genre_names"] = list(self.genre_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RerankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RerankerConfig keys: {unknown}")
        kw = dict(d)
        kw["mlp"] = tuple(kw.get("mlp", (64,)))
        kw["genre_names"] = tuple(kw.get("genre_names", ()))
        return cls(**kw)


def kar_init_(module: nn.Module) -> None:
    """KAR's ``weight_init`` (``RS/utils.py``, applied with ``model.apply``), in place.

    Every ``nn.Linear`` (the attention's output projection included) gets xavier-normal
    weights, ``std = sqrt(2 / (fan_in + fan_out))``, and a zero bias; every ``nn.Embedding``
    xavier-normal weights, ``std = sqrt(2 / (rows + width))`` (about 0.023 for ML-1M's
    3,707 x 32 item table, where PyTorch's default is 1). The adaptor's stacked experts are
    KAR's Linear layers, so each expert gets the same. What KAR's ``weight_init`` leaves alone
    keeps PyTorch's default: the GRU, BatchNorm, the attention's packed input projection
    (xavier-uniform, zero bias). One difference: an Embedding's ``padding_idx`` row (the
    "unknown" item or genre, which KAR's tables do not have) is set back to zero.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.xavier_normal_(m.weight)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, ExpertGroup):
            m.xavier_normal_()


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Reranker(nn.Module):
    """Base class: candidate features, loss, catalogue buffers, save (module docstring)."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.embed_dim, padding_idx=0)
        self.genre_emb = nn.Embedding(cfg.n_genres + 1, cfg.embed_dim, padding_idx=0)
        self.register_buffer("item_vocab", torch.arange(1, cfg.n_items + 1, dtype=torch.long))
        self.register_buffer("item_genre", torch.zeros(cfg.n_items + 1, dtype=torch.long))
        if cfg.item_dim:
            self.register_buffer("item_vec", torch.zeros(cfg.n_items + 1, cfg.item_dim))
        else:
            self.register_buffer("item_vec", None)
        ad = cfg.adaptor_config
        self.adaptor = HybridExpertAdaptor(ad) if ad else None

    def init_weights(self) -> None:
        """The initialisation of ``cfg.arch``; the backbones call it last in ``__init__``.
        ``"default"`` keeps PyTorch's defaults; ``"kar"`` applies :func:`kar_init_`."""
        if self.cfg.arch == "kar":
            kar_init_(self)

    # ------------------------------------------------------------------ catalogue
    def set_catalogue(
        self,
        item_ids: Sequence[int] | torch.Tensor,
        item_genre: Sequence[int] | torch.Tensor,
        item_vectors: torch.Tensor | None = None,
    ) -> None:
        """Fill the catalogue buffers.

        Args:
            item_ids: ``[n_items]`` raw item ids, strictly increasing.
            item_genre: ``[n_items]`` first-genre index of each item (0 = none).
            item_vectors: ``[n_items, item_dim]`` item knowledge vectors (item-knowledge models).
        """
        ids = torch.as_tensor(item_ids, dtype=torch.long).flatten()
        genre = torch.as_tensor(item_genre, dtype=torch.long).flatten()
        if ids.numel() != self.cfg.n_items or genre.numel() != self.cfg.n_items:
            raise ValueError(
                f"item_ids ({ids.numel()}) and item_genre ({genre.numel()}) must both have "
                f"n_items={self.cfg.n_items} entries"
            )
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("item_ids must be strictly increasing")
        if genre.numel() and (int(genre.min()) < 0 or int(genre.max()) > self.cfg.n_genres):
            raise ValueError(f"item_genre must be in [0, {self.cfg.n_genres}]")
        self.item_vocab.copy_(ids)
        self.item_genre.copy_(torch.cat([genre.new_zeros(1), genre]))
        if self.cfg.item_dim:
            if item_vectors is None:
                raise ValueError("item_vectors is required: this model reads item knowledge")
            vec = torch.as_tensor(item_vectors, dtype=torch.float32)
            if tuple(vec.shape) != (self.cfg.n_items, self.cfg.item_dim):
                raise ValueError(
                    f"item_vectors must have shape [{self.cfg.n_items}, {self.cfg.item_dim}], "
                    f"got {tuple(vec.shape)}"
                )
            self.item_vec.copy_(torch.cat([vec.new_zeros(1, vec.shape[1]), vec]))
        elif item_vectors is not None:
            raise ValueError("item_vectors given but the model has no item knowledge (item_dim=0)")

    def item_index(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Raw item ids ``[...]`` -> table rows ``[...]`` (0 for ids not in the catalogue)."""
        pos = torch.searchsorted(self.item_vocab, item_ids).clamp(max=self.cfg.n_items - 1)
        found = self.item_vocab[pos] == item_ids
        return torch.where(found, pos + 1, torch.zeros_like(pos))

    # ------------------------------------------------------------------ features
    def user_repr(self, batch: Mapping[str, torch.Tensor], n_lists: int) -> torch.Tensor:
        """Adaptor user-task output per list: ``[B, expert_out]``."""
        vec = batch.get("user_vec")
        if vec is None:
            raise ValueError("batch['user_vec'] is required: this model reads user knowledge")
        vec = vec.to(self.item_emb.weight.dtype)
        rep = self.adaptor.task_forward(0, vec)  # one row per distinct vector given
        index = batch.get("user_index")
        if index is not None:
            rep = rep[index]
        if rep.shape[0] != n_lists:
            raise ValueError(
                f"user_vec gives {rep.shape[0]} rows for {n_lists} lists; pass one row per list "
                "or a user_index"
            )
        return rep

    def _check_items(self, item_ids: torch.Tensor) -> None:
        if item_ids.dim() != 2:
            raise ValueError(f"item_ids must be [B, L], got {tuple(item_ids.shape)}")
        if item_ids.shape[1] > self.cfg.list_len:
            raise ValueError(
                f"lists of {item_ids.shape[1]} items exceed list_len={self.cfg.list_len}"
            )

    @property
    def user_slice(self) -> slice:
        """Columns of the per-candidate input that hold the user adaptor output."""
        start = 2 * self.cfg.embed_dim
        return slice(start, start + (self.cfg.expert_out if self.cfg.knowledge else 0))

    def item_repr_table(self) -> torch.Tensor | None:
        """Adaptor item-task output of every catalogue row: ``[n_items + 1, expert_out]``
        (None without item knowledge). Row 0 (unknown item) has a zero knowledge vector."""
        if self.item_vec is None:
            return None
        return self.adaptor.task_forward(1, self.item_vec)

    def item_features(
        self, item_ids: torch.Tensor, item_table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-candidate input with the user columns set to 0: ``[B, L, input_dim]``.

        Args:
            item_ids: ``[B, L]`` raw item ids.
            item_table: optional :meth:`item_repr_table` output (saves recomputing it).
        """
        self._check_items(item_ids)
        b, n = item_ids.shape
        idx = self.item_index(item_ids)
        parts = [self.item_emb(idx), self.genre_emb(self.item_genre[idx])]
        if self.adaptor is not None:
            parts.append(parts[0].new_zeros(b, n, self.cfg.expert_out))
            if self.item_vec is not None:
                if item_table is not None:
                    parts.append(item_table[idx])
                else:  # each distinct item is encoded once per batch
                    uniq, inv = torch.unique(idx, return_inverse=True)
                    parts.append(self.adaptor.task_forward(1, self.item_vec[uniq])[inv])
        return torch.cat(parts, dim=-1)

    def candidate_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-candidate input ``[B, L, input_dim]`` (see the module docstring)."""
        x = self.item_features(batch["item_ids"])
        if self.adaptor is None:
            return x
        b, n, _ = x.shape
        user = self.user_repr(batch, b).unsqueeze(1).expand(b, n, -1)
        sl = self.user_slice
        return torch.cat([x[..., : sl.start], user, x[..., sl.stop :]], dim=-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores (logits) ``[B, L]``."""
        return self.score_features(self.candidate_features(batch))

    def score_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Backbone: per-candidate input ``[B, L, input_dim]`` -> logits ``[B, L]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lists x user vectors
    def catalogue_features(self) -> torch.Tensor:
        """Per-candidate input of every catalogue row with the user columns set to 0:
        ``[n_items + 1, input_dim]`` (row 0 = unknown item)."""
        rows = torch.arange(self.cfg.n_items + 1, device=self.item_vocab.device)
        parts = [self.item_emb(rows), self.genre_emb(self.item_genre)]
        if self.adaptor is not None:
            parts.append(parts[0].new_zeros(len(rows), self.cfg.expert_out))
            if self.item_vec is not None:
                parts.append(self.item_repr_table())
        return torch.cat(parts, dim=-1)

    def pair_tables(self) -> ItemTables:
        """What :meth:`score_pairs` precomputes per catalogue item (and per position).

        The first layer of every backbone is linear in the per-candidate input, which is a sum
        of an item part, a position part and a user part; the backbones tabulate the item and
        position parts once (``{"x": catalogue_features()}`` here, backbone tables in the
        subclasses). Compute it once per model and pass it to every :meth:`score_pairs` call.
        """
        return {"x": self.catalogue_features()}

    def score_pairs(
        self,
        item_ids: torch.Tensor,
        user_vec: torch.Tensor,
        user_rows: torch.Tensor,
        tables: ItemTables | None = None,
    ) -> torch.Tensor:
        """Score each list with several user vectors, sharing the work of each side (eval only).

        ``out[l, n]`` equals ``forward({"item_ids": item_ids[l:l+1], "user_vec":
        user_vec[user_rows[l, n]][None]})[0]`` up to float rounding, but what depends only on
        an item or a position is computed once per catalogue item (:meth:`pair_tables`), what
        depends only on a list once per list and what depends only on a user vector once per
        vector; the backbones override :meth:`_pair_scores` with that decomposition.

        Args:
            item_ids: ``[NL, L]`` raw item ids of the lists.
            user_vec: ``[S, user_dim]`` user knowledge vectors.
            user_rows: ``[NL, N]`` rows of ``user_vec`` to score each list with; ``-1`` pads
                (lists with fewer than ``N`` vectors); padded outputs are 0.
            tables: :meth:`pair_tables` of this model (computed here when None).

        Returns:
            ``[NL, N, L]`` logits.
        """
        if self.training:
            raise RuntimeError("score_pairs is for inference: call model.eval() first")
        if self.adaptor is None:
            raise ValueError("score_pairs needs a knowledge model (user_dim > 0)")
        self._check_items(item_ids)
        if user_rows.dim() != 2 or user_rows.shape[0] != item_ids.shape[0]:
            raise ValueError(
                f"user_rows must be [NL={item_ids.shape[0]}, N], got {tuple(user_rows.shape)}"
            )
        tables = tables if tables is not None else self.pair_tables()
        idx = self.item_index(item_ids)  # [NL, L] catalogue rows
        u = self.adaptor.task_forward(0, user_vec.to(self.item_emb.weight.dtype))  # [S, out]
        pad = user_rows < 0
        out = self._pair_scores(idx, tables, u, user_rows.clamp(min=0))
        return out.masked_fill(pad.unsqueeze(-1), 0.0)

    def _pair_scores(self, idx: Tensor, tables: ItemTables, u: Tensor, rows: Tensor) -> Tensor:
        """Generic: fill the user columns for every (list, vector) and run the backbone.

        ``idx`` ``[NL, L]`` catalogue rows, ``u`` ``[S, expert_out]``, ``rows`` ``[NL, N]``
        -> logits ``[NL, N, L]``.
        """
        n_lists, n = rows.shape
        length = idx.shape[1]
        x = tables["x"][idx].unsqueeze(1).repeat(1, n, 1, 1)  # [NL, N, L, d]
        x[..., self.user_slice] = u[rows].unsqueeze(2)
        return self.score_features(x.view(n_lists * n, length, -1)).view(n_lists, n, length)

    @staticmethod
    def loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy with logits, mean over all candidates (scalar)."""
        return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
        text = json.dumps(self.cfg.to_dict(), indent=2) + "\n"
        _atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(text))
        return directory
