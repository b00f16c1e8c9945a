"""Benchmark the RLRF4Rec flow end to end on this machine and print the figures.

1. The quick profile from scratch: wall time per stage and in total, peak memory (this process
   and its largest child, e.g. the vLLM engine), and the share of wall time outside the stages'
   own work (Prefect and MLflow overhead).
2. The same run started again: every stage cached; its wall time as a share of the first.
3. Resume after SIGKILL: a fresh run in a subprocess is killed in the middle of round 1 (once
   the round's samples are written), then started again with the same parameters; the files
   written before the kill must be untouched and the run must finish.

    .venv/bin/python bench/bench_flow.py [--profile quick] [--skip-kill] [extra flow flags]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _flow_cmd(run_name: str, runs_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.iterate",
        "--run-name",
        run_name,
        "--runs-dir",
        str(runs_dir),
        *extra,
    ]


def _run(cmd: list[str], env: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"flow failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-kill", action="store_true", help="skip the SIGKILL resume check")
    ap.add_argument("--workdir", default=None, help="where runs and the MLflow store go")
    args, extra = ap.parse_known_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-flow-"))
    runs = work / "runs"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")

    # 1. from scratch
    first, _ = _run(_flow_cmd("bench", runs, extra), env)
    peak_child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = json.loads((runs / "bench" / "results.json").read_text())["results"]
    print(f"# quick profile, from scratch: {first:.1f} s wall (process, incl. start-up)")
    print(f"flow wall {results['wall_seconds']:.1f} s, stages {results['stage_seconds']:.1f} s")
    overhead = 1 - results["stage_seconds"] / results["wall_seconds"]
    print(f"overhead outside the stages (Prefect, MLflow, glue): {overhead:.1%} of flow wall")
    print(f"peak RSS of the largest process (flow or vLLM engine): {peak_child_mb:.0f} MB")
    print("\n| stage | seconds |\n|---|---|")
    for name, sec in results["timings"].items():
        print(f"| {name} | {sec:.1f} |")

    # 2. cached re-run
    second, _ = _run(_flow_cmd("bench", runs, extra), env)
    print(f"\n# same run again (all cached): {second:.1f} s = {second / first:.1%} of the first")

    if args.skip_kill:
        return
    # 3. SIGKILL in the middle of round 1, then resume
    cmd = _flow_cmd("killed", runs, extra)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = runs / "killed" / "round_01" / "samples.parquet"
    t0 = time.perf_counter()
    while not marker.exists():
        if proc.poll() is not None:
            raise SystemExit("the run ended before round 1's samples were written")
        time.sleep(0.5)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - t0
    written = {p: p.stat().st_mtime_ns for p in (runs / "killed").rglob("*.parquet")}
    resumed, _ = _run(cmd, env)
    untouched = all(p.exists() and p.stat().st_mtime_ns == m for p, m in written.items())
    print(f"\n# SIGKILL at {killed_at:.1f} s (round 1, after sampling), resumed in {resumed:.1f} s")
    print(f"files written before the kill: {len(written)}, all untouched after resume: {untouched}")
    print(f"resume + killed part = {(killed_at + resumed) / first:.1%} of an uninterrupted run")


if __name__ == "__main__":
    main()
