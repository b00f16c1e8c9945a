"""SFT training cost: seconds per example, LoRA, on CPU, on the direct pipeline's real windows.

The examples are the direct flow's SFT examples (You et al.'s prompt, the five ground-truth
titles as the answer) of ML-100K's train users at seed 0, the default policy (SmolLM2-135M)
unless ``--model``, :meth:`tasks.llm.sft.SFTConfig.direct_cpu` (batch 4) for ``--steps``
optimizer steps. ``--levers`` runs each lever in its own process on the same examples and
prints them side by side with their share of this machine's fp32 matmul ceiling
(:mod:`ceiling`; a LoRA step costs ~6 x params FLOPs a token with checkpointing, ~4 without):

- ``checkpointing``: LoRA on every layer with gradient checkpointing (before);
- ``no-checkpointing``: the same without it (the backward pass keeps every activation);
- ``top-half``: LoRA on the top half of the layers only, no checkpointing: the backward pass
  stops at the lowest adapted layer;
- ``full-head``: ``no-checkpointing`` with TRL's LM head as it ships, scoring every position
  on CPU (``RLRF4REC_TRL_HEAD=full``: SFT before it called :func:`tasks.llm.trl_cpu.install`,
  and every lever's figure before that);
- ``trl-tiles``: ``no-checkpointing`` with the head on the answer's positions only, in TRL's
  32,768-wide tiles (``RLRF4REC_TRL_HEAD=compact``); the other levers run the default, those
  positions in tiles of 1,024 folded in place.

    python bench/bench_sft.py --levers checkpointing,no-checkpointing,top-half --steps 3
    python bench/bench_sft.py --levers full-head,trl-tiles,no-checkpointing --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

LEVERS = ("checkpointing", "no-checkpointing", "top-half", "full-head", "trl-tiles")
HEAD_MODES = {"full-head": "full", "trl-tiles": "compact"}


def build_examples(n: int) -> pl.DataFrame:
    """The first ``n`` SFT examples of ML-100K's train windows (seed 0, default windows)."""
    from tasks.data.datasets import load_dataset
    from tasks.direct.scoring import load_direct, sft_examples
    from tasks.direct.windows import WindowConfig, prepare_direct, select

    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        prepare_direct(load_dataset("ml-100k", None), Path(tmp), WindowConfig(seed=0))
        windows, _ = load_direct(tmp)
        return sft_examples(select(windows, "train", None)).head(n)


def lever_config(lever: str, n_layers: int):
    from tasks.llm.sft import SFTConfig

    cfg = SFTConfig.direct_cpu()
    if lever == "checkpointing":
        return replace(cfg, gradient_checkpointing=True)
    if lever in ("no-checkpointing", *HEAD_MODES):
        return replace(cfg, gradient_checkpointing=False)
    return replace(cfg, gradient_checkpointing=False, lora_layers=n_layers // 2)


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig

    from tasks.data.assets import policy_model
    from tasks.llm import trl_cpu
    from tasks.llm.chat import load_tokenizer
    from tasks.llm.sft import train_sft

    os.environ[trl_cpu.ENV] = HEAD_MODES.get(args.lever, "lean")
    model = policy_model(args.model or "default")
    n_layers = AutoConfig.from_pretrained(model).num_hidden_layers
    cfg = lever_config(args.lever, n_layers)
    examples = build_examples(cfg.batch_size * args.steps)
    tok = load_tokenizer(model)
    tokens = [
        len(tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            tokenize=True, return_dict=False,
        ))
        for p, c in zip(examples["prompt"], examples["completion"], strict=True)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        out = train_sft(model, examples, Path(tmp) / "sft", cfg)
    m = out["metrics"]
    return {
        "lever": args.lever,
        "model": model,
        "threads": torch.get_num_threads(),
        "examples": examples.height,
        "mean_tokens": sum(tokens) / len(tokens),
        "train_seconds": m["train_seconds"],
        "seconds_per_example": m["seconds_per_example"],
        "loss": m["loss"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def compare(args: argparse.Namespace) -> int:
    import torch
    from ceiling import ModelShape, measure_matmul

    from tasks.common.hardware import cpu_model
    from tasks.data.assets import policy_model

    levers = [x.strip() for x in args.levers.split(",") if x.strip()]
    bad = [x for x in levers if x not in LEVERS]
    if bad:
        raise SystemExit(f"--levers: unknown {bad}; choose from {LEVERS}")
    fp32 = max(measure_matmul(torch.float32) for _ in range(2))
    params = ModelShape.of(policy_model(args.model or "default")).params
    rows = []
    for lever in levers:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--lever", lever, "--steps", str(args.steps),
                   "--out", f.name] + (["--model", args.model] if args.model else [])  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rows.append(json.loads(Path(f.name).read_text()))
    print(f"\n=== SFT levers ({cpu_model()}; fp32 matmul {fp32:.0f} GFLOP/s) ===")
    first = rows[0]
    print(f"{first['examples']} examples of {first['mean_tokens']:.0f} tokens, batch 4, "
          f"{first['threads']} threads, {first['model']}")  # fmt: skip
    print("| lever | s/example | vs first | GFLOP/s (6N/token) | share of fp32 | loss | peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops = 6 * params * r["mean_tokens"]  # the before's FLOPs: same work done
        gflops = flops / r["seconds_per_example"] / 1e9
        print(
            f"| {r['lever']} | {r['seconds_per_example']:.2f} | "
            f"{first['seconds_per_example'] / r['seconds_per_example']:.2f}x | {gflops:.0f} | "
            f"{gflops / fp32:.0%} | {r['loss']:.4f} | {r['peak_rss_gb']:.2f} GB |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path or id (default: SmolLM2)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of 4 examples")
    parser.add_argument("--levers", default=None, help=f"compare levers, any of {LEVERS}")
    parser.add_argument("--lever", default="checkpointing", choices=LEVERS)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.levers:
        return compare(args)
    result = run_one(args)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
