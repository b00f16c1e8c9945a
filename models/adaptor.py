"""KAR's hybrid-expert adaptor (HEA): knowledge vectors -> low-dimensional recommender inputs.

Each task (task 0 = the user knowledge vector, task 1 = the item knowledge vector) has its own
softmax gate over ``n_shared`` shared experts and its own ``n_specific`` task-specific experts.
Every expert is an MLP ``in_dim -> hidden -> out_dim`` with ReLU after each layer (KAR's MLP).
A task's output is the gate-weighted sum of its experts' outputs;
:meth:`HybridExpertAdaptor.forward` concatenates the tasks' outputs (2 tasks x 32 = 64 by default).

A task's output depends only on its own input, so the two sides can be computed separately on
batches of different sizes (:meth:`HybridExpertAdaptor.task_forward`): the rerankers encode each
distinct user vector and each distinct item once per batch.

The experts of a group are stored as stacked weights and run as one batched matmul.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AdaptorConfig:
    """Shape of the hybrid-expert adaptor.

    Attributes:
        in_dim: dimension of the knowledge vectors (the encoder's output, e.g. 384 for MiniLM).
        n_tasks: 1 (user vector only) or 2 (user vector, item vector).
        n_shared: experts shared by all tasks.
        n_specific: experts of each task.
        hidden: expert hidden width.
        out_dim: expert output width (the output of one task).
        dropout: dropout after each expert layer.
    """

    in_dim: int
    n_tasks: int = 2
    n_shared: int = 2
    n_specific: int = 6
    hidden: int = 128
    out_dim: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("in_dim", "n_tasks", "hidden", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdaptorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_shared < 0 or self.n_specific < 0 or self.n_shared + self.n_specific < 1:
            raise ValueError(
                f"AdaptorConfig needs at least one expert per task, got n_shared={self.n_shared} "
                f"and n_specific={self.n_specific}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaptorConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def output_dim(self) -> int:
        """Width of :meth:`HybridExpertAdaptor.forward`'s output: ``n_tasks * out_dim``."""
        return self.n_tasks * self.out_dim

    def to_dict(self) -> dict:
        return asdict(self)


class ExpertGroup(nn.Module):
    """``n`` independent MLP experts ``in_dim -> hidden -> out_dim`` (ReLU), run together.

    Input ``[N, in_dim]``; output ``[N, n, out_dim]``.
    """

    def __init__(self, n: int, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.n = n
        self.w1 = nn.Parameter(torch.empty(n, in_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(n, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, out_dim))
        self.b2 = nn.Parameter(torch.empty(n, out_dim))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per expert."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def xavier_normal_(self) -> None:
        """KAR's initialisation of each expert's Linear layers: xavier-normal weights
        (``std = sqrt(2 / (fan_in + fan_out))``), zero biases."""
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                std = math.sqrt(2.0 / (w.shape[1] + w.shape[2]))
                w.normal_(0.0, std)
                b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == 0:
            return x.new_zeros(x.shape[0], 0, self.w2.shape[-1])
        h = torch.relu(torch.einsum("nd,edh->neh", x, self.w1) + self.b1)
        h = self.dropout(h)
        out = torch.relu(torch.einsum("neh,eho->neo", h, self.w2) + self.b2)
        return self.dropout(out)


class HybridExpertAdaptor(nn.Module):
    """KAR's hybrid-expert adaptor (see the module docstring)."""

    def __init__(self, cfg: AdaptorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = ExpertGroup(cfg.n_shared, cfg.in_dim, cfg.hidden, cfg.out_dim, cfg.dropout)
        self.specific = nn.ModuleList(
            ExpertGroup(cfg.n_specific, cfg.in_dim, cfg.hidden, cfg.out_dim, cfg.dropout)
            for _ in range(cfg.n_tasks)
        )
        self.gates = nn.ModuleList(
            nn.Linear(cfg.in_dim, cfg.n_shared + cfg.n_specific) for _ in range(cfg.n_tasks)
        )

    def gate_weights(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Softmax gate of ``task`` over its experts: ``[N, n_shared + n_specific]``."""
        return torch.softmax(self.gates[task](x), dim=-1)

    def task_forward(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Output of one task.

        Args:
            task: 0 (user) or 1 (item).
            x: knowledge vectors ``[N, in_dim]``.

        Returns:
            ``[N, out_dim]``.
        """
        if not 0 <= task < self.cfg.n_tasks:
            raise ValueError(f"task must be in [0, {self.cfg.n_tasks}), got {task}")
        if x.dim() != 2 or x.shape[-1] != self.cfg.in_dim:
            raise ValueError(
                f"knowledge vectors must have shape [N, {self.cfg.in_dim}], got {tuple(x.shape)}"
            )
        experts = torch.cat([self.shared(x), self.specific[task](x)], dim=1)  # [N, E, out]
        gate = self.gate_weights(task, x).unsqueeze(1)  # [N, 1, E]
        return torch.bmm(gate, experts).squeeze(1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """All tasks on aligned batches.

        Args:
            xs: one ``[N, in_dim]`` tensor per task (same ``N``).

        Returns:
            ``[N, n_tasks * out_dim]``: the tasks' outputs concatenated in task order.
        """
        if len(xs) != self.cfg.n_tasks:
            raise ValueError(f"expected {self.cfg.n_tasks} inputs (one per task), got {len(xs)}")
        return torch.cat([self.task_forward(t, x) for t, x in enumerate(xs)], dim=-1)
