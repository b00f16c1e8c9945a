"""Generation throughput: vLLM vs transformers on the same prompts, N, budget and model.

Real MovieLens-100K KAR prompts (the first ``--users`` users of a prepared run, or a fresh
``ml-100k`` preparation), the default policy (SmolLM2-135M-Instruct) unless ``--model``.
Generated tokens per second = generated tokens / generation seconds (model load and engine
start excluded; reported apart). With ``--transition`` it also measures what a round
transition costs: merging a LoRA adapter and starting a fresh engine on the merged
checkpoint, versus loading the adapter as a LoRA in a running engine (and generating with it).

    python bench/bench_generation.py --users 16 --n 4 --max-new-tokens 128 --transition
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from tasks.llm.devices import available_gpus  # noqa: E402
from tasks.llm.generate import generate  # noqa: E402
from tasks.llm.lora import merged_checkpoint  # noqa: E402
from tasks.llm.sampling import SamplingConfig  # noqa: E402
from tasks.llm.vllm_engine import VLLMEngine  # noqa: E402

log = logging.getLogger("bench_generation")


def real_prompts(
    run: str | None, users: int, max_prompt_tokens: int | None, model: str
) -> pl.DataFrame:
    """KAR prompts of the first ``users`` users of a prepared ML-100K run."""
    from tasks.data.prepare import load_prepared, prepare
    from tasks.rlrf4rec.prompts import prompt_table

    if run is None:
        run = tempfile.mkdtemp(prefix="bench-ml100k-")
        prepare("ml-100k", run)
    data = load_prepared(run)
    ids = data.users.sort("user_id")["user_id"].head(users).to_list()
    table = prompt_table(
        data.users,
        data.history,
        data.items,
        data.meta.get("dataset", "ml-100k"),
        user_ids=ids,
        max_prompt_tokens=max_prompt_tokens,
        tokenizer=model,
    )
    return table.select("user_id", "prompt")


def random_adapter(model: str, out: Path, r: int = 16) -> str:
    """A LoRA with non-zero random weights on q/k/v/o (stands in for a trained round)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # small weights: a plausible adapter, not noise that breaks the model
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.01)
    peft_model.save_pretrained(out)
    return str(out)


