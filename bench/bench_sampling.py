"""Sampling levers, one at a time, against this machine's roofline (vLLM on CPU).

The shape of a quick-profile round: the first ``--users`` users' real ML-100K KAR prompts (87
train users in a round), ``n=4`` samples of at most 96 tokens, the default policy. Each lever is
a fresh engine, as in the flow; engine start is reported apart from generation. Levers:

- ``before``: vLLM's own top-p (a full sort of the vocabulary each step), the KV cache of
  64 full-length sequences and vLLM's native RMSNorm (the code before this benchmark);
- ``top-p``: exact top-p among the top candidates (:mod:`tasks.llm.top_p`);
- ``block-128``: and the KV cache sized to the job (:class:`tasks.llm.vllm_engine.CacheDemand`),
  so that no sequence is preempted, for 64 sequences at once instead of vLLM's 256
  (:data:`tasks.llm.vllm_engine.CPU_MAX_SEQS`), in vLLM's KV blocks of 128 tokens;
- ``top-p + kv``: the same in blocks of 32 tokens (the flow's setting,
  :data:`tasks.llm.vllm_engine.CPU_BLOCK_TOKENS`): a prompt's samples share more of it;
- ``seqs-128``: the same with 128 sequences at once and the cache they need (the setting
  before 64);
- ``busy-bound``, ``busy-nobind``: the same next to a process that keeps half a core busy,
  with vLLM's default binding (one thread bound to each core) and with ``nobind`` threads;
- ``busy-passive``: ``busy-bound`` with ``OMP_WAIT_POLICY=PASSIVE`` (a thread that reaches a
  barrier first sleeps instead of spinning; measured, not kept);
- ``compile``: ``top-p + kv`` with vLLM's ``torch.compile`` (``enforce_eager=False``; measured,
  not kept: the start costs more than decoding saves);
- ``native-norm``: ``top-p + kv`` with vLLM's native RMSNorm chain instead of its C++ kernel
  (:mod:`tasks.llm.cpu_norm`), the setting before that lever;
- ``prompt``: histories cut to ``--short-prompt`` tokens (``max_prompt_tokens``).

Every lever but ``before`` and ``native-norm`` runs vLLM's C++ RMSNorm (the flow's setting since
that lever; the rows measured before it in README.md ran the native chain).
Each figure is printed with its share of the roofline (:mod:`bench.ceiling`): the job's
generated tokens over the time a machine at its measured bandwidth and matmul peak would need
for its prefill (every prompt once) and its decoding steps.

    .venv/bin/python bench/bench_sampling.py [--users 87] [--levers before,top-p,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generation import real_prompts  # noqa: E402
from ceiling import ModelShape, decode_bound, measure_ceilings, print_ceilings  # noqa: E402

from tasks.llm.chat import chat_prompt, load_tokenizer  # noqa: E402
from tasks.llm.cpu_norm import ENV as NORM_ENV  # noqa: E402
from tasks.llm.generate import generate  # noqa: E402
from tasks.llm.sampling import SamplingConfig  # noqa: E402
from tasks.llm.top_p import ENV as TOP_P_ENV  # noqa: E402
from tasks.llm.vllm_engine import (  # noqa: E402
    KV_ENV,
    CacheDemand,
    VLLMEngine,
    cpu_kv_cache_bytes,
)

log = logging.getLogger("bench_sampling")

LEVERS = (
    "before",
    "top-p",
    "block-128",
    "top-p + kv",
    "seqs-128",
    "native-norm",
    "busy-bound",
    "busy-nobind",
    "busy-passive",
    "compile",
    "prompt",
)
NOT_KEPT = ("busy-passive", "compile")
"""Run only when named: measured and not kept (README.md has their figures)."""

BUSY = (
    "import time\n"
    "while True:\n"
    "    t = time.perf_counter()\n"
    "    while time.perf_counter() - t < 0.05: pass\n"
    "    time.sleep(0.05)\n"
)
"""A competing process: busy 50 ms, idle 50 ms (about half a core)."""


def job_bound(c, shape: ModelShape, stats: dict, prompts: int, n: int) -> float:
    """Roofline of one job in generated tokens/s: each prompt prefilled once at the matmul
    peak, then the decoding steps at :func:`ceiling.decode_bound` for the batch it runs."""
    prompt = stats["prompt_tokens"] / prompts
    answer = stats["generated_tokens"] / (prompts * n)
    peak = c.matmul_gflops(c.dtype) * 1e9
    prefill_s = stats["prompt_tokens"] * (2 * shape.params + shape.attention_flops(prompt / 2))
    prefill_s /= peak
    batch = min(256, prompts * n)
    decode = decode_bound(c, shape, batch=batch, prompt=prompt, answer=answer, dtype=c.dtype)
    return stats["generated_tokens"] / (
        prefill_s + stats["generated_tokens"] / decode["tokens_per_s"]
    )


def run_lever(name: str, model: str, prompts, cfg: SamplingConfig, max_len: int) -> dict:
    """One fresh engine with the lever's settings; its generation stats."""
    env = dict(os.environ)
    sized = name != "before" and name != "top-p"
    if name == "before":
        os.environ[TOP_P_ENV] = "sort"
    if name in ("before", "native-norm"):
        os.environ[NORM_ENV] = "native"
    if not sized:  # the engine sized as before: 64 full-length sequences, vLLM's max_num_seqs
        os.environ[KV_ENV] = "fixed"
    if name == "busy-nobind":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    if name == "busy-passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if name.startswith("busy") else None
    try:
        tok = load_tokenizer(model)
        lengths = tuple(
            len(tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"])
            for p in prompts["prompt"]
        )
        demand = CacheDemand(lengths, cfg.n, cfg.max_new_tokens)
        engine = VLLMEngine(
            model,
            max_model_len=max_len,
            kv_demand=demand if sized else None,
            enforce_eager=False if name == "compile" else None,
        )
        if name == "seqs-128":
            kv = cpu_kv_cache_bytes(model, max_len, None, demand, max_seqs=128)
            engine.engine_args.update(max_num_seqs=128, kv_cache_memory_bytes=kv)
        if name == "block-128":
            kv = cpu_kv_cache_bytes(model, max_len, None, demand, block=128)
            engine.engine_args.update(block_size=128, kv_cache_memory_bytes=kv)
        with engine:
            _, stats = generate(prompts, model, cfg, "vllm", engine=engine)
        stats["engine_start_seconds"] = engine.engine_start_seconds
        stats["kv_cache_gb"] = engine.engine_args["kv_cache_memory_bytes"] / 1e9
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        os.environ.clear()
        os.environ.update(env)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="prepared run folder (default: prepare one)")
    parser.add_argument("--model", default=None, help="model path or id (default: SmolLM2)")
    parser.add_argument("--users", type=int, default=87, help="prompts (a quick round: 87)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--short-prompt", type=int, default=300, help="the 'prompt' lever's cap")
    parser.add_argument(
        "--levers",
        default=",".join(x for x in LEVERS if x not in NOT_KEPT),
        help=f"any of {LEVERS} (default: all but {NOT_KEPT})",
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from tasks.data.assets import policy_model

    model = policy_model(args.model or "default")
    levers = [x.strip() for x in args.levers.split(",") if x.strip()]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        parser.error(f"--levers: unknown {sorted(unknown)}; choose from {LEVERS}")
    c = measure_ceilings()
    shape = ModelShape.of(model)
    cfg = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, seed=0)
    full = real_prompts(args.run, args.users, None, model)
    short = real_prompts(args.run, args.users, args.short_prompt, model)
    max_len = 768
    rows = []
    for name in levers:
        prompts = short if name == "prompt" else full
        t0 = time.perf_counter()
        stats = run_lever(name, model, prompts, cfg, max_len)
        label = f"top-p + kv, prompt <= {args.short_prompt}" if name == "prompt" else name
        rate = stats["generated_tokens"] / stats["generate_seconds"]
        bound = job_bound(c, shape, stats, prompts.height, cfg.n)
        rows.append(
            {
                "lever": label,
                "tokens_per_s": rate,
                "roofline_tokens_per_s": bound,
                "share": rate / bound,
                "wall_seconds": time.perf_counter() - t0,
                **{k: stats[k] for k in ("generated_tokens", "prompt_tokens", "generate_seconds")},
                "engine_start_seconds": stats["engine_start_seconds"],
                "kv_cache_gb": stats["kv_cache_gb"],
            }
        )
        log.warning("%s: %.1f tokens/s", label, rate)

    print("\n=== ceilings ===")
    print_ceilings(c)
    print(
        f"\n=== sampling levers: {full.height} prompts x n={cfg.n}, <= {cfg.max_new_tokens} "
        f"new tokens, {model} ==="
    )
    first = rows[0]["tokens_per_s"] if rows else 1.0
    print(
        f"{'lever':<32}{'tokens/s':>10}{'vs first':>10}{'roofline':>10}{'share':>8}"
        f"{'gen s':>8}{'start s':>9}{'KV GB':>7}{'prompt tok':>12}"
    )
    for r in rows:
        print(
            f"{r['lever']:<32}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / first:>9.2f}x"
            f"{r['roofline_tokens_per_s']:>10.0f}{r['share']:>8.1%}{r['generate_seconds']:>8.1f}"
            f"{r['engine_start_seconds']:>9.1f}{r['kv_cache_gb']:>7.2f}{r['prompt_tokens']:>12}"
        )
    idle = next((r for r in rows if r["lever"] == "top-p + kv"), None)
    for r in rows:
        if idle and r["lever"].startswith("busy"):
            print(
                f"{r['lever']}: {r['tokens_per_s'] / idle['tokens_per_s']:.0%} of idle throughput"
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": c.__dict__, "levers": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
