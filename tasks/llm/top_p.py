"""Exact nucleus (top-p) filtering without sorting the vocabulary, for vLLM's CPU sampler.

vLLM's CPU sampler applies top-p by sorting every row of the logits: for a batch of 128
sequences over SmolLM2's 49,152-token vocabulary that sort is about 340 ms a decoding step on
two cores, more than the model's forward pass (``bench/bench_sampling.py`` prints
the figures). The nucleus is almost always a few hundred tokens, so :func:`top_p_filter` finds
it among the ``k`` largest logits (``torch.topk``, ~20 ms for ``k = 256``), widens ``k`` for the
rows whose top-``k`` mass is still under ``p``, and sorts only the rows that no ``k`` covers.

The kept set is the one vLLM keeps: a token survives when the probability mass of the tokens
ranked strictly above it is below ``p`` (so the most likely token always survives). Only the
rounding of the cumulative sums differs (a few ulps), which can move a token that sits exactly
on the boundary.

:func:`install` puts it in place of vLLM's ``apply_top_k_top_p`` in the CPU sampler; the vLLM
worker calls it at start (``tasks.llm.vllm_worker``). Requests with a top-k, or a vLLM whose
sampler module has another shape, keep vLLM's own function; so does every request when
``RLRF4REC_VLLM_TOP_P=sort`` (the benchmark's "before").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

ENV = "RLRF4REC_VLLM_TOP_P"
WIDTHS = (256, 4096)
"""Candidate counts tried in turn before a row falls back to a full sort."""


def top_p_filter(
    logits: torch.Tensor, p: torch.Tensor, widths: Sequence[int] = WIDTHS
) -> torch.Tensor:
    """Set every logit outside each row's nucleus to ``-inf``, in place, and return it.

    Args:
        logits: ``(batch, vocab)`` float logits (after temperature).
        p: ``(batch,)`` top-p of each row, in (0, 1]; rows with ``p >= 1`` are left whole.
        widths: candidate counts to try before sorting a row's whole vocabulary.
    """
    batch, vocab = logits.shape
    keep = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.nonzero(p < 1, as_tuple=True)[0]
    keep[p >= 1] = True
    if rows.numel():
        # The normaliser needs the whole row; everything else only its top candidates.
        log_z = torch.logsumexp(logits[rows].float(), dim=-1, keepdim=True)
    for k in (*[w for w in widths if w < vocab], vocab):
        if not rows.numel():
            break
        top, idx = logits[rows].topk(k, dim=-1)  # sorted, largest first
        probs = (top.float() - log_z).exp()
        mass_above = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked strictly above
        inside = mass_above < p[rows, None]
        inside[:, 0] = True
        covered = (probs.sum(dim=-1) >= p[rows]) | (k == vocab)
        done = rows[covered]
        keep[done[:, None], idx[covered]] = inside[covered]
        rows, log_z = rows[~covered], log_z[~covered]
    return logits.masked_fill_(~keep, float("-inf"))


def patched(original: Callable) -> Callable:
    """vLLM's ``apply_top_k_top_p(logits, k, p)`` with :func:`top_p_filter` for top-p alone."""

    def apply_top_k_top_p(
        logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
    ) -> torch.Tensor:
        if k is not None or p is None or logits.device.type != "cpu":
            return original(logits, k, p)
        return top_p_filter(logits, p)

    apply_top_k_top_p.original = original  # type: ignore[attr-defined]
    return apply_top_k_top_p


def install() -> bool:
    """Use :func:`top_p_filter` in vLLM's CPU sampler. Returns whether it is in place."""
    if os.environ.get(ENV) == "sort":
        return False
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as sampler
    except ImportError:
        return False
    current = getattr(sampler, "apply_top_k_top_p", None)
    if current is None or not hasattr(sampler.TopKTopPSampler, "forward_cpu"):
        log.warning("vLLM's sampler has no apply_top_k_top_p: top-p keeps its full sort")
        return False
    if not hasattr(current, "original"):
        sampler.apply_top_k_top_p = patched(current)
    return True
