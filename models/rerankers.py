"""The two reranking backbones of Table I, on the contract of :mod:`models.base`.

- :class:`DLCM` (Ai et al., SIGIR 2018): a GRU reads the candidates in their initial order
  (``input_dim -> hidden``, 128 -> 64 with knowledge); each candidate is scored by DLCM's local
  ranking function ``phi(o_i, s_n) = v . (o_i * tanh(W s_n + b))`` from its GRU output ``o_i``
  and the final state ``s_n``.
- :class:`PRM` (Pei et al., RecSys 2019): a learned position embedding is added to the
  candidates, one multi-head self-attention layer models their mutual influence, and an MLP
  scores each candidate from ``[attention output, input]``.

With ``RerankerConfig.arch = "kar"`` both follow KAR's code (``RS/models.py``, ``RS/layers.py``):
DLCM scores with KAR's ``Phi_function`` (:class:`PhiFunction`: BatchNorm on the final state
and on the sequence states, a 2-way softmax whose first class is the score) and reads its
input undropped; PRM adds a fixed sinusoidal position table (:func:`sinusoid_table`, position
0 all zeros) instead of a learned one; every Linear and Embedding starts xavier-normal
(:func:`models.base.kar_init_`).

Both take the same per-candidate input (item id + first genre, + hybrid-expert adaptor output
with knowledge) and return logits ``[B, L]``.

For the reward, both override :meth:`models.base.Reranker._pair_scores`, which scores many
(list, user vector) pairs at once: the first layer of each backbone is linear in the input, so
its item and position parts are tabulated once per catalogue item (:meth:`pair_tables`) and
only what truly depends on the pair runs per pair (DLCM: the GRU recurrence; PRM: the
``heads x L x L`` attention weights and one small product). Results equal ``forward`` up to
float rounding (tests/models/test_rerankers.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from models.base import CONFIG_FILE, WEIGHTS_FILE, ItemTables, Reranker, RerankerConfig


def take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along dim 0 via ``index_select`` (faster on CPU than
    advanced indexing): ``[*index.shape, *table.shape[1:]]``."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


__all__ = [
    "DLCM",
    "PRM",
    "PhiFunction",
    "Reranker",
    "RerankerConfig",
    "build_reranker",
    "load_reranker",
    "sinusoid_table",
]


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """KAR's PRM position table (``PRM.get_pos_embedding``): ``[length, dim]``.

    Row ``pos >= 1``: ``angle[j] = pos / 10000 ** (2 * (j // 2) / dim)``, ``sin`` at even
    ``j``, ``cos`` at odd ``j``; row 0 is all zeros (not ``cos(0) = 1``), as in KAR.
    """
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # [L, 1]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    table[0] = 0.0
    return table.float()


class PhiFunction(nn.Module):
    """KAR's ``Phi_function`` (``RS/layers.py``) with hidden width ``H``, returning logits.

    ``c = dropout(tanh(fc1(BN_final(s_n))))`` ``[B, H]``; ``z_i = c * BN_seq(o_i)`` with
    ``BN_seq`` normalising each of the ``H`` channels over the batch and the list;
    ``fc2(z_i)`` gives two values ``(a_i, b_i)`` and KAR's score is ``softmax(a_i, b_i)[0] =
    sigmoid(a_i - b_i)``, so the logit returned is ``a_i - b_i`` (same model, and
    :meth:`models.base.Reranker.loss` applies the sigmoid as KAR's ``BCELoss`` does).
    """

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.bn_final = nn.BatchNorm1d(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.bn_seq = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def context(self, final: torch.Tensor) -> torch.Tensor:
        """``c`` from the final state ``[B, H]`` -> ``[B, H]``."""
        return self.dropout(torch.tanh(self.fc1(self.bn_final(final))))

    def score_vector(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``fc2``'s two rows and biases as one logit: ``(w_a - w_b)`` ``[H]``, ``b_a - b_b``."""
        w, b = self.fc2.weight, self.fc2.bias
        return w[0] - w[1], b[0] - b[1]

    def seq_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``BN_seq`` in eval mode as ``scale * o + shift``: ``scale``, ``shift`` ``[H]``."""
        bn = self.bn_seq
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def forward(self, seq: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """``seq`` ``[B, L, H]`` GRU outputs, ``final`` ``[B, H]`` -> logits ``[B, L]``."""
        normed = self.bn_seq(seq.transpose(1, 2)).transpose(1, 2)  # [B, L, H]
        v, b = self.score_vector()
        return (self.context(final).unsqueeze(1) * normed) @ v + b


class DLCM(Reranker):
    """Deep Listwise Context Model: GRU over the list, then DLCM's local ranking function
    (``arch="default"``: ``v . (o_i * tanh(W s_n + b))``; ``"kar"``: :class:`PhiFunction`)."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__(cfg)
        self.gru = nn.GRU(cfg.input_dim, cfg.hidden, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.arch == "kar":
            self.phi = PhiFunction(cfg.hidden, cfg.dropout)
        else:
            self.state_proj = nn.Linear(cfg.hidden, cfg.hidden)
            self.score_vec = nn.Linear(cfg.hidden, 1)
        self.init_weights()

    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, input_dim]`` -> logits ``[B, L]``."""
        if self.cfg.arch == "kar":
            out, last = self.gru(x)  # KAR drops nothing before the GRU
            return self.phi(out, last[-1])
        out, last = self.gru(self.dropout(x))  # out [B, L, H], last [1, B, H]
        context = torch.tanh(self.state_proj(last[-1])).unsqueeze(1)  # [B, 1, H]
        return self.score_vec(self.dropout(out * context)).squeeze(-1)

    def pair_tables(self) -> ItemTables:
        """Adds ``gi``: the GRU input projection of every catalogue item with the constant
        terms of :meth:`_pair_scores`' shifted state folded in, ``[n_items + 1, 3H]``."""
        tables = super().pair_tables()
        hid = self.cfg.hidden
        w_hh, b_hh = self.gru.weight_hh_l0, self.gru.bias_hh_l0
        gi = tables["x"] @ self.gru.weight_ih_l0.T + self.gru.bias_ih_l0
        # r, z: + b_hr,z - rowsum(W_hr,z) (from h = 2p - 1); n: doubled (tanh(a) = 2 sig(2a) - 1)
        gi[:, : 2 * hid] += b_hh[: 2 * hid] - w_hh[: 2 * hid].sum(1)
        gi[:, 2 * hid :] *= 2.0
        tables["gi"] = gi
        return tables

    def _pair_scores(self, idx: Tensor, tables: ItemTables, u: Tensor, rows: Tensor) -> Tensor:
        """Lists x user vectors: the GRU input projection is an item part (tabulated) plus a
        user part ``[S, 3H]``; only the recurrence (``H x 3H`` per step) runs per
        (list, vector). ``rows`` ``[NL, N]`` -> logits ``[NL, N, L]``.

        The recurrence runs on the shifted state ``p = (h + 1) / 2`` with
        ``tanh(a) = 2 sigmoid(2a) - 1``, which turns PyTorch's GRU update
        ``h' = (1 - z) tanh(a) + z h`` into ``p' = lerp(sigmoid(2a), p, z)``: seven kernels per
        step, the constants folded into the weights (CPU sigmoid is also faster than tanh).
        """
        hid = self.cfg.hidden
        n_lists, n = rows.shape
        length, pairs = idx.shape[1], n_lists * n
        w_hh, b_hh = self.gru.weight_hh_l0, self.gru.bias_hh_l0
        gi_list = take(tables["gi"], idx.T).unsqueeze(2)  # [L, NL, 1, 3H]
        gi_user = u @ self.gru.weight_ih_l0[:, self.user_slice].T  # [S, 3H]
        gi_user = take(torch.cat([gi_user[:, : 2 * hid], 2.0 * gi_user[:, 2 * hid :]], 1), rows)
        w_rz_t = (2.0 * w_hh[: 2 * hid]).T.contiguous()  # h W = 2 p W - rowsum(W)
        w_n_t = (4.0 * w_hh[2 * hid :]).T.contiguous()  # 2 (W_hn h + b_hn)
        b_n = 2.0 * (b_hh[2 * hid :] - w_hh[2 * hid :].sum(1))
        p = u.new_full((pairs, hid), 0.5)  # h_0 = 0
        out = u.new_empty(length, pairs, hid)
        for t in range(length):  # PyTorch's GRU equations, gates ordered (r, z, n)
            g = torch.add(gi_list[t], gi_user).view(pairs, 3 * hid)  # input projection at t
            rz = torch.addmm(g[:, : 2 * hid], p, w_rz_t).sigmoid_()
            a2 = torch.addcmul(g[:, 2 * hid :], rz[:, :hid], torch.addmm(b_n, p, w_n_t))
            p = torch.lerp(a2.sigmoid_(), p, rz[:, hid:], out=out[t])  # (h' + 1) / 2
        if self.cfg.arch == "kar":  # eval-mode BatchNorm is affine: BN_seq(h) = a h + c
            context = self.phi.context(2.0 * p - 1.0)  # [P, H]
            v, bias = self.phi.score_vector()
            scale, shift = self.phi.seq_affine()
            weight = context * (v * scale)  # [P, H]
            bias = (context * (v * shift)).sum(1, keepdim=True) + bias  # [P, 1]
        else:
            context = torch.tanh(self.state_proj(2.0 * p - 1.0))  # [P, H], from s_n = h_L
            weight = context * self.score_vec.weight  # [P, H]: v * tanh(W s_n + b)
            bias = self.score_vec.bias
        # v . (h_t * c) = 2 p_t . (v * c) - sum(v * c)
        scores = torch.bmm(out.transpose(0, 1), 2.0 * weight.unsqueeze(-1)).squeeze(-1)
        scores = scores - weight.sum(1, keepdim=True) + bias  # [P, L]
        return scores.view(n_lists, n, length)


class PRM(Reranker):
    """Personalized Re-ranking Model: position embedding + self-attention + MLP
    (``arch="default"``: a learned position embedding; ``"kar"``: :func:`sinusoid_table`)."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__(cfg)
        d = cfg.input_dim
        if d % cfg.n_heads:
            raise ValueError(f"n_heads={cfg.n_heads} must divide the input width {d}")
        if cfg.arch == "kar":  # fixed, saved with the weights
            self.register_buffer("pos_emb", sinusoid_table(cfg.list_len, d))
        else:
            self.pos_emb = nn.Parameter(torch.zeros(cfg.list_len, d))
            nn.init.normal_(self.pos_emb, std=0.02)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        layers: list[nn.Module] = []
        width = 2 * d
        for h in cfg.mlp:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.init_weights()

    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, input_dim]`` -> logits ``[B, L]``."""
        h = x + self.pos_emb[: x.shape[1]]
        attn, _ = self.attn(h, h, h, need_weights=False)
        return self.mlp(torch.cat([attn, h], dim=-1)).squeeze(-1)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1a @ w_o)`` per head ``[nh, hd, m]``, and ``w1a`` ``[m, d]``, ``w1h`` ``[m, d]``:
        the MLP's first layer split into its attention-output and input halves."""
        d, nh = self.cfg.input_dim, self.cfg.n_heads
        first = self.mlp[0]
        w1a, w1h = first.weight[:, :d], first.weight[:, d:]
        fold = (w1a @ self.attn.out_proj.weight).view(-1, nh, d // nh).permute(1, 2, 0)
        return fold, w1a, w1h

    def pair_tables(self) -> ItemTables:
        """Adds, per catalogue item (``*_item``, no bias) and per position (``*_pos``, with
        the position embedding and the biases): the attention projections ``qkv``
        ``[., 3d]``, each head's values through the out projection and the MLP's first layer
        ``m`` ``[., nh, m]``, and the input half of that layer ``h1`` ``[., m]``."""
        tables = super().pair_tables()
        d, nh = self.cfg.input_dim, self.cfg.n_heads
        fold, _, w1h = self._fold()
        w_in, b_in = self.attn.in_proj_weight, self.attn.in_proj_bias
        for part, x, bias in (("item", tables["x"], None), ("pos", self.pos_emb, b_in)):
            qkv = x @ w_in.T if bias is None else x @ w_in.T + bias
            v = qkv[:, 2 * d :].view(-1, nh, d // nh)  # [., nh, hd]
            tables[f"qkv_{part}"] = qkv
            tables[f"m_{part}"] = torch.einsum("nhd,hdm->nhm", v, fold)
            tables[f"h1_{part}"] = x @ w1h.T
        return tables

    def _pair_scores(self, idx: Tensor, tables: ItemTables, u: Tensor, rows: Tensor) -> Tensor:
        """Lists x user vectors, exactly decomposed. With ``h = h_item + h_pos + h_user`` (the
        user part is the same at every position), per head ``q_i k_j = Q_i K_j + q_u K_j +
        (terms constant in j, which the softmax cancels)``; the attention output is
        ``sum_j w_ij V_j + v_u``, and the out projection and the MLP's first layer are linear,
        so they fold into per-item tables. Per (list, vector) only the ``heads x L x L``
        attention weights and their product with a ``[heads x L, mlp[0]]`` list tensor remain.
        ``rows`` ``[NL, N]`` -> logits ``[NL, N, L]``."""
        d, nh = self.cfg.input_dim, self.cfg.n_heads
        hd = d // nh
        n_lists, length = idx.shape
        n = rows.shape[1]
        us = self.user_slice
        scale = hd**-0.5
        qkv = take(tables["qkv_item"], idx).add_(tables["qkv_pos"][:length])  # [NL, L, 3d]
        q = qkv[..., :d].reshape(n_lists, length, nh, hd).transpose(1, 2)  # [NL, nh, L, hd]
        k = qkv[..., d : 2 * d].reshape(n_lists, length, nh, hd).transpose(1, 2)
        qk = (q @ k.transpose(-1, -2)) * scale  # [NL, nh, L, L]
        m_list = take(tables["m_item"], idx).add_(tables["m_pos"][:length])  # [NL, L, nh, m]
        m_list = m_list.view(n_lists, length * nh, -1)  # [NL, L*nh, m], key-major
        h_list = take(tables["h1_item"], idx).add_(tables["h1_pos"][:length])  # [NL, L, m]
        _, w1a, w1h = self._fold()
        w_q, _, w_v = self.attn.in_proj_weight.chunk(3, dim=0)
        q_u = (u @ w_q[:, us].T * scale).view(-1, nh, hd)  # [S, nh, hd]
        v_u = u @ w_v[:, us].T  # [S, d]
        w_o, b_o = self.attn.out_proj.weight, self.attn.out_proj.bias
        c_user = (v_u @ w_o.T + b_o) @ w1a.T + u @ w1h[:, us].T + self.mlp[0].bias  # [S, m]
        # per (list, vector): the user's share of the attention logits, [NL, nh, N, L]
        uk = take(q_u, rows).transpose(1, 2) @ k.transpose(-1, -2)
        # [NL, N, L query, L key, nh]
        logits = (qk.unsqueeze(2) + uk.unsqueeze(3)).permute(0, 2, 3, 4, 1)
        w = (logits - logits.amax(-2, keepdim=True)).exp_()
        w = w / w.sum(-2, keepdim=True)  # softmax over the keys
        # one product per list over (key, head): [NL, N*L, L*nh] @ [NL, L*nh, m]
        z = w.reshape(n_lists, n * length, length * nh) @ m_list
        z = z.view(n_lists, n, length, -1).add_(h_list.unsqueeze(1))
        z = z.add_(take(c_user, rows).unsqueeze(2))
        return self.mlp[1:](z).squeeze(-1)


BACKBONES: dict[str, type[Reranker]] = {"dlcm": DLCM, "prm": PRM}


def build_reranker(cfg: RerankerConfig) -> Reranker:
    """A fresh (untrained) reranker of ``cfg.backbone``."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {cfg.backbone!r}")
    return BACKBONES[cfg.backbone](cfg)


def load_reranker(directory: str | Path, map_location: str = "cpu") -> Reranker:
    """Rebuild a reranker saved with :meth:`models.base.Reranker.save`: the class of its
    backbone, its configuration and weights."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{directory}: not a saved reranker (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    model = build_reranker(RerankerConfig.from_dict(json.loads(cfg_path.read_text())))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=map_location))
    return model
