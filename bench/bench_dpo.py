"""DPO training cost: seconds per (prompt, chosen, rejected) pair, LoRA, on CPU.

Real MovieLens-100K KAR prompts (about 400-500 tokens in the chat template) with synthetic
answers of ``--answer-tokens`` tokens each (the length of the policy's preference texts), the
default policy (SmolLM2-135M-Instruct) unless ``--model``, the fast default
:class:`tasks.llm.dpo.DPOConfig` (or ``--paper``), one pass over ``--pairs`` pairs.

``--levers`` runs each lever in its own process on the same pairs (so each has its own peak
memory) and prints them side by side with their share of the DPO roofline (:mod:`ceiling`):

- ``full-head``: TRL's LM head scores every position (prompt included) on CPU (before);
- ``compact-head``: it scores only the answer's positions (:mod:`tasks.llm.trl_cpu`);
- ``packed``: and each pair's prompt computed once, chosen and rejected in one packed row
  (:mod:`tasks.llm.dpo_packing`);
- ``bf16-autocast``: compact head and the matmuls in bf16 (``cpu_bf16_autocast``; native-bf16
  CPUs only);
- ``checkpointing``: compact head with gradient checkpointing (less memory, more time);
- ``bf16-backward``: packed, and the frozen weights' backward matmuls in bf16
  (:mod:`tasks.llm.bf16_backward`; the forward and the loss stay fp32): the default on a CPU
  with native bf16;
- ``bf16-backward-checkpointing``: the same with gradient checkpointing;
- ``masked-attention``: ``bf16-backward`` with each packed row's attention in one masked sdpa
  call (``RLRF4REC_DPO_ATTENTION=masked``, before the prompt's part ran causally on its own);
- ``trl-tiles``: ``bf16-backward`` with TRL's own folds of the head's logits tiles, 32,768
  vocabulary entries each (``RLRF4REC_TRL_HEAD=compact``; the default cuts tiles of 1,024
  and folds each in place, :mod:`tasks.llm.trl_cpu`, and so do the ``bf16-backward*`` levers
  and ``masked-attention``; the levers before them ran with TRL's);
- ``top-half``: compact head, LoRA on the top half of the layers only, no checkpointing: the
  backward pass stops at the lowest adapted layer (``lora_layers``).

``full-head``, ``compact-head`` and ``checkpointing`` run with two padded rows per pair, as
TRL does; every lever but ``bf16-backward*`` with an fp32 backward.

    python bench/bench_dpo.py --pairs 16 --answer-tokens 200
    python bench/bench_dpo.py --pairs 8 --answer-tokens 96 --max-prompt-tokens 300 \
        --levers full-head,compact-head,packed,bf16-backward,checkpointing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from tasks.common.hardware import cpu_flags, native_bf16  # noqa: E402
from tasks.llm import bf16_backward, dpo_packing, trl_cpu  # noqa: E402
from tasks.llm.dpo import DPOConfig, train_dpo  # noqa: E402
from tasks.llm.lora import resolve_device  # noqa: E402

log = logging.getLogger("bench_dpo")

LEVERS = (
    "full-head",
    "compact-head",
    "packed",
    "bf16-autocast",
    "checkpointing",
    "bf16-backward",
    "bf16-backward-checkpointing",
    "top-half",
    "masked-attention",
    "trl-tiles",
)
LEAN_HEAD = ("bf16-backward", "bf16-backward-checkpointing", "masked-attention")
BF16_BACKWARD = (*LEAN_HEAD, "trl-tiles")
PACKED = ("packed", *BF16_BACKWARD)
CHECKPOINTED = ("checkpointing", "bf16-backward-checkpointing")

GOOD = (
    "This user enjoys thoughtful dramas and classic science fiction with strong characters. "
    "They rate critically acclaimed films from the 1970s and 1990s highly, favour clever "
    "plots, memorable soundtracks and high production quality, and prefer a hopeful tone. "
)
BAD = (
    "The user watches movies. Movies have genres and actors. Some movies are long and some "
    "are short. The user may like some of them and may not like others, depending on things. "
)


def answer(text: str, tokens: int, tokenizer) -> str:
    """``text`` repeated and cut to about ``tokens`` tokens."""
    ids = tokenizer((text * (1 + tokens // 20))[: tokens * 8], add_special_tokens=False)
    return tokenizer.decode(ids["input_ids"][:tokens])


def build_pairs(
    run: str | None, n: int, answer_tokens: int, model: str, max_prompt_tokens: int | None
) -> pl.DataFrame:
    from tasks.data.prepare import load_prepared, prepare
    from tasks.llm.chat import load_tokenizer
    from tasks.rlrf4rec.prompts import prompt_table

    if run is None:
        run = tempfile.mkdtemp(prefix="bench-ml100k-")
        prepare("ml-100k", run)
    data = load_prepared(run)
    ids = data.users.sort("user_id")["user_id"].head(n).to_list()
    tok = load_tokenizer(model)
    prompts = prompt_table(
        data.users,
        data.history,
        data.items,
        "ml-100k",
        user_ids=ids,
        max_prompt_tokens=max_prompt_tokens,
        tokenizer=tok,
    )
    return pl.DataFrame(
        {
            "prompt": prompts["prompt"],
            "chosen": [answer(GOOD, answer_tokens, tok)] * prompts.height,
            "rejected": [answer(BAD, answer_tokens, tok)] * prompts.height,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="prepared run folder (default: prepare one)")
    parser.add_argument("--model", default=None, help="model path or id (default: SmolLM2)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="cut the history to fit (the quick profile's 300; default: the whole history)",
    )
    parser.add_argument("--paper", action="store_true", help="DPOConfig.paper() (one epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--levers", default=None, help=f"compare levers, any of {LEVERS}")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="one lever under the torch profiler: print its K costliest operators",
    )
    parser.add_argument(
        "--lever",
        default="compact-head",
        choices=LEVERS,
        help="the one lever of a run without --levers (e.g. under --profile)",
    )
    args = parser.parse_args(argv)
    if args.levers:
        return compare(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from tasks.data.assets import policy_model
    from tasks.rlrf4rec.prompts import count_prompt_tokens

    model = policy_model(args.model or "default")
    pairs = build_pairs(args.run, args.pairs, args.answer_tokens, model, args.max_prompt_tokens)
    cfg = DPOConfig.paper(epochs=1.0) if args.paper else DPOConfig()
    cfg = replace(
        cfg,
        cpu_bf16_autocast=args.lever == "bf16-autocast",
        # the levers' "before" ran without it
        gradient_checkpointing=args.lever in CHECKPOINTED,
    )
    if args.lever not in PACKED:
        os.environ[dpo_packing.ENV] = "0"
    if args.lever in BF16_BACKWARD and not native_bf16(cpu_flags()):
        raise SystemExit(
            f"--lever {args.lever}: this CPU has no native bf16 (see bench/ceiling.py)"
        )
    os.environ[bf16_backward.ENV] = "bfloat16" if args.lever in BF16_BACKWARD else "float32"
    if args.lever == "masked-attention":
        os.environ[dpo_packing.ATTENTION_ENV] = "masked"
    os.environ[trl_cpu.ENV] = "lean" if args.lever in LEAN_HEAD else "compact"
    if args.lever == "full-head":
        os.environ[trl_cpu.ENV] = "full"
    if args.lever == "top-half":
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model).num_hidden_layers
        cfg = replace(cfg, lora_layers=layers // 2, gradient_checkpointing=None)
    prompt_tokens = [count_prompt_tokens(model, p) for p in pairs["prompt"]]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp, profiled(args.profile):
        out = train_dpo(model, pairs, Path(tmp) / "dpo", cfg)
    m = out["metrics"]
    device = resolve_device(cfg.device)
    result = {
        "model": model,
        "device": str(device),
        "threads": __import__("torch").get_num_threads(),
        "pairs": pairs.height,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "answer_tokens": args.answer_tokens,
        "config": cfg.to_dict(),
        "train_seconds": m["train_seconds"],
        "seconds_per_pair": m["seconds_per_pair"],
        "steps": m["steps"],
        "lever": args.lever,
        "loss": m["loss"],
        "logps/chosen": m.get("logps/chosen"),
        "rewards/margins": m.get("rewards/margins"),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print("\n=== DPO benchmark ===")
    print(f"model {model} on {device} ({result['threads']} threads), fp32, LoRA r={cfg.lora_r}")
    print(
        f"{pairs.height} pairs, prompts {result['mean_prompt_tokens']:.0f} tokens, answers "
        f"{args.answer_tokens} tokens, batch {cfg.batch_size} x accumulation {cfg.grad_accum}"
    )
    print(
        f"{m['train_seconds']:.1f} s for {m['steps']} optimizer steps: "
        f"{m['seconds_per_pair']:.2f} s per pair; peak memory {result['peak_rss_gb']:.1f} GB"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


@contextlib.contextmanager
def profiled(top: int) -> Iterator[None]:
    """With ``top`` > 0, the block under the torch profiler; then its ``top`` costliest
    operators (self CPU time) and their share of the block's wall time."""
    if top <= 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    wall = time.perf_counter() - t
    rows = sorted(((e.self_cpu_time_total / 1e6, e.key) for e in prof.key_averages()), reverse=True)
    ops_s = sum(s for s, _ in rows)
    print(f"\n=== where the DPO run's {wall:.1f} s go (self CPU time) ===")
    for s, k in rows[:top]:
        print(f"  {k[:40]:<40}{s:>9.1f}{s / wall:>9.1%}")
    print(f"  {'outside operators (Python)':<40}{wall - ops_s:>9.1f}{(wall - ops_s) / wall:>9.1%}")


