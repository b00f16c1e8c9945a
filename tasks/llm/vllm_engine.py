"""The vLLM engine of the generator: a worker process driven through a JSON-lines protocol.

The engine runs in a child process (``python -m tasks.llm.vllm_worker``): vLLM's spawn guard is
satisfied whoever calls, its memory is returned when the child ends, and ``gpu=k`` pins the
child to one GPU through ``CUDA_VISIBLE_DEVICES`` (:func:`tasks.llm.generate.generate_shard`
runs one engine per GPU on a shard of the users; vLLM's offline data-parallel mode fails for
dense models). :class:`VLLMEngine` starts the worker, sends it jobs and reads its replies
(lines prefixed with :data:`tasks.llm.vllm_worker.REPLY_PREFIX`);
:func:`tasks.llm.vllm_jobs.run_vllm` runs one job, in a given engine or a fresh one. The
engine's RNG is reseeded for every job, so the same seed, inputs, prompt order and shard layout
give the same texts.

Adapters: a long-lived engine started with ``enable_lora=True`` serves each new adapter as a
LoRA request (a new LoRA id per adapter folder), so a round transition is only the adapter
load, no engine restart; it generates more slowly than a merged checkpoint served as a plain
model (:func:`tasks.llm.lora.merged_checkpoint`, which costs a merge and an engine start
instead). The figures are in README.md and ``bench/bench_generation.py --transition``.

CPU: the KV cache is sized to the job (:func:`cpu_kv_cache_bytes`): every sequence decoded at
once fits, so none is preempted; top-p runs without sorting the vocabulary
(:mod:`tasks.llm.top_p`); the RMSNorm runs vLLM's C++ kernel (:mod:`tasks.llm.cpu_norm`);
and ``dtype="auto"`` is the CPU's dtype (:func:`tasks.common.hardware.cpu_dtype`). vLLM binds
one thread to each core by default; on a CPU shared with other jobs
``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind`` (inherited by the worker) is steadier.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import children
from tasks.common.hardware import cpu_dtype
from tasks.llm.devices import available_gpus, physical_gpu
from tasks.llm.vllm_worker import REPLY_PREFIX

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class GenerationError(RuntimeError):
    """A backend failed; the message names the backend and what to look at."""


def vllm_importable() -> bool:
    """Whether the ``vllm`` package is installed (it is imported only in the worker)."""
    return importlib.util.find_spec("vllm") is not None


def lora_rank(adapter: Path) -> int:
    """The smallest rank vLLM accepts that holds ``adapter``'s (its ``max_lora_rank``)."""
    r = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
    return next((k for k in VLLM_LORA_RANKS if k >= r), r)


