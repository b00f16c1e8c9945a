"""This machine's ceilings and the rooflines of decoding and of a DPO step derived from them.

Measured in one run, on the threads torch uses (all cores unless ``--threads``):

- memory bandwidth: a large tensor copy (bytes read + written per second) and a triad
  ``a = b + s * c`` (three arrays' bytes per second);
- matmul throughput in fp32 and bf16 (``torch.mm``, square matrices, GFLOP/s);
- the CPU's instruction sets that decide the dtype (AMX-BF16, AVX-512 BF16, AVX2) and the dtype
  :func:`tasks.common.hardware.cpu_dtype` chose from them.

From those and the policy's config, two upper bounds that the other benchmarks print their
figures against (``share`` = achieved / bound):

- :func:`decode_bound`: generated tokens/s of a decoding batch of ``batch`` sequences. One step
  reads every weight once plus every running sequence's KV cache (prompt + half the answer on
  average) and computes ``2 x params`` FLOPs per token plus attention over that context; the
  bound is ``batch / max(bytes / bandwidth, FLOPs / matmul peak)``.
- :func:`dpo_pair_bound`: pairs/s of LoRA-DPO. A pair is two sequences (prompt + chosen, prompt +
  rejected) of ``tokens`` each (packed: the prompt once): the policy's forward (``2 P`` FLOPs a
  token) and backward (``2 P``: activation gradients through every frozen weight; the LoRA
  weight gradients are negligible), plus the reference's forward (``2 P``) unless its
  log-probabilities are precomputed.

    .venv/bin/python bench/ceiling.py [--threads 2] [--out ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tasks.common.hardware import cpu_dtype, cpu_flags, cpu_model  # noqa: E402

FLAGS_SHOWN = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings. Bandwidths in GB/s (1e9 bytes), throughputs in GFLOP/s."""

    cpu: str
    threads: int
    flags: tuple[str, ...]
    dtype: str
    dtype_reason: str
    copy_gbs: float
    triad_gbs: float
    matmul_fp32_gflops: float
    matmul_bf16_gflops: float

    @property
    def bandwidth_gbs(self) -> float:
        """The better of the two bandwidth figures (what a streaming read can reach)."""
        return max(self.copy_gbs, self.triad_gbs)

    def matmul_gflops(self, dtype: str) -> float:
        return self.matmul_bf16_gflops if dtype == "bfloat16" else self.matmul_fp32_gflops


def _timed(fn, min_seconds: float = 1.0, max_reps: int = 1000) -> float:
    """Best seconds of one ``fn()`` call over repeats filling ``min_seconds`` (one warm-up)."""
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < min_seconds or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def measure_bandwidth(megabytes: int = 512) -> tuple[float, float]:
    """(copy, triad) GB/s on fp32 arrays of ``megabytes`` each, far beyond any cache."""
    n = megabytes * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    copy = _timed(lambda: a.copy_(b), min_seconds=1.0)
    triad = _timed(lambda: torch.add(b, c, alpha=3.0, out=a), min_seconds=1.0)
    return 2 * n * 4 / copy / 1e9, 3 * n * 4 / triad / 1e9


def measure_matmul(dtype: torch.dtype, sizes: tuple[int, ...] = (256, 512, 1024, 2048)) -> float:
    """Best GFLOP/s of square matmuls in ``dtype`` over ``sizes`` (the peak needs large tiles:
    AMX reached about 1,100 GFLOP/s at 1024 and 2,100 at 2048 on the same machine). Starts
    small so that a CPU whose bf16 path is scalar (~1 GFLOP/s) is measured in seconds."""
    best = 0.0
    for n in sizes:
        x, y = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        torch.mm(x, y)
        if time.perf_counter() - t0 > 0.5:  # a slow path: one more size would take minutes
            seconds = _timed(lambda x=x, y=y: torch.mm(x, y), min_seconds=1.0, max_reps=3)
            return max(best, 2 * n**3 / seconds / 1e9)
        seconds = _timed(lambda x=x, y=y: torch.mm(x, y), min_seconds=0.5)
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def measure_ceilings() -> Ceilings:
    """Every ceiling of this machine, on ``torch.get_num_threads()`` threads."""
    flags = cpu_flags()
    choice = cpu_dtype(flags)
    copy, triad = measure_bandwidth()
    return Ceilings(
        cpu=cpu_model(),
        threads=torch.get_num_threads(),
        flags=tuple(f for f in FLAGS_SHOWN if f in flags),
        dtype=choice.name,
        dtype_reason=choice.reason,
        copy_gbs=copy,
        triad_gbs=triad,
        # the best of two passes: on a shared VM a pass can lose half its speed to a neighbour
        matmul_fp32_gflops=max(measure_matmul(torch.float32) for _ in range(2)),
        matmul_bf16_gflops=max(measure_matmul(torch.bfloat16) for _ in range(2)),
    )


