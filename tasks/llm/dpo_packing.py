"""DPO forward passes with the prompt computed once per pair (shared-prompt packing).

TRL's DPO batch holds every pair twice: rows ``0..B-1`` are ``prompt + chosen`` and rows
``B..2B-1`` are ``prompt + rejected``, each right-padded to the longest row. The prompt's
activations are the same in both rows (attention is causal), so half of the prompt's work is
thrown away: with the quick profile's ~300-token prompts and ~90-token answers that is a third
of the FLOPs of every policy and reference forward and of the backward.

:func:`install` makes the trainer's model run each pair as one packed row instead::

    shared prompt p[0..n-2] | p[n-1] chosen... | p[n-1] rejected...

The prompt's last token is repeated at the head of each branch, with its position, because
its hidden state scores the first token of both answers. A 4D attention mask lets each branch
see the shared prompt and itself (causally) but never the other branch, and position ids
restart for the second branch, so every scored token sees exactly the keys, values and
positions it sees in TRL's own rows: the same log-probabilities and gradients up to float
rounding (``tests/tasks/llm/test_dpo_packing.py``). The per-token outputs are scattered back
into TRL's ``(2B, L - 1)`` layout, so nothing downstream changes. Cost per pair:
``n + len(chosen) + len(rejected) + 1`` positions instead of ``2 * max(n + len(answer))``.

With sdpa attention the packed row's attention runs in two parts per row
(:func:`split_sdpa_attention`): the shared prompt's queries causally over the prompt alone,
where the kernel skips the blocks above the diagonal and reads no mask, then the two branches'
queries over the row with the mask. The one masked call over the whole row computes every
block, masked or not, about twice the attention FLOPs a pair needs (on a 538-token prompt and
two 96-token answers, attention is a fifth of a forward's FLOPs). ``RLRF4REC_DPO_ATTENTION=masked``
keeps the one masked call.

Batches it cannot pack (no shared prompt, embeddings as input, an attention implementation
without custom masks) take TRL's path. ``RLRF4REC_DPO_PACKING=0`` turns it off (the
benchmark's "before").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "RLRF4REC_DPO_PACKING"
ATTENTION_ENV = "RLRF4REC_DPO_ATTENTION"
"""``split`` (the default): :func:`split_sdpa_attention` under sdpa; ``masked``: one masked
sdpa call over each packed row."""
IGNORE = -100
MASKABLE = ("sdpa", "eager")
"""Attention implementations that take a custom 4D mask."""
SPLIT_SDPA = "rlrf4rec_split_sdpa"
"""The attention implementation :func:`install` registers and sets under sdpa."""
ROWS_ATTR = "rlrf4rec_packed_rows"
"""The attribute of a packed batch's sdpa mask holding each row's (shared prompt, length)."""


@dataclass(frozen=True)
class PackedPairs:
    """B pairs in B rows of T positions.

    Attributes:
        input_ids, position_ids, shift_labels: ``(B, T)`` int64; ``shift_labels[b, t]`` is the
            token position ``t`` scores (-100: none).
        allowed: ``(B, 1, T, T)`` bool, True where a query position may attend a key.
        shared: each row's shared prompt positions (the prompt minus its last token), ``(B,)``.
        lengths: each row's positions before its padding, ``(B,)``.
        src: packed ``(b, t)`` of every scored position, each ``(K,)``.
        dst: ``(row, j)`` of the same positions in TRL's ``(2B, L - 1)`` layout, each ``(K,)``.
        out_shape: ``(2B, L - 1)``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    allowed: torch.Tensor
    shared: tuple[int, ...]
    lengths: tuple[int, ...]
    src: tuple[torch.Tensor, torch.Tensor]
    dst: tuple[torch.Tensor, torch.Tensor]
    out_shape: tuple[int, int]

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The mask as the attention implementation reads it: bool for sdpa (a view carrying
        the rows' layout for :func:`split_sdpa_attention` in :data:`ROWS_ATTR`), additive (0
        or the dtype's minimum) for eager."""
        if implementation == "sdpa":
            mask = self.allowed.view(self.allowed.shape)
            setattr(mask, ROWS_ATTR, (self.shared, self.lengths))
            return mask
        zero = torch.zeros((), dtype=dtype, device=self.allowed.device)
        return torch.where(self.allowed, zero, torch.finfo(dtype).min)

    def unpack(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """``(B, T)`` per-position values -> TRL's ``(2B, L - 1)`` layout, zeros elsewhere
        (as TRL's compact head leaves unscored positions); differentiable."""
        if values is None:
            return None
        out = values.new_zeros(self.out_shape)
        return out.index_put(self.dst, values[self.src])


def pack_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> PackedPairs | None:
    """Pack TRL's ``[chosen rows; rejected rows]`` batch, one row per pair.

    Args:
        input_ids, labels: ``(2B, L)``; ``labels`` is -100 on the prompt and padding.
        attention_mask: ``(2B, L)`` with right padding (ones then zeros), or None.

    Returns:
        The packed batch, or None when the rows are not pairs sharing a prompt (an odd batch,
        a row without labels, prompts that differ, left padding).
    """
    rows, width = input_ids.shape
    if rows % 2 or rows == 0 or labels.shape != input_ids.shape:
        return None
    if attention_mask is None:
        lengths = [width] * rows
    else:
        if attention_mask.dim() != 2:
            return None
        lengths = attention_mask.sum(dim=1).tolist()
        positions = torch.arange(1, width + 1, device=attention_mask.device)
        right_padded = attention_mask.cumsum(dim=1) == positions
        if not bool(((attention_mask == 1) == right_padded).all()):
            return None
    pairs = rows // 2
    scored = labels != IGNORE
    packed_rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    src: list[tuple[int, int]] = []
    dst: list[tuple[int, int]] = []
    for i in range(pairs):
        c, r = i, pairs + i
        starts = []
        for row in (c, r):
            hits = scored[row, : lengths[row]].nonzero()
            if hits.numel() == 0:
                return None
            starts.append(int(hits[0]))
        n = starts[0]
        if n < 1 or starts[1] != n or not torch.equal(input_ids[c, :n], input_ids[r, :n]):
            return None
        ids = input_ids[c, : n - 1].tolist()
        pos = list(range(n - 1))
        seg = [0] * (n - 1)
        target = [IGNORE] * (n - 1)
        for branch, row in ((1, c), (2, r)):
            tokens = input_ids[row, n - 1 : lengths[row]].tolist()
            after = labels[row, n : lengths[row]].tolist() + [IGNORE]
            offset = len(ids)
            for k, label in enumerate(after):
                if label != IGNORE:
                    src.append((i, offset + k))
                    dst.append((row, n - 1 + k))
            ids += tokens
            pos += range(n - 1, n - 1 + len(tokens))
            seg += [branch] * len(tokens)
            target += after
        packed_rows.append((ids, pos, seg, target))
    size = max(len(p[0]) for p in packed_rows)
    ids_t = torch.zeros((pairs, size), dtype=torch.long)
    pos_t = torch.zeros((pairs, size), dtype=torch.long)
    seg_t = torch.full((pairs, size), -1, dtype=torch.long)
    lab_t = torch.full((pairs, size), IGNORE, dtype=torch.long)
    for b, (ids, pos, seg, target) in enumerate(packed_rows):
        m = len(ids)
        ids_t[b, :m] = torch.tensor(ids)
        pos_t[b, :m] = torch.tensor(pos)
        seg_t[b, :m] = torch.tensor(seg)
        lab_t[b, :m] = torch.tensor(target)
    q, k = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones((size, size), dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(size, dtype=torch.bool)  # padding attends itself: no empty softmax row
    device = input_ids.device
    src_b, src_t = torch.tensor(src, dtype=torch.long, device=device).unbind(1)
    dst_r, dst_j = torch.tensor(dst, dtype=torch.long, device=device).unbind(1)
    return PackedPairs(
        input_ids=ids_t.to(device),
        position_ids=pos_t.to(device),
        shift_labels=lab_t.to(device),
        allowed=allowed[:, None].to(device),
        shared=tuple(int(seg.eq(0).sum()) for seg in seg_t),
        lengths=tuple(len(p[0]) for p in packed_rows),
        src=(src_b, src_t),
        dst=(dst_r, dst_j),
        out_shape=(rows, width - 1),
    )


def split_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, in two parts on a packed row (:data:`ROWS_ATTR` on the
    mask): the shared prompt's ``s`` queries causally over its own keys with no mask, then the
    branches' queries over the row's ``m`` keys with the mask's rows ``s..m``; padding
    positions get zeros. Any other call is plain sdpa.

    Args:
        query: ``(B, heads, T, head_dim)``; key, value: ``(B, kv_heads, T, head_dim)``.
        attention_mask: ``(B, 1, T, T)`` bool from :meth:`PackedPairs.attention_mask`.

    Returns:
        ``(B, T, heads, head_dim)`` and no attention weights, as sdpa returns them.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = getattr(attention_mask, ROWS_ATTR, None)
    if rows is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    width = query.shape[2]
    out = []
    for b, (shared, length) in enumerate(zip(*rows, strict=True)):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        parts = []
        if shared:
            prompt = slice(0, shared)
            parts.append(
                sdpa_attention_forward(
                    module,
                    q[:, :, prompt],
                    k[:, :, prompt],
                    v[:, :, prompt],
                    None,
                    is_causal=True,
                    **kwargs,
                )[0]
            )
        row = slice(0, length)
        mask = attention_mask[b : b + 1, :, shared:length, :length]
        parts.append(
            sdpa_attention_forward(
                module, q[:, :, shared:length], k[:, :, row], v[:, :, row], mask, **kwargs
            )[0]
        )
        if length < width:
            parts.append(parts[-1].new_zeros((1, width - length, *parts[-1].shape[2:])))
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0), None


def _register_split_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SPLIT_SDPA, split_sdpa_attention)
    # unpacked batches build their mask as under sdpa
    AttentionMaskInterface.register(SPLIT_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def packed_forward(fused_forward: Any, implementation: str, dtype: torch.dtype) -> Any:
    """Wrap TRL's fused-head forward (``model(..., labels=, fused_lm_head=True)``) so that it
    runs each pair as one packed row and returns TRL's layout."""

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        packed = None
        plain = not args and kwargs.get("inputs_embeds") is None and "shift_labels" not in kwargs
        if fused_lm_head and labels is not None and plain and "input_ids" in kwargs:
            ids = kwargs["input_ids"]
            packed = pack_pairs(ids, kwargs.get("attention_mask"), labels)
        if packed is None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        replaced = ("input_ids", "attention_mask", "position_ids")
        rest = {k: v for k, v in kwargs.items() if k not in replaced}
        out = fused_forward(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask(implementation, dtype),
            position_ids=packed.position_ids,
            shift_labels=packed.shift_labels,
            fused_lm_head=True,
            **rest,
        )
        for name in PER_TOKEN:
            setattr(out, name, packed.unpack(getattr(out, name, None)))
        out.label_mask = labels[:, 1:] != IGNORE
        return out

    forward.packs_pairs = True  # type: ignore[attr-defined]
    return forward


def split_attention() -> bool:
    """Whether packed rows' sdpa attention runs in two parts (:data:`ATTENTION_ENV`)."""
    value = os.environ.get(ATTENTION_ENV, "split")
    if value not in ("split", "masked"):
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected 'split' or 'masked'")
    return value == "split"


def install(trainer: Any) -> bool:
    """Make a TRL ``DPOTrainer``'s model pack each pair into one row; whether it is in place.
    Under sdpa the model's attention becomes :func:`split_sdpa_attention` (unless
    :data:`ATTENTION_ENV` is ``masked``), which is plain sdpa for anything but packed rows."""
    if os.environ.get(ENV) == "0":
        return False
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = getattr(base.config, "_attn_implementation", None) or "eager"
    if implementation == SPLIT_SDPA:
        implementation = "sdpa"
    if implementation not in MASKABLE:
        log.info("DPO packing off: attention %r takes no custom mask", implementation)
        return False
    if implementation == "sdpa" and split_attention():
        _register_split_sdpa()
        base.config._attn_implementation = SPLIT_SDPA
    current = base.forward
    if getattr(current, "packs_pairs", False):
        return True
    dtype = next(base.parameters()).dtype
    base.forward = packed_forward(current, implementation, dtype)
    return True


__all__ = [
    "ATTENTION_ENV",
    "ENV",
    "PackedPairs",
    "install",
    "pack_pairs",
    "packed_forward",
    "split_sdpa_attention",
]
