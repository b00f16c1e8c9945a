"""The vLLM worker process: ``python -m tasks.llm.vllm_worker``.

One process holds one vLLM engine and serves generation jobs; :mod:`tasks.llm.vllm_engine`
starts it. Running vLLM in its own process isolates its memory (the KV cache is freed when the
process ends), satisfies vLLM's ``if __name__ == "__main__"`` requirement whoever the caller
is, and makes one engine per GPU trivial (the parent sets ``CUDA_VISIBLE_DEVICES``).

The engine runs inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni``
executor, unless the environment says otherwise): the torch RNG it samples from is then this
process's, so each job reseeds it (and empties vLLM's prefix cache) and the same seed and
inputs give the same texts, whether the engine is fresh or has served other jobs. (A
per-request ``seed`` in ``SamplingParams`` crashes the CPU worker, see docs/design.md.)

``python -m tasks.llm.vllm_worker --engine ENGINE.json``: jobs as JSON lines on stdin, one reply
line per job on stdout (prefixed with :data:`REPLY_PREFIX`; everything else on stdout is
vLLM's log), a ``ready`` reply once the engine has started; exits at the end of stdin.
:class:`tasks.llm.vllm_engine.VLLMEngine` drives it (a one-off
:func:`tasks.llm.generate.generate` call starts one, sends its job and closes it).

ENGINE.json: keyword arguments of ``vllm.LLM`` (``model``, ``seed``, ``dtype``,
``max_model_len``, ``gpu_memory_utilization``, ``enforce_eager``, ``enable_lora``,
``max_lora_rank``, ...).

JOB.json: ``prompts_path`` (parquet: ``idx`` Int64, ``prompt_token_ids`` List(Int64), the
chat-formatted prompts already tokenized), ``out_path`` (parquet written: ``idx``,
``sample_idx``, ``text``, ``n_tokens``, ``finish_reason``), ``stats_path`` (JSON written),
``sampling`` (``n``, ``temperature``, ``top_p``, ``max_tokens``, ``seed``, ``stop_token_ids``:
:func:`tasks.llm.chat.stop_token_ids` of the served model) and ``lora``
(``{"name", "id", "path"}`` or null).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tasks.common.children import exit_when_orphaned

REPLY_PREFIX = "@@rlrf4rec-vllm@@ "

log = logging.getLogger(__name__)


def _reply(obj: dict) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def start_engine(engine_args: dict[str, Any]) -> Any:
    """Build the ``vllm.LLM`` (in this process unless the environment asks otherwise)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from tasks.llm import cpu_norm
    from tasks.llm.top_p import install

    install()  # exact top-p without a full-vocabulary sort (CPU sampler only)

    args = dict(engine_args)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        args.setdefault("distributed_executor_backend", "uni")
        # vLLM's C++ RMSNorm, which it registers for GPUs only (registered in this process,
        # so only for an engine that runs in it)
        if cpu_norm.install():
            args.setdefault("ir_op_priority", cpu_norm.PRIORITY)
    return LLM(**args)


def run_job(llm: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Generate for one job, write its samples parquet and stats JSON, return the stats."""
    import random

    import numpy as np
    import polars as pl
    import torch
    from vllm import SamplingParams

    from tasks.llm.sampling import raw_sample_rows, raw_samples_frame

    prompts = pl.read_parquet(job["prompts_path"])
    s = job["sampling"]
    seed = int(s["seed"])
    # Reseed the RNG the in-process engine samples from: same seed, same texts.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    params = SamplingParams(
        n=int(s["n"]),
        temperature=float(s["temperature"]),
        top_p=float(s["top_p"]),
        max_tokens=int(s["max_tokens"]),
        stop_token_ids=[int(i) for i in s.get("stop_token_ids") or []],
    )
    lora_request = None
    if job.get("lora"):
        from vllm.lora.request import LoRARequest

        lo = job["lora"]
        lora_request = LoRARequest(lo["name"], int(lo["id"]), lo["path"])
    inputs = [{"prompt_token_ids": list(ids)} for ids in prompts["prompt_token_ids"].to_list()]
    # Blocks cached by an earlier job would change which sequences the scheduler runs together,
    # hence which random numbers each draws: a job's texts must not depend on the jobs before.
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outputs = llm.generate(inputs, params, lora_request=lora_request, use_tqdm=True)
    seconds = time.perf_counter() - t0
    rows = raw_sample_rows()
    for idx, out in zip(prompts["idx"].to_list(), outputs, strict=True):
        for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
            rows["idx"].append(idx)
            rows["sample_idx"].append(j)
            rows["text"].append(c.text)
            rows["n_tokens"].append(len(c.token_ids))
            rows["finish"].append(c.finish_reason or "length")
    frame = raw_samples_frame(rows)
    out_path = Path(job["out_path"])
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, out_path)
    stats = {
        "generate_seconds": seconds,
        "generated_tokens": int(sum(rows["n_tokens"])),
        "prompt_tokens": int(sum(len(i["prompt_token_ids"]) for i in inputs)),
    }
    Path(job["stats_path"]).write_text(json.dumps(stats))
    return stats


def main(argv: list[str] | None = None) -> int:
    # Exit when the parent dies (even by SIGKILL, mid-job): no orphaned engine. A Ctrl-C is the
    # parent's to handle (it ends this process); the worker never dies of one on its own.
    exit_when_orphaned()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m tasks.llm.vllm_worker", description=__doc__)
    parser.add_argument("--engine", required=True, help="JSON file of vllm.LLM keyword arguments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    engine_args = json.loads(Path(args.engine).read_text())
    t0 = time.perf_counter()
    try:
        llm = start_engine(engine_args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        traceback.print_exc()
        _reply({"event": "ready", "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 3
    start_seconds = time.perf_counter() - t0
    _reply({"event": "ready", "ok": True, "engine_start_seconds": start_seconds})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        try:
            stats = run_job(llm, job)
            _reply({"event": "done", "id": job.get("id"), "ok": True, "stats": stats})
        except Exception as exc:  # noqa: BLE001 - one bad job must not kill the engine
            traceback.print_exc()
            _reply({"event": "done", "id": job.get("id"), "ok": False, "error": f"{exc!r}"[:2000]})
    return 0


if __name__ == "__main__":
    code = main()
    # Every reply and output file is written: skip the interpreter's teardown of vLLM and
    # torch (3.8 s on a 2-core CPU, time the flow spends outside its stages); the OS frees
    # the memory at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