@dataclass(frozen=True)
class ModelShape:
    """What the rooflines need of a decoder-only model."""

    params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    head: int = 0
    """Parameters of the LM head (vocabulary x hidden), a matmul only for scored tokens."""

    @classmethod
    def of(cls, model: str) -> ModelShape:
        """From ``model``'s config (tied embeddings counted once, as they are read once)."""
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model)
        c = getattr(c, "text_config", None) or c
        h, layers, inter = int(c.hidden_size), int(c.num_hidden_layers), int(c.intermediate_size)
        heads = int(c.num_attention_heads)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or h // heads)
        attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
        per_layer = attn + 3 * h * inter
        head = int(c.vocab_size) * h
        embed = head * (1 if getattr(c, "tie_word_embeddings", True) else 2)
        return cls(layers * per_layer + embed, layers, heads, kv_heads, head_dim, head)

    def kv_bytes_per_token(self, element: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * element

    def attention_flops(self, context: float) -> float:
        """FLOPs of one token's attention over ``context`` tokens (QK^T and AV)."""
        return 4 * self.layers * self.heads * self.head_dim * context


def element_size(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def decode_bound(
    c: Ceilings, shape: ModelShape, *, batch: int, prompt: float, answer: float, dtype: str
) -> dict[str, float]:
    """Upper bound on generated tokens/s with ``batch`` sequences decoding together.

    ``prompt`` and ``answer`` are token counts; a sequence's context averages
    ``prompt + answer / 2`` over its answer. Returns the bound and which limit sets it.
    """
    e = element_size(dtype)
    context = prompt + answer / 2
    step_bytes = shape.params * e + batch * context * shape.kv_bytes_per_token(e)
    step_flops = batch * (2 * shape.params + shape.attention_flops(context))
    memory_s = step_bytes / (c.bandwidth_gbs * 1e9)
    compute_s = step_flops / (c.matmul_gflops(dtype) * 1e9)
    return {
        "batch": batch,
        "tokens_per_s": batch / max(memory_s, compute_s),
        "bound_by": "memory" if memory_s >= compute_s else "compute",
        "step_mb": step_bytes / 1e6,
        "step_gflop": step_flops / 1e9,
    }


def dpo_pair_bound(
    c: Ceilings,
    shape: ModelShape,
    *,
    tokens: float,
    dtype: str,
    reference_forward: bool,
    shared_prompt: float = 0.0,
    backward_dtype: str | None = None,
) -> dict[str, float]:
    """Upper bound on LoRA-DPO pairs/s, two sequences of ``tokens`` each per pair (compute
    bound: every weight is reused across a sequence's tokens); ``shared_prompt`` tokens of them
    computed once for both sequences (packed pairs, :mod:`tasks.llm.dpo_packing`); the backward
    at the peak of ``backward_dtype`` (default ``dtype``)."""
    forwards = 2 + (2 if reference_forward else 0)  # policy fwd, reference fwd
    positions = 2 * tokens - shared_prompt
    per_pass = positions * (shape.params + shape.attention_flops(tokens / 2) / 2)
    peak = c.matmul_gflops(dtype) * 1e9
    seconds = forwards * per_pass / peak + 2 * per_pass / (
        c.matmul_gflops(backward_dtype or dtype) * 1e9
    )
    flops = (forwards + 2) * per_pass
    return {"pairs_per_s": 1 / seconds, "gflop_per_pair": flops / 1e9}


def print_ceilings(c: Ceilings) -> None:
    print(f"cpu {c.cpu}, {c.threads} threads; flags: {', '.join(c.flags) or 'none of interest'}")
    print(f"dtype {c.dtype}: {c.dtype_reason}")
    print(f"memory bandwidth: copy {c.copy_gbs:.1f} GB/s, triad {c.triad_gbs:.1f} GB/s")
    print(
        f"matmul: fp32 {c.matmul_fp32_gflops:.0f} GFLOP/s, bf16 {c.matmul_bf16_gflops:.0f} "
        f"GFLOP/s (bf16 / fp32 = {c.matmul_bf16_gflops / c.matmul_fp32_gflops:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--model", default=None, help="policy for the rooflines (default)")
    parser.add_argument("--prompt-tokens", type=float, default=540, help="quick profile: ~540")
    parser.add_argument("--answer-tokens", type=float, default=96, help="quick profile: 96")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks.data.assets import policy_model

    c = measure_ceilings()
    shape = ModelShape.of(policy_model(args.model or "default"))
    print("=== ceilings ===")
    print_ceilings(c)
    print(f"\n=== rooflines ({shape.params / 1e6:.0f}M parameters, {c.dtype}) ===")
    result: dict = {"ceilings": asdict(c), "params": shape.params, "decode": [], "dpo": []}
    for batch in (1, 16, 64, 256):
        b = decode_bound(
            c,
            shape,
            batch=batch,
            prompt=args.prompt_tokens,
            answer=args.answer_tokens,
            dtype=c.dtype,
        )
        result["decode"].append(b)
        print(
            f"decode, batch {batch:>3}: <= {b['tokens_per_s']:8.0f} tokens/s ({b['bound_by']} "
            f"bound; a step reads {b['step_mb']:.0f} MB, computes {b['step_gflop']:.1f} GFLOP)"
        )
    tokens = args.prompt_tokens + args.answer_tokens
    for ref in (True, False):
        d = dpo_pair_bound(c, shape, tokens=tokens, dtype=c.dtype, reference_forward=ref)
        result["dpo"].append({**d, "reference_forward": ref})
        print(
            f"DPO pair of 2 x {tokens:.0f} tokens, reference "
            f"{'forward' if ref else 'precomputed'}: <= {d['pairs_per_s']:.2f} pairs/s "
            f"({d['gflop_per_pair']:.0f} GFLOP a pair)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