def compare(args: argparse.Namespace) -> int:
    """Each lever in a fresh process on the same pairs; the table with roofline shares."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ceiling import ModelShape, dpo_pair_bound, measure_ceilings, print_ceilings

    from tasks.data.assets import policy_model

    levers = [x.strip() for x in args.levers.split(",") if x.strip()]
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise SystemExit(f"--levers: unknown {sorted(unknown)}; choose from {LEVERS}")
    rest = [f"--pairs={args.pairs}", f"--answer-tokens={args.answer_tokens}"]
    if args.max_prompt_tokens:
        rest += [f"--max-prompt-tokens={args.max_prompt_tokens}"]
    rest += [f"--run={args.run}"] if args.run else []
    rest += [f"--model={args.model}"] if args.model else []
    rest += [f"--threads={args.threads}"] if args.threads else []
    rest += ["--paper"] if args.paper else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dpo-levers-") as tmp:
        for lever in levers:
            out = Path(tmp) / f"{lever}.json"
            cmd = [sys.executable, __file__, *rest, "--lever", lever, "--out", str(out)]
            subprocess.run(cmd, check=True)
            rows.append(json.loads(out.read_text()))
    c = measure_ceilings()
    shape = ModelShape.of(policy_model(args.model or "default"))
    print("\n=== ceilings ===")
    print_ceilings(c)
    first = rows[0]
    width = max(len(r["lever"]) for r in rows) + 2
    print(
        f"\n=== DPO levers: {first['pairs']} pairs, prompts {first['mean_prompt_tokens']:.0f} "
        f"tokens, answers {first['answer_tokens']} tokens ==="
    )
    print(
        f"{'lever':<{width}}{'s/pair':>8}{'vs first':>10}{'roofline':>10}{'share':>8}{'loss':>9}"
        f"{'margins':>10}{'logps/ch':>10}{'peak GB':>9}"
    )
    for r in rows:
        tokens = r["mean_prompt_tokens"] + r["answer_tokens"]
        dtype = "bfloat16" if r["lever"] == "bf16-autocast" else "float32"
        shared = r["mean_prompt_tokens"] - 1 if r["lever"] in PACKED else 0.0
        bound = dpo_pair_bound(
            c,
            shape,
            tokens=tokens,
            dtype=dtype,
            reference_forward=True,
            shared_prompt=shared,
            backward_dtype=c.dtype if r["lever"] in BF16_BACKWARD else None,
        )
        rate = 1 / r["seconds_per_pair"]
        r["roofline_pairs_per_s"] = bound["pairs_per_s"]
        r["share"] = rate / bound["pairs_per_s"]
        print(
            f"{r['lever']:<{width}}{r['seconds_per_pair']:>8.2f}"
            f"{first['seconds_per_pair'] / r['seconds_per_pair']:>9.2f}x"
            f"{1 / bound['pairs_per_s']:>9.2f}s{r['share']:>8.1%}{r['loss']:>9.4f}"
            f"{r['rewards/margins'] or 0:>10.4f}{r['logps/chosen'] or 0:>10.2f}"
            f"{r['peak_rss_gb']:>9.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
