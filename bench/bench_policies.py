"""Each policy's cost on this machine: a round's sampling job and LoRA-DPO, side by side.

For every ``--models`` entry (default: SmolLM2-135M and the two opt-in Qwen2.5-Coder policies)
it runs, each in a process of its own and one after the other:

- ``bench_sampling.py --levers prompt``: the flow's sampling settings on the first ``--users``
  users' real ML-100K prompts (histories cut to 300 tokens), ``--n`` samples of at most
  ``--max-new-tokens`` tokens: generated tokens/s and their share of the job's roofline;
- ``bench_dpo.py --levers packed``: the flow's DPO on CPU (packed pairs, compact head) over
  ``--pairs`` pairs with answers of ``--max-new-tokens`` tokens: seconds per pair and their
  share of the DPO roofline.

The models load in fp32 on a CPU without native bf16. Run it alone: vLLM binds one thread per
core, and any other busy process slows it several times.

    .venv/bin/python bench/bench_policies.py --users 32 --pairs 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct")


def run_bench(script: str, args: list[str], out: Path) -> dict | list | None:
    """One benchmark in its own process; its JSON figures, or None when it failed."""
    cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not out.exists():
        print(f"{script} {' '.join(args)}: failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(POLICIES), help="policy names or folders")
    parser.add_argument("--run", default=None, help="prepared run folder (default: prepare one)")
    parser.add_argument("--users", type=int, default=32, help="prompts of the sampling job")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    common = [f"--run={args.run}"] if args.run else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        for k, model in enumerate(x.strip() for x in args.models.split(",") if x.strip()):
            t0 = time.perf_counter()
            sampling = run_bench(
                "bench_sampling.py",
                [
                    *common,
                    f"--model={model}",
                    f"--users={args.users}",
                    f"--n={args.n}",
                    f"--max-new-tokens={args.max_new_tokens}",
                    "--levers=prompt",
                ],
                Path(tmp) / f"sampling{k}.json",
            )
            dpo = run_bench(
                "bench_dpo.py",
                [
                    *common,
                    f"--model={model}",
                    f"--pairs={args.pairs}",
                    "--levers=packed",
                    f"--answer-tokens={args.max_new_tokens}",
                    "--max-prompt-tokens=300",
                ],
                Path(tmp) / f"dpo{k}.json",
            )
            rows.append(
                {
                    "model": model,
                    "sampling": (sampling or {}).get("levers", [{}])[0],
                    "dpo": (dpo or [{}])[0],  # bench_dpo --levers writes its rows
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
    print(
        f"\n=== policies: sampling {args.users} prompts x n={args.n}, <= {args.max_new_tokens} "
        f"new tokens; DPO {args.pairs} pairs ==="
    )
    print(
        f"{'policy':<32}{'tokens/s':>10}{'share':>8}{'vs first':>10}"
        f"{'s/pair':>9}{'share':>8}{'vs first':>10}{'peak GB':>9}"
    )
    first = rows[0] if rows else {"sampling": {}, "dpo": {}}
    rate0, pair0 = first["sampling"].get("tokens_per_s"), first["dpo"].get("seconds_per_pair")
    for r in rows:
        s, d = r["sampling"], r["dpo"]
        rate, per_pair = s.get("tokens_per_s"), d.get("seconds_per_pair")
        print(
            f"{r['model']:<32}{_num(rate, 1):>10}{_pct(s.get('share')):>8}"
            f"{_ratio(rate, rate0):>10}{_num(per_pair, 2):>9}{_pct(d.get('share')):>8}"
            f"{_ratio(per_pair, pair0):>10}{_num(d.get('peak_rss_gb'), 1):>9}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


def _num(v: float | None, digits: int) -> str:
    return "failed" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def _ratio(v: float | None, first: float | None) -> str:
    return "" if v is None or not first else f"{v / first:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
