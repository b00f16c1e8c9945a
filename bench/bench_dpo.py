"""DPO training cost: seconds per (prompt, chosen, rejected) pair, LoRA, fp32 on CPU.

Real MovieLens-100K KAR prompts (about 400-500 tokens in the chat template) with synthetic
answers of ``--answer-tokens`` tokens each (the length of the policy's preference texts), the
default policy (SmolLM2-135M-Instruct) unless ``--model``, the fast default
:class:`tasks.llm.dpo.DPOConfig` (or ``--paper``), one pass over ``--pairs`` pairs.

    python bench/bench_dpo.py --pairs 16 --answer-tokens 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

from tasks.llm.dpo import DPOConfig, train_dpo  # noqa: E402
from tasks.llm.lora import resolve_device  # noqa: E402

log = logging.getLogger("bench_dpo")

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


def build_pairs(run: str | None, n: int, answer_tokens: int, model: str) -> pl.DataFrame:
    from tasks.data.prepare import load_prepared, prepare
    from tasks.llm.chat import load_tokenizer
    from tasks.rlrf4rec.prompts import prompt_table

    if run is None:
        run = tempfile.mkdtemp(prefix="bench-ml100k-")
        prepare("ml-100k", run)
    data = load_prepared(run)
    ids = data.users.sort("user_id")["user_id"].head(n).to_list()
    prompts = prompt_table(data.users, data.history, data.items, "ml-100k", user_ids=ids)
    tok = load_tokenizer(model)
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
    parser.add_argument("--paper", action="store_true", help="DPOConfig.paper() (one epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from tasks.data.assets import policy_model
    from tasks.rlrf4rec.prompts import count_prompt_tokens

    model = args.model or policy_model()
    pairs = build_pairs(args.run, args.pairs, args.answer_tokens, model)
    cfg = DPOConfig.paper(epochs=1.0) if args.paper else DPOConfig()
    prompt_tokens = [count_prompt_tokens(model, p) for p in pairs["prompt"]]
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
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
        "loss": m["loss"],
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


if __name__ == "__main__":
    sys.exit(main())