def _engine_args(
    model: str,
    seed: int,
    gpu_visible: bool,
    max_model_len: int | None,
    enable_lora: bool = False,
    max_lora_rank: int = 16,
    dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    extra: dict[str, Any] | None = None,
    kv_demand: CacheDemand | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``. On CPU ``dtype="auto"`` becomes the CPU's dtype
    (:func:`tasks.common.hardware.cpu_dtype`), not the checkpoint's, and the KV cache is sized
    to it."""
    if not gpu_visible and dtype == "auto":
        dtype = cpu_dtype().name
    args: dict[str, Any] = {
        "model": model,
        "seed": seed,
        "dtype": dtype,
        # On CPU this is the share of RAM vLLM may reserve (about 0.25 leaves room; docs/design.md).
        "gpu_memory_utilization": gpu_memory_utilization or (0.85 if gpu_visible else 0.25),
        "enforce_eager": (not gpu_visible) if enforce_eager is None else enforce_eager,
    }
    if not gpu_visible and not _sized_as_before():
        args["max_num_seqs"] = CPU_MAX_SEQS
        args["block_size"] = CPU_BLOCK_TOKENS
    if not gpu_visible and gpu_memory_utilization is None:
        args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model, max_model_len, dtype, kv_demand)
    if max_model_len:
        args["max_model_len"] = int(max_model_len)
    if enable_lora:
        args.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    args.update(extra or {})
    return args


CPU_KV_SEQUENCES = 64
"""Full-length sequences the CPU KV cache holds when the work is not known in advance."""
CPU_KV_MIN_BYTES = 2**30
CPU_BLOCK_TOKENS = 32
"""``block_size`` of a CPU engine: its KV block (tokens). Only a prompt's full blocks are
shared by its ``n`` samples; each sample prefills the partial last block itself, so smaller
blocks repeat less prefill: on a quick round (87 prompts x n=4 x 96 tokens, Zen 4 with
AVX-512 BF16) 292-308 generated tokens/s at 32 against 264-276 at vLLM's 128 and 280 at 64;
256 fell to 257."""
CPU_MAX_SEQS = 64
"""``max_num_seqs`` of a CPU engine: sequences decoded together. On a 2-core CPU more buy no
speed and cost KV cache: vLLM's default, 256, against 128 on a quick round, 369 against 403
tokens/s (AMX); 128 against 64, 271 and 526 against 306 and 549 tokens/s for the knowledge and
round jobs, 366 MiB more engine memory (AVX-512 BF16); 32 fell to 452 on the round."""
KV_ENV = "RLRF4REC_VLLM_KV"
"""``fixed``: every CPU engine sized as before the job-sized cache (the benchmark's "before"):
a KV cache of :data:`CPU_KV_SEQUENCES` full-length sequences, vLLM's ``max_num_seqs``."""


def _sized_as_before() -> bool:
    return os.environ.get(KV_ENV) == "fixed"


@dataclass(frozen=True)
class CacheDemand:
    """The KV cache a sampling job needs: its prompts' token counts, ``n`` samples of at most
    ``max_new_tokens`` tokens each."""

    prompt_tokens: tuple[int, ...]
    n: int
    max_new_tokens: int

    def tokens(self, block: int = CPU_BLOCK_TOKENS, max_seqs: int = CPU_MAX_SEQS) -> int:
        """KV slots (tokens) to decode every sequence the engine runs at once, none preempted:
        the ``max_seqs / n`` longest prompts.

        A prompt's full blocks are computed once and shared by its samples (prefix caching);
        each sample holds its own blocks for the prompt's tail and its answer.
        """
        at_once = max(1, math.ceil(max_seqs / self.n))
        blocks = 0
        for length in sorted(self.prompt_tokens, reverse=True)[:at_once]:
            shared, tail = divmod(length, block)
            blocks += shared + self.n * math.ceil((tail + self.max_new_tokens) / block)
        return blocks * block


def cpu_kv_cache_bytes(
    model: str,
    max_model_len: int | None,
    dtype: str | None = None,
    demand: CacheDemand | None = None,
    max_seqs: int = CPU_MAX_SEQS,
    block: int = CPU_BLOCK_TOKENS,
) -> int:
    """KV cache size for a CPU engine, at most a quarter of RAM.

    With ``demand`` (a one-off job's shape): room for every sequence the engine decodes at once
    (:meth:`CacheDemand.tokens` for ``max_seqs`` sequences at once in ``block``-token blocks),
    so that none is preempted and recomputed, and at least one ``max_model_len`` sequence, each
    with one block more, which vLLM keeps empty. Without:
    :data:`CPU_KV_SEQUENCES` sequences of ``max_model_len`` tokens, at least 1 GiB.

    The cache holds K and V in the engine's ``dtype`` (a torch dtype name; default the CPU's,
    :func:`tasks.common.hardware.cpu_dtype`): 2 bytes an element in bf16, 4 in fp32.
    vLLM's CPU default (a quarter of RAM whatever the model) reserves far more than a small
    model's rounds need. ``VLLM_CPU_KVCACHE_SPACE`` (GiB) still wins.
    """
    import torch
    from transformers import AutoConfig

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    name = dtype or cpu_dtype().name
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtype={name!r}: not a torch dtype name")
    element = getattr(torch, name).itemsize
    floor = CPU_KV_MIN_BYTES
    if _sized_as_before():
        demand = None
    try:
        c = AutoConfig.from_pretrained(model)
        c = getattr(c, "text_config", None) or c
        heads = int(c.num_attention_heads)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        # K and V, every layer, in the model's dtype (the CPU engine's cache dtype is "auto")
        per_token = 2 * int(c.num_hidden_layers) * kv_heads * head_dim * element
        length = max_model_len or int(getattr(c, "max_position_embeddings", 4096) or 4096)
        if demand is None:
            want = per_token * length * CPU_KV_SEQUENCES
        else:
            # and the block vLLM keeps for itself (its null block)
            floor = per_token * (length + block)
            want = per_token * (demand.tokens(block=block, max_seqs=max_seqs) + block)
    except (OSError, ValueError, AttributeError, TypeError):
        want = 2 * CPU_KV_MIN_BYTES
    return int(min(max(want, floor), ram // 4))


def _worker_env(gpu: int | None) -> dict[str, str]:
    """The worker's environment: this process's, with vLLM's settings, the GPU it may see, this
    package on its path, and this process's temporary folder (a run's ``<run>/.tmp``, removed
    with the run: vLLM's ``vllm_dist_<uuid>`` files land there, not in ``/tmp``)."""
    env = dict(os.environ)
    env["TMPDIR"] = tempfile.gettempdir()
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = physical_gpu(gpu)
    # The child must import this package whatever the caller's working directory.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class VLLMEngine:
    """A long-lived vLLM worker process that serves several :func:`generate` calls.

    Use it to keep one engine across calls (e.g. rounds served as LoRA adapters, each with a
    new LoRA id, without restarting the engine)::

        with VLLMEngine(model, enable_lora=True) as engine:
            s1, _ = generate(p, model, cfg, adapter="round_01/adapter", engine=engine)
            s2, _ = generate(p, model, cfg, adapter="round_02/adapter", engine=engine)

    Args:
        model: the base model path or id.
        gpu: logical GPU index to pin the engine to (None: CPU, or all visible devices).
        enable_lora: serve adapters as LoRA requests.
        max_lora_rank: the largest adapter rank it will be asked to serve.
        max_model_len: prompt + answer token limit of the engine (default: the model's, at
            most 4096).
        seed: the engine's seed (each call reseeds its sampler with ``cfg.seed`` anyway).
        dtype, gpu_memory_utilization, enforce_eager: passed to ``vllm.LLM`` (on CPU
            ``dtype="auto"`` is :func:`tasks.common.hardware.cpu_dtype`).
        kv_demand: the one job this engine will run, to size its CPU KV cache to
            (:func:`cpu_kv_cache_bytes`); None for an engine that serves many.
    """

    def __init__(
        self,
        model: str,
        gpu: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        kv_demand: CacheDemand | None = None,
    ) -> None:
        self.model = str(model)
        self.gpu = gpu
        self.enable_lora = enable_lora
        if max_model_len is None:
            max_model_len = min(model_max_len(self.model), 4096)
        self.max_model_len = max_model_len
        gpu_visible = gpu is not None or bool(available_gpus())
        self.engine_args = _engine_args(
            self.model,
            seed,
            gpu_visible,
            max_model_len,
            enable_lora,
            max_lora_rank,
            dtype,
            gpu_memory_utilization,
            enforce_eager,
            kv_demand=kv_demand,
        )
        self.engine_start_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._lora_ids: dict[str, int] = {}
        self._jobs = 0

    def lora_id(self, adapter: str | Path) -> int:
        """The LoRA id of ``adapter`` in this engine: a new id for every new adapter folder."""
        key = str(Path(adapter).resolve())
        if key not in self._lora_ids:
            self._lora_ids[key] = len(self._lora_ids) + 1
        return self._lora_ids[key]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> VLLMEngine:
        """Start the worker and wait until its engine is ready."""
        if self.running:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="vllm-engine-")
        engine_json = Path(self._dir.name) / "engine.json"
        engine_json.write_text(json.dumps(self.engine_args))
        cmd = [sys.executable, "-m", "tasks.llm.vllm_worker", "--engine", str(engine_json)]
        log.info("starting vLLM engine for %s (gpu=%s)", self.model, self.gpu)
        t0 = time.perf_counter()
        self._proc = children.spawn(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_worker_env(self.gpu),
            bufsize=1,
        )
        reply = self._read_reply()
        if not reply.get("ok"):
            self.close()
            raise GenerationError(f"vLLM engine did not start: {reply.get('error')}")
        self.engine_start_seconds = time.perf_counter() - t0
        log.info("vLLM engine ready in %.1f s", self.engine_start_seconds)
        return self

    def _read_reply(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX) :])
            level = logging.INFO if ("WARNING" in line or "ERROR" in line) else logging.DEBUG
            log.log(level, "vllm: %s", line.rstrip())
        code = self._proc.wait()
        raise GenerationError(f"vLLM worker exited with status {code} (its log is on stderr)")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send one job (see :mod:`tasks.llm.vllm_worker`) and return its stats."""
        if not self.running:
            self.start()
        assert self._proc is not None and self._proc.stdin is not None
        self._jobs += 1
        job = {**job, "id": self._jobs}
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        reply = self._read_reply()
        if not reply.get("ok"):
            raise GenerationError(f"vLLM job failed: {reply.get('error')}")
        return reply["stats"]

    def close(self) -> None:
        """Stop the worker (its memory is returned to the system)."""
        if self._proc is not None:
            with contextlib.suppress(Exception):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> VLLMEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_max_len(model: str) -> int:
    """The longest sequence ``model`` takes (its ``max_position_embeddings``, else 4,096)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return int(getattr(config, "max_position_embeddings", 4096) or 4096)