def summary(stats: dict) -> dict:
    keep = ("backend", "generated_tokens", "generate_seconds", "tokens_per_s", "load_seconds")
    out = {k: stats[k] for k in keep if k in stats}
    out["tokens_per_s_with_load"] = stats["generated_tokens"] / max(1e-9, stats["seconds"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="prepared run folder (default: prepare one)")
    parser.add_argument("--model", default=None, help="model path or id (default: SmolLM2)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="vllm,transformers")
    parser.add_argument("--hf-batch-size", type=int, default=None)
    parser.add_argument("--hf-dtype", default="auto", help="transformers dtype (auto: bf16 here)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per backend")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both backends (vLLM then skips its core binding); "
        "1 is steadier on a machine shared with other jobs",
    )
    parser.add_argument("--transition", action="store_true", help="measure a round transition")
    parser.add_argument("--samples", type=int, default=3, help="sample texts to print")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        torch.set_num_threads(args.threads)

    from tasks.data.assets import policy_model

    model = policy_model(args.model or "default")
    prompts = real_prompts(args.run, args.users, args.max_prompt_tokens, model)
    cfg = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed)
    device = (
        f"{len(available_gpus())} GPU(s)" if available_gpus() else f"CPU ({os.cpu_count()} cores)"
    )
    result: dict = {
        "model": model,
        "device": device,
        "prompts": prompts.height,
        "sampling": cfg.to_dict(),
        "threads": args.threads,
        "backends": {},
    }
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    texts = None
    engine = None
    if "vllm" in backends:
        from tasks.rlrf4rec.prompts import count_prompt_tokens

        longest = max(count_prompt_tokens(model, p) for p in prompts["prompt"])
        max_len = 256 * (1 + (longest + cfg.max_new_tokens) // 256)
        engine = VLLMEngine(model, max_model_len=max_len).start()
        result["vllm_engine_start_seconds"] = engine.engine_start_seconds
    try:
        # Alternate the backends, so that a change in the machine's load hits both.
        for rep in range(args.repeats):
            for backend in backends:
                samples, stats = generate(
                    prompts,
                    model,
                    cfg,
                    backend,  # type: ignore[arg-type]
                    engine=engine if backend == "vllm" else None,
                    batch_size=args.hf_batch_size,
                    dtype=args.hf_dtype if backend == "transformers" else "auto",
                )
                run = summary(stats)
                run["degenerate_share"] = float(samples["degenerate"].mean())
                run["mean_tokens"] = float(samples["n_tokens"].mean())
                runs[backend].append(run)
                log.info("repeat %d %s: %.1f tokens/s", rep, backend, run["tokens_per_s"])
                if texts is None:
                    texts = samples
    finally:
        if engine is not None:
            engine.close()
    b = {}
    for backend, rs in runs.items():
        rates = sorted(r["tokens_per_s"] for r in rs)
        b[backend] = {**rs[-1], "tokens_per_s": rates[len(rates) // 2], "all_tokens_per_s": rates}
        if backend == "vllm":
            start = result["vllm_engine_start_seconds"]
            b[backend]["load_seconds"] = start
            b[backend]["tokens_per_s_with_load"] = rs[-1]["generated_tokens"] / (
                rs[-1]["generate_seconds"] + start
            )
    result["backends"] = b
    if "vllm" in b and "transformers" in b:
        result["speedup"] = b["vllm"]["tokens_per_s"] / b["transformers"]["tokens_per_s"]
        result["speedup_per_repeat"] = [
            v["tokens_per_s"] / t["tokens_per_s"]
            for v, t in zip(runs["vllm"], runs["transformers"], strict=True)
        ]

    if args.transition:
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
            adapter = random_adapter(model, Path(tmp) / "round_01" / "adapter")
            t0 = time.perf_counter()
            merged = merged_checkpoint(model, adapter)
            merge_s = time.perf_counter() - t0
            _, merged_stats = generate(prompts, merged, cfg, "vllm")
            with VLLMEngine(model, enable_lora=True, max_lora_rank=16) as engine:
                _, base_in_lora_engine = generate(prompts, model, cfg, "vllm", engine=engine)
                _, lora_stats = generate(
                    prompts, model, cfg, "vllm", adapter=adapter, engine=engine
                )
                lora_engine_start = engine.engine_start_seconds
        result["transition"] = {
            "merge_seconds": merge_s,
            "merged_engine_start_seconds": merged_stats["load_seconds"],
            "merged_tokens_per_s": merged_stats["tokens_per_s"],
            "merged_transition_seconds": merge_s + merged_stats["load_seconds"],
            "lora_engine_start_seconds": lora_engine_start,
            "lora_engine_base_tokens_per_s": base_in_lora_engine["tokens_per_s"],
            "lora_tokens_per_s": lora_stats["tokens_per_s"],
            "lora_job_seconds": lora_stats["seconds"],
        }

    print("\n=== generation benchmark ===")
    print(f"model {model}\ndevice {device}")
    print(
        f"{prompts.height} prompts x n={cfg.n}, max_new_tokens={cfg.max_new_tokens}, "
        f"temperature={cfg.temperature}, top_p={cfg.top_p}"
    )
    for name, s in b.items():
        print(
            f"{name:<13} {s['tokens_per_s']:8.1f} generated tokens/s (median of "
            f"{[round(x, 1) for x in s['all_tokens_per_s']]}) "
            f"({s['generated_tokens']} tokens in {s['generate_seconds']:.1f} s; "
            f"load {s['load_seconds']:.1f} s; {s['tokens_per_s_with_load']:.1f} tokens/s with it; "
            f"degenerate {s['degenerate_share']:.0%})"
        )
    if "speedup" in result:
        per = ", ".join(f"{x:.2f}" for x in result["speedup_per_repeat"])
        print(f"vLLM / transformers: {result['speedup']:.2f}x (per repeat: {per})")
    if "transition" in result:
        t = result["transition"]
        print(
            f"round transition, merged: merge {t['merge_seconds']:.1f} s + engine start "
            f"{t['merged_engine_start_seconds']:.1f} s, "
            f"then {t['merged_tokens_per_s']:.1f} tokens/s"
        )
        print(
            f"round transition, LoRA in a running engine: job {t['lora_job_seconds']:.1f} s at "
            f"{t['lora_tokens_per_s']:.1f} tokens/s (base model in that engine "
            f"{t['lora_engine_base_tokens_per_s']:.1f} tokens/s; engine start "
            f"{t['lora_engine_start_seconds']:.1f} s once)"
        )
    if texts is not None and args.samples:
        print("\n--- sample texts ---")
        for row in texts.filter(pl.col("sample_idx") == 0).head(args.samples).iter_rows(named=True):
            print(
                f"[user {row['user_id']} sample {row['sample_idx']}, {row['n_tokens']} tokens, "
                f"{row['finish_reason']}]\n{row['text']}\n"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
