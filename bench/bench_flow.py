"""Benchmark the RLRF4Rec flow end to end on this machine and print the figures.

1. The quick profile from scratch (a cold embedding cache; the downloaded assets are reused):
   wall time per stage and in total, peak memory (the whole process tree, summed, sampled every
   0.2 s; and its largest single process, e.g. the vLLM engine), and the share of wall time
   outside the stages' own work (Prefect and MLflow overhead).
2. The same run started again: every stage cached; its wall time as a share of the first.
3. Resume after SIGKILL: a fresh run in a subprocess is killed in the middle of round 1 (once
   the round's samples are written), then started again with the same parameters; the files
   written before the kill must be untouched and the run must finish.

``--before`` runs the same with the settings before the sampling and DPO levers of
``bench/bench_sampling.py`` and ``bench/bench_dpo.py``: vLLM's sorting top-p, a KV cache of 64
full-length sequences in vLLM's 128-token blocks and vLLM's 256 sequences at once, vLLM's
native RMSNorm on CPU, TRL's LM head
over every position and two padded rows per DPO pair (one masked attention call each), the
backward in fp32, the encoder in fp32 (the switches of
:data:`tasks.common.stage.RESULT_ENV`), one vLLM engine per sampling stage
(``RLRF4REC_KEEP_ENGINES=0``), the whole history in the policy's prompt and no gradient
checkpointing on CPU (flow flags).

    .venv/bin/python bench/bench_flow.py [--before] [--skip-kill] [extra flow flags]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
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


PAGE = os.sysconf("SC_PAGE_SIZE")
BEFORE = {
    "RLRF4REC_VLLM_TOP_P": "sort",
    "RLRF4REC_VLLM_NORM": "native",
    "RLRF4REC_VLLM_KV": "fixed",
    "RLRF4REC_TRL_HEAD": "full",
    "RLRF4REC_DPO_PACKING": "0",
    "RLRF4REC_BACKWARD_DTYPE": "float32",
    "RLRF4REC_KEEP_ENGINES": "0",
    "RLRF4REC_ENCODER_DTYPE": "float32",
}
BEFORE_FLAGS = ["--max-prompt-tokens", "0", "--no-dpo-gradient-checkpointing"]


def _label(pid: int) -> str:
    """What a process of the flow's tree is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = " ".join(a.decode(errors="replace") for a in argv)
    for needle, label in (
        ("vllm_worker", "vLLM engine"),
        ("flows.iterate", "flow"),
        ("uvicorn", "Prefect server"),
        ("prefect", "Prefect server"),
    ):
        if needle in words:
            return label
    return Path(argv[0].decode(errors="replace")).name or "?"


def _tree_rss(root: int) -> dict[int, int]:
    """RSS in bytes by pid of ``root`` and all its descendants (Linux)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # the command name may hold spaces: the fields after its closing parenthesis are fixed
        parent[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    sizes = {}
    for pid in tree:
        try:
            sizes[pid] = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return sizes


class MemorySampler(threading.Thread):
    """Samples the process tree of ``pid`` every ``every`` seconds; keeps the peaks (bytes)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_total = self.peak_single = 0
        self.peak_at = 0.0  # seconds after the start, when the summed peak was seen
        self.peak_parts: list[tuple[str, int]] = []  # (what, RSS bytes) at the summed peak
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.done.is_set():
            sizes = _tree_rss(self.pid)
            total, single = sum(sizes.values()), max(sizes.values(), default=0)
            if total > self.peak_total:
                self.peak_at = time.perf_counter() - t0
                self.peak_parts = sorted(
                    ((_label(pid), rss) for pid, rss in sizes.items()), key=lambda x: -x[1]
                )
            self.peak_total = max(self.peak_total, total)
            self.peak_single = max(self.peak_single, single)
            self.done.wait(self.every)


def _run(cmd: list[str], env: dict) -> tuple[float, MemorySampler]:
    """Run the flow to the end: (wall seconds, its memory peaks); exits on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sampler = MemorySampler(proc.pid)
    sampler.start()
    _, stderr = proc.communicate()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        print(stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"flow failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, sampler


def _cold_embedding_cache(work: Path) -> Path:
    """An asset cache whose downloads link to the user's, with an empty embedding cache."""
    from tasks.data.assets import cache_dir

    real, cold = cache_dir(), work / "cache"
    cold.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir() if real.exists() else []:
        link = cold / entry.name
        if entry.name != "embeddings" and not link.exists():
            link.symlink_to(entry.resolve())
    return cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-kill", action="store_true", help="skip the SIGKILL resume check")
    ap.add_argument("--workdir", default=None, help="where runs and the MLflow store go")
    ap.add_argument("--before", action="store_true", help="the settings before the levers")
    args, extra = ap.parse_known_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-flow-"))
    runs = work / "runs"
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        RLRF4REC_CACHE=str(_cold_embedding_cache(work)),
        **(BEFORE if args.before else {}),
    )
    if args.before:
        extra = [*BEFORE_FLAGS, *extra]
        print(f"# before the levers: {BEFORE} {' '.join(BEFORE_FLAGS)}")

    # 1. from scratch
    first, mem = _run(_flow_cmd("bench", runs, extra), env)
    results = json.loads((runs / "bench" / "results.json").read_text())["results"]
    profile = json.loads((runs / "bench" / "results.json").read_text())["params"]["profile"]
    print(f"# {profile} profile, from scratch: {first:.1f} s wall (process, incl. start-up)")
    print(f"flow wall {results['wall_seconds']:.1f} s, stages {results['stage_seconds']:.1f} s")
    overhead = 1 - results["stage_seconds"] / results["wall_seconds"]
    print(f"overhead outside the stages (Prefect, MLflow, glue): {overhead:.1%} of flow wall")
    print(
        f"peak memory of the whole process tree (summed RSS): {mem.peak_total / 2**20:.0f} MiB, "
        f"{mem.peak_at:.0f} s after the start"
    )
    parts = ", ".join(f"{what} {rss / 2**20:.0f}" for what, rss in mem.peak_parts if rss > 2**24)
    print(f"at the peak (MiB): {parts}")
    single = mem.peak_single / 2**20
    print(f"peak RSS of its largest process (flow or vLLM engine): {single:.0f} MiB")
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
    # Same parameters in another run folder: the tables must match the uninterrupted run's.
    table = {
        name: json.loads((runs / name / "results.json").read_text())["results"]["table1"]
        for name in ("bench", "killed")
    }
    print(
        f"killed-and-resumed Table I identical to the uninterrupted run's: "
        f"{table['bench'] == table['killed']}"
    )


if __name__ == "__main__":
    main()
