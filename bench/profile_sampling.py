"""Where a sampling job's time goes in vLLM on CPU: the torch profiler over one round's job.

The shape of a quick-profile round (the first ``--users`` users' real ML-100K KAR prompts,
``n=4`` samples of at most 96 tokens, the default policy, the flow's engine settings and top-p),
the engine in this process so that the profiler sees its operators. One warm-up job, then the
profiled job. Prints the operators' shares of the job's wall time and the matmuls' achieved
throughput against this machine's bf16 / fp32 matmul peak (:mod:`ceiling`): the FLOPs are
``2 x (parameters without the embedding)`` a prompt token (each prompt once: its ``n``
samples share it) and ``2 x parameters`` a generated token (the LM head scores it).

    .venv/bin/python bench/profile_sampling.py [--users 87] [--max-prompt-tokens 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import real_prompts  # noqa: E402
from ceiling import ModelShape, measure_ceilings, print_ceilings  # noqa: E402

from tasks.llm import top_p  # noqa: E402
from tasks.llm.chat import chat_prompt, load_tokenizer  # noqa: E402
from tasks.llm.vllm_engine import CacheDemand, _engine_args  # noqa: E402

GROUPS = {
    "matmuls (oneDNN)": ("_C::onednn_mm",),
    "attention over the KV cache": ("_C::cpu_attention_with_kv_cache",),
    "top-p (topk of the logits)": ("aten::topk",),
    "KV cache writes": ("_C::cpu_attn_reshape_and_cache",),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=87, help="prompts (a quick round: 87)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="history cap (tokens)")
    ap.add_argument("--run", default=None, help="prepared run folder (default: prepare one)")
    ap.add_argument("--top", type=int, default=12, help="list this many of the other operators")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    from tasks.data.assets import policy_model

    model = policy_model()
    tok = load_tokenizer(model)
    table = real_prompts(args.run, args.users, args.max_prompt_tokens, model)
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in table["prompt"]]
    demand = CacheDemand(tuple(map(len, ids)), args.n, args.max_new_tokens)
    llm = LLM(**_engine_args(model, 0, False, 2048, kv_demand=demand))
    top_p.install()
    params = SamplingParams(n=args.n, temperature=1.0, top_p=0.95, max_tokens=args.max_new_tokens)
    inputs = [{"prompt_token_ids": i} for i in ids]

    def job() -> tuple[float, int]:
        llm.reset_prefix_cache()
        t = time.perf_counter()
        out = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(c.token_ids) for o in out for c in o.outputs)

    warm_s, warm_tokens = job()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall, generated = job()
    self_s: dict[str, float] = {}
    for e in prof.key_averages():
        self_s[e.key] = self_s.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    ops_s = sum(self_s.values())

    c = measure_ceilings()
    shape = ModelShape.of(model)
    prompt_tokens = sum(map(len, ids))
    flops = 2 * (shape.params - shape.head) * prompt_tokens + 2 * shape.params * generated
    matmul_s = self_s.get("_C::onednn_mm", 0.0)
    dtype = llm.llm_engine.model_config.dtype
    peak = c.matmul_gflops("bfloat16" if dtype == torch.bfloat16 else "float32")

    print("\n=== ceilings ===")
    print_ceilings(c)
    print(
        f"\n=== sampling job: {len(ids)} prompts ({prompt_tokens} tokens, each once) x "
        f"{args.n} samples, at most {args.max_new_tokens} tokens, {dtype} ==="
    )
    print(f"warm-up job: {warm_tokens} tokens in {warm_s:.1f} s = {warm_tokens / warm_s:.1f} tok/s")
    print(f"profiled job: {generated} tokens in {wall:.1f} s = {generated / wall:.1f} tok/s")
    print(f"{'where':<32}{'seconds':>9}{'of wall':>9}")
    for name, keys in GROUPS.items():
        s = sum(self_s.get(k, 0.0) for k in keys)
        print(f"{name:<32}{s:>9.1f}{s / wall:>9.1%}")
    grouped = sum(self_s.get(k, 0.0) for keys in GROUPS.values() for k in keys)
    print(f"{'other operators':<32}{ops_s - grouped:>9.1f}{(ops_s - grouped) / wall:>9.1%}")
    others = sorted(
        ((s, k) for k, s in self_s.items() if not any(k in keys for keys in GROUPS.values())),
        reverse=True,
    )
    for s, k in others[: args.top]:
        print(f"  {k[:30]:<30}{s:>9.1f}{s / wall:>9.1%}")
    print(f"{'outside operators (Python)':<32}{wall - ops_s:>9.1f}{(wall - ops_s) / wall:>9.1%}")
    print(
        f"matmuls: {flops / 1e12:.1f} TFLOP in {matmul_s:.1f} s = {flops / 1e9 / matmul_s:.0f} "
        f"GFLOP/s, {flops / 1e9 / matmul_s / peak:.0%} of the measured peak ({peak:.0f}); "
        f"the whole job at that peak: {flops / 1e9 / peak:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
