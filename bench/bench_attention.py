"""Decoding attention on CPU: vLLM's kernel against a prefix-shared GEMM, one layer at a time.

A sampling round decodes N samples of each prompt at once, and their KV blocks of the prompt
are the same physical blocks (vLLM's prefix caching). This measures one decoding step's
attention for one layer of the policy (SmolLM2-135M: 9 query heads, 3 KV heads of 64) over
``--groups`` prompts x ``--n`` samples, each with a ``--prompt``-token prompt and ``--answer``
tokens decoded so far, in vLLM's KV blocks of 32 tokens:

- ``kernel, shared``: vLLM's ``cpu_attention_with_kv_cache`` on the flow's layout, a prompt's
  blocks shared by its samples;
- ``kernel, private``: the same kernel when every sample has its own copy of the prompt's
  blocks (what the kernel would read without the sharing);
- ``grouped GEMM``: the computation that reads each prompt's keys and values once for all its
  samples (a batched bf16 matmul of the n x 3 queries of each KV head against the prefix, one
  against each sample's own answer tokens, merged by their log-sum-exp), in torch. Its output
  is checked against the kernel's.

Each is printed with the bandwidth it reaches over the bytes a sample's attention reads and as
a share of the machine's measured copy bandwidth (:mod:`ceiling`)::

    .venv/bin/python bench/bench_attention.py [--groups 32] [--n 4] [--prompt 480] [--answer 48]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ceiling import _timed, measure_ceilings, print_ceilings  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 32
"""SmolLM2-135M's attention and the CPU engines' KV block (tasks.llm.vllm_engine)."""


class Step:
    """One layer's KV cache, block table and decoding queries for ``groups x n`` sequences."""

    def __init__(self, groups: int, n: int, prompt: int, answer: int, *, shared: bool) -> None:
        import vllm._custom_ops as ops

        self.groups, self.n, self.prompt, self.answer = groups, n, prompt, answer
        seqs, ctx = groups * n, prompt + answer
        prompt_blocks, answer_blocks = -(-prompt // BLOCK), -(-answer // BLOCK)
        assert prompt % BLOCK == 0, "--prompt must be a multiple of the block (32 tokens)"
        blocks = groups * prompt_blocks * (1 if shared else n) + seqs * answer_blocks
        kv = torch.zeros(blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, dtype=torch.bfloat16)
        self.key_cache, self.value_cache = kv.view(blocks, KV_HEADS, 2 * BLOCK, -1).chunk(2, 2)
        table = torch.zeros(seqs, prompt_blocks + answer_blocks, dtype=torch.int32)
        free = 0
        for g in range(groups):
            for s in range(n):
                if s == 0 or not shared:
                    own = torch.arange(free, free + prompt_blocks)
                    free += prompt_blocks
                table[g * n + s, :prompt_blocks] = own
        for i in range(seqs):
            table[i, prompt_blocks:] = torch.arange(free, free + answer_blocks)
            free += answer_blocks
        # keys and values (seqs, ctx, kv heads, dim); a prompt's samples share its prefix
        k = torch.randn(seqs, ctx, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for g in range(groups):
            k[g * n : (g + 1) * n, :prompt] = k[g * n, :prompt]
            v[g * n : (g + 1) * n, :prompt] = v[g * n, :prompt]
        slots = (table.long()[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(seqs, -1)
        ops.cpu_attn_reshape_and_cache(
            k.reshape(-1, KV_HEADS, HEAD_DIM),
            v.reshape(-1, KV_HEADS, HEAD_DIM),
            self.key_cache,
            self.value_cache,
            slots[:, :ctx].reshape(-1),
            "vec",
        )
        self.k, self.v, self.table = k, v, table
        self.query = torch.randn(seqs, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        self.out = torch.empty_like(self.query)
        self.query_start = torch.arange(seqs + 1, dtype=torch.int32)
        self.seq_lens = torch.full((seqs,), ctx, dtype=torch.int32)
        self.meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seqs,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            seq_lens=self.seq_lens,
            dtype=torch.bfloat16,
            query_start_loc=self.query_start,
            causal=True,
            sliding_window_size=-1,
            isa="vec",
            enable_kv_split=False,
        )

    def kernel(self) -> torch.Tensor:
        """vLLM's CPU attention: (seqs, heads, dim)."""
        import vllm._custom_ops as ops

        ops.cpu_attention_with_kv_cache(
            query=self.query,
            key_cache=self.key_cache,
            value_cache=self.value_cache,
            output=self.out,
            query_start_loc=self.query_start,
            seq_lens=self.seq_lens,
            scale=HEAD_DIM**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=self.table,
            softcap=0.0,
            scheduler_metadata=self.meta,
            s_aux=None,
        )
        return self.out

    def grouped(self) -> Callable[[], torch.Tensor]:
        """The prefix-shared computation on contiguous copies of the prefix and the answers."""
        g, n, p, a = self.groups, self.n, self.prompt, self.answer
        per_kv = HEADS // KV_HEADS
        prefix_k = self.k[::n, :p].permute(0, 2, 3, 1).reshape(g * KV_HEADS, HEAD_DIM, p)
        prefix_v = self.v[::n, :p].permute(0, 2, 1, 3).reshape(g * KV_HEADS, p, HEAD_DIM)
        own_k = self.k[:, p:].permute(0, 2, 3, 1).reshape(-1, HEAD_DIM, a).contiguous()
        own_v = self.v[:, p:].permute(0, 2, 1, 3).reshape(-1, a, HEAD_DIM).contiguous()
        prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
        scale = HEAD_DIM**-0.5

        def to_seqs(x: torch.Tensor) -> torch.Tensor:  # (g kv, n per_kv, d) -> (g n kv, per_kv, d)
            d = x.shape[-1]
            x = x.view(g, KV_HEADS, n, per_kv, d).permute(0, 2, 1, 3, 4)
            return x.reshape(g * n * KV_HEADS, per_kv, d)

        def run() -> torch.Tensor:
            q = self.query.view(g, n, KV_HEADS, per_kv, HEAD_DIM).permute(0, 2, 1, 3, 4)
            s1 = torch.bmm(q.reshape(g * KV_HEADS, n * per_kv, HEAD_DIM), prefix_k).float()
            s2 = torch.bmm(self.query.view(-1, per_kv, HEAD_DIM), own_k).float()
            m1, m2 = s1.amax(-1, keepdim=True), s2.amax(-1, keepdim=True)
            e1, e2 = ((s1 - m1) * scale).exp(), ((s2 - m2) * scale).exp()
            o1 = to_seqs(torch.bmm(e1.to(torch.bfloat16), prefix_v).float())
            o2 = torch.bmm(e2.to(torch.bfloat16), own_v).float()
            m1, l1 = to_seqs(m1), to_seqs(e1.sum(-1, keepdim=True))
            m = torch.maximum(m1, m2)
            w1, w2 = ((m1 - m) * scale).exp(), ((m2 - m) * scale).exp()
            o = (o1 * w1 + o2 * w2) / (l1 * w1 + e2.sum(-1, keepdim=True) * w2)
            return o.view(-1, HEADS, HEAD_DIM)

        return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=32, help="prompts decoding together")
    parser.add_argument("--n", type=int, default=4, help="samples of each prompt")
    parser.add_argument("--prompt", type=int, default=480, help="prompt tokens (x 32)")
    parser.add_argument("--answer", type=int, default=48, help="answer tokens so far")
    parser.add_argument("--layers", type=int, default=30, help="layers in a step (SmolLM2: 30)")
    args = parser.parse_args(argv)
    c = measure_ceilings()
    shape = (args.groups, args.n, args.prompt, args.answer)
    shared, private = Step(*shape, shared=True), Step(*shape, shared=False)
    grouped = shared.grouped()
    diff = (grouped() - shared.kernel().float()).abs().max().item()
    seqs = args.groups * args.n
    per_sample = seqs * (args.prompt + args.answer) * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
    once = (args.groups * args.prompt + seqs * args.answer) * KV_HEADS * HEAD_DIM * 2 * 2
    print("=== ceilings ===")
    print_ceilings(c)
    print(
        f"\n=== one layer's decoding attention: {args.groups} prompts x n={args.n}, "
        f"{args.prompt} prompt + {args.answer} answer tokens; KV read per sample "
        f"{per_sample / 1e6:.1f} MB, each prompt once {once / 1e6:.1f} MB ==="
    )
    print(f"{'':<32}{'ms/layer':>10}{'ms/step':>10}{'GB/s per sample':>17}{'of copy':>9}")
    for name, fn in (
        ("kernel, shared prompt blocks", shared.kernel),
        ("kernel, private copies", private.kernel),
        ("grouped GEMM, prompt read once", grouped),
    ):
        seconds = _timed(fn, min_seconds=1.0)
        rate = per_sample / seconds / 1e9
        print(
            f"{name:<32}{seconds * 1e3:>10.2f}{seconds * 1e3 * args.layers:>10.0f}"
            f"{rate:>17.1f}{rate / c.copy_gbs:>9.0%}"
        )
    print(f"grouped GEMM vs kernel: max |difference| {diff:.2g} (bf16 inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
