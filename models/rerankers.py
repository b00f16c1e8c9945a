"""The two reranking backbones of Table I, on the contract of :mod:`models.base`.

- :class:`DLCM` (Ai et al., SIGIR 2018): a GRU reads the candidates in their initial order
  (``input_dim -> hidden``, 128 -> 64 with knowledge); each candidate is scored by DLCM's local
  ranking function ``phi(o_i, s_n) = v . (o_i * tanh(W s_n + b))`` from its GRU output ``o_i``
  and the final state ``s_n``.
- :class:`PRM` (Pei et al., RecSys 2019): a learned position embedding is added to the
  candidates, one multi-head self-attention layer models their mutual influence, and an MLP
  scores each candidate from ``[attention output, input]``.

Both take the same per-candidate input (item id + first genre, + hybrid-expert adaptor output
with knowledge) and return logits ``[B, L]``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import Reranker, RerankerConfig

__all__ = ["DLCM", "PRM", "Reranker", "RerankerConfig", "build_reranker", "load_reranker"]


class DLCM(Reranker):
    """Deep Listwise Context Model: GRU over the list, then DLCM's local ranking function."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__(cfg)
        self.gru = nn.GRU(cfg.input_dim, cfg.hidden, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.state_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.score_vec = nn.Linear(cfg.hidden, 1)

    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, input_dim]`` -> logits ``[B, L]``."""
        out, last = self.gru(self.dropout(x))  # out [B, L, H], last [1, B, H]
        context = torch.tanh(self.state_proj(last[-1])).unsqueeze(1)  # [B, 1, H]
        return self.score_vec(self.dropout(out * context)).squeeze(-1)

    def _pair_scores(self, x0: torch.Tensor, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Lists x user vectors: the GRU input projection splits into a list part
        ``[NL, L, 3H]`` and a user part ``[S, 3H]``; only the recurrence (``H x 3H`` per step)
        runs per (list, vector). ``rows`` ``[NL, N]`` -> logits ``[NL, N, L]``."""
        hid = self.cfg.hidden
        w_ih, b_ih = self.gru.weight_ih_l0, self.gru.bias_ih_l0
        w_hh_t, b_hh = self.gru.weight_hh_l0.T.contiguous(), self.gru.bias_hh_l0
        gi_list = (x0 @ w_ih.T + b_ih).transpose(0, 1).unsqueeze(2)  # [L, NL, 1, 3H]
        gi_user = (u @ w_ih[:, self.user_slice].T)[rows]  # [NL, N, 3H]
        n_lists, n = rows.shape
        length = x0.shape[1]
        h = x0.new_zeros(n_lists * n, hid)
        out = x0.new_empty(length, n_lists * n, hid)
        for t in range(length):  # PyTorch's GRU equations, gates ordered (r, z, n)
            gi = (gi_list[t] + gi_user).view(n_lists * n, 3 * hid)
            gh = torch.addmm(b_hh, h, w_hh_t)
            rz = torch.sigmoid(gi[:, : 2 * hid] + gh[:, : 2 * hid])
            cand = torch.tanh(torch.addcmul(gi[:, 2 * hid :], rz[:, :hid], gh[:, 2 * hid :]))
            h = torch.lerp(cand, h, rz[:, hid:])  # (1 - z) * n + z * h
            out[t] = h
        context = torch.tanh(self.state_proj(h)).unsqueeze(0)  # [1, P, H]
        scores = self.score_vec(out * context).squeeze(-1)  # [L, P]
        return scores.T.reshape(n_lists, n, length)


class PRM(Reranker):
    """Personalized Re-ranking Model: position embedding + self-attention + MLP."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__(cfg)
        d = cfg.input_dim
        if d % cfg.n_heads:
            raise ValueError(f"n_heads={cfg.n_heads} must divide the input width {d}")
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

    def score_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, input_dim]`` -> logits ``[B, L]``."""
        h = x + self.pos_emb[: x.shape[1]]
        attn, _ = self.attn(h, h, h, need_weights=False)
        return self.mlp(torch.cat([attn, h], dim=-1)).squeeze(-1)

    def _pair_scores(self, x0: torch.Tensor, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Lists x user vectors, exactly decomposed. With ``h = h_list + h_user`` (the user
        part is the same at every position), per head ``q_i k_j = Q_i K_j + q_u K_j + (terms
        constant in j, which the softmax cancels)``; the attention output is
        ``sum_j w_ij V_j + v_u``, and the out projection and the MLP's first layer are linear,
        so they fold into per-list tensors. Per (list, vector) only the ``heads x L x L``
        attention weights and their product with a ``[heads, L, mlp[0]]`` list tensor remain.
        ``rows`` ``[NL, N]`` -> logits ``[NL, N, L]``."""
        d, nh = self.cfg.input_dim, self.cfg.n_heads
        hd = d // nh
        n_lists, length, _ = x0.shape
        n = rows.shape[1]
        us = self.user_slice
        h0 = x0 + self.pos_emb[:length]  # [NL, L, d]
        w_in, b_in = self.attn.in_proj_weight, self.attn.in_proj_bias
        q, k, v = (h0 @ w_in.T + b_in).chunk(3, dim=-1)  # [NL, L, d] each
        q = q.view(n_lists, length, nh, hd).transpose(1, 2)  # [NL, nh, L, hd]
        k = k.view(n_lists, length, nh, hd).transpose(1, 2)
        v = v.view(n_lists, length, nh, hd).transpose(1, 2)
        w_q, _, w_v = w_in.chunk(3, dim=0)
        scale = hd**-0.5
        q_u = (u @ w_q[:, us].T * scale).view(-1, nh, hd)  # [S, nh, hd]
        qk = (q @ k.transpose(-1, -2)) * scale  # [NL, nh, L, L]
        w_o, b_o = self.attn.out_proj.weight, self.attn.out_proj.bias
        first = self.mlp[0]
        w1a, w1h = first.weight[:, :d], first.weight[:, d:]
        # each head's values through the out projection and the MLP's first layer
        m_list = v @ (w1a @ w_o).view(-1, nh, hd).permute(1, 2, 0)  # [NL, nh, L, m]
        h_list = h0 @ w1h.T  # [NL, L, m]
        v_u = u @ w_v[:, us].T  # [S, d]
        c_user = (v_u @ w_o.T + b_o) @ w1a.T + u @ w1h[:, us].T + first.bias  # [S, m]
        # per (list, vector): the user's share of the attention logits, [NL, nh, N, L]
        uk = q_u[rows].transpose(1, 2) @ k.transpose(-1, -2)
        w = torch.softmax(qk.unsqueeze(2) + uk.unsqueeze(3), dim=-1)  # [NL, nh, N, L, L]
        z = (w.view(n_lists, nh, n * length, length) @ m_list).sum(1)  # [NL, N*L, m]
        z = z.view(n_lists, n, length, -1) + h_list.unsqueeze(1) + c_user[rows].unsqueeze(2)
        return self.mlp[1:](z).squeeze(-1)


BACKBONES: dict[str, type[Reranker]] = {"dlcm": DLCM, "prm": PRM}


def build_reranker(cfg: RerankerConfig) -> Reranker:
    """A fresh (untrained) reranker of ``cfg.backbone``."""
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {cfg.backbone!r}")
    return BACKBONES[cfg.backbone](cfg)


def load_reranker(directory, map_location: str = "cpu") -> Reranker:
    """Load a reranker saved with :meth:`models.base.Reranker.save`."""
    return Reranker.load(directory, map_location=map_location)
