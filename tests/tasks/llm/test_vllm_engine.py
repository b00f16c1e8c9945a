"""The vLLM engine: KV cache sizing, engine arguments, generation in a worker process."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from tasks.llm.devices import available_gpus
from tasks.llm.engine_pool import keep_engines
from tasks.llm.generate import generate
from tasks.llm.sampling import SamplingConfig
from tasks.llm.vllm_engine import (
    CPU_KV_MIN_BYTES,
    CPU_KV_SEQUENCES,
    KV_ENV,
    CacheDemand,
    VLLMEngine,
    _engine_args,
    cpu_kv_cache_bytes,
    vllm_importable,
)
from tests.tasks.llm.helpers import PROMPTS, check_samples, random_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_kv_cache_follows_the_model(default_policy_path: str, tiny_llm_path: str) -> None:
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, K and V, 2 bytes each = 23,040 B/token
    smol = cpu_kv_cache_bytes(default_policy_path, 1024, dtype="bfloat16")
    assert smol == 2 * 30 * 3 * 64 * 2 * 1024 * CPU_KV_SEQUENCES
    assert cpu_kv_cache_bytes(default_policy_path, 2048, dtype="bfloat16") == 2 * smol
    # a tiny model gets the floor, a huge length the ceiling (a quarter of RAM)
    assert cpu_kv_cache_bytes(tiny_llm_path, 2048) == CPU_KV_MIN_BYTES
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert cpu_kv_cache_bytes(default_policy_path, 10**7) == ram // 4
    cpu = _engine_args(default_policy_path, 0, gpu_visible=False, max_model_len=1024)
    assert cpu["kv_cache_memory_bytes"] == cpu_kv_cache_bytes(default_policy_path, 1024)
    # an explicit fraction, or a GPU, leaves the sizing to vLLM
    assert "kv_cache_memory_bytes" not in _engine_args(
        default_policy_path, 0, False, 1024, gpu_memory_utilization=0.3
    )
    assert "kv_cache_memory_bytes" not in _engine_args(default_policy_path, 0, True, 1024)


needs_vllm = pytest.mark.skipif(not vllm_importable(), reason="vllm is not installed")
VLLM_CFG = SamplingConfig(n=2, max_new_tokens=12, seed=5)


@pytest.fixture(scope="module")
def vllm_runs(default_policy_path: str) -> dict:
    """Three jobs in one kept engine (:mod:`tasks.llm.engine_pool`, as the flow runs them)
    serving the default model (vLLM's CPU attention needs head_dim >= 32, so not the tiny
    model); one engine start (20-40 s) for the module."""
    if not vllm_importable():
        pytest.skip("vllm is not installed")
    with pytest.MonkeyPatch.context() as mp:
        # One unbound thread: on a CPU shared with other jobs, vLLM's default (one thread
        # bound to each core) slows down several-fold.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        with keep_engines() as pool:
            run = functools.partial(generate, PROMPTS, default_policy_path, backend="vllm")
            first = run(VLLM_CFG, round_idx=1)
            second = run(VLLM_CFG, round_idx=1)
            other = run(SamplingConfig(n=2, max_new_tokens=12, seed=6))
            counts = (pool.started, pool.reused)
    return {"first": first, "second": second, "other": other, "engines": counts}


@needs_vllm
def test_vllm_backend_n_samples(vllm_runs: dict) -> None:
    samples, stats = vllm_runs["first"]
    check_samples(samples, PROMPTS, VLLM_CFG)
    assert set(samples["round"]) == {1}
    assert stats["backend"] == "vllm" and stats["tokens_per_s"] > 0
    assert stats["generated_tokens"] == samples["n_tokens"].sum()
    assert samples["text"].str.strip_chars().str.len_chars().max() > 0  # real words


@needs_vllm
def test_vllm_same_seed_same_texts(vllm_runs: dict) -> None:
    first = vllm_runs["first"][0]["text"].to_list()
    assert vllm_runs["second"][0]["text"].to_list() == first  # reseeded for every job
    assert vllm_runs["other"][0]["text"].to_list() != first
    # one engine served all three jobs (another seed is the same engine)
    assert vllm_runs["engines"] == (1, 2)
    assert [vllm_runs[k][1]["engine_reused"] for k in ("first", "second", "other")] == [
        False,
        True,
        True,
    ]


@pytest.mark.slow
@needs_vllm
def test_vllm_fresh_engine_gives_the_same_texts(vllm_runs: dict, default_policy_path: str) -> None:
    samples, stats = generate(PROMPTS, default_policy_path, VLLM_CFG, "vllm", round_idx=1)
    assert stats["load_seconds"] > 0  # a one-off engine was started for the call
    assert samples.equals(vllm_runs["first"][0])


@pytest.mark.slow
@needs_vllm
def test_vllm_adapter_merged_and_as_lora(default_policy_path: str, tmp_path: Path) -> None:
    adapter = random_adapter(default_policy_path, tmp_path / "round_01" / "adapter")
    cfg = SamplingConfig(n=1, max_new_tokens=8, seed=1, temperature=0.0)
    merged, stats = generate(PROMPTS, default_policy_path, cfg, "vllm", adapter=adapter)
    assert stats["lora_mode"] == "merged" and stats["served"].endswith("merged")
    with VLLMEngine(default_policy_path, enable_lora=True, max_lora_rank=8) as engine:
        lora, stats = generate(
            PROMPTS, default_policy_path, cfg, "vllm", adapter=adapter, engine=engine
        )
    assert stats["lora_mode"] == "lora"
    base, _ = generate(PROMPTS, default_policy_path, cfg, "vllm")
    assert lora["text"].to_list() != base["text"].to_list()
    assert merged["text"].to_list() != base["text"].to_list()


@pytest.mark.gpu
def test_vllm_on_one_gpu(default_policy_path: str) -> None:
    gpus = available_gpus()
    if not gpus:
        pytest.skip("no GPU")
    samples, stats = generate(PROMPTS, default_policy_path, VLLM_CFG, "vllm", gpu=gpus[-1])
    check_samples(samples, PROMPTS, VLLM_CFG)
    assert stats["gpu"] == gpus[-1]


def test_worker_finds_the_package_from_any_folder(tmp_path, monkeypatch) -> None:
    """The worker's PYTHONPATH starts at the repository root, wherever the caller runs."""
    from tasks.llm.vllm_engine import _worker_env

    monkeypatch.chdir(tmp_path)
    root = Path(_worker_env(None)["PYTHONPATH"].split(os.pathsep)[0])
    assert (root / "tasks" / "llm" / "vllm_worker.py").is_file()


def test_worker_temporaries_stay_in_the_runs_tmp(tmp_path, monkeypatch) -> None:
    """vLLM writes ``vllm_dist_<uuid>`` into the worker's temporary folder: during a run that is
    the run's ``.tmp`` (removed with the run), never ``/tmp``."""
    import tempfile

    from tasks.llm.vllm_engine import _worker_env

    run_tmp = tmp_path / "run" / ".tmp"
    run_tmp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(run_tmp))  # as flows.common.run_temporaries
    monkeypatch.setenv("TMPDIR", "/tmp")
    assert _worker_env(None)["TMPDIR"] == str(run_tmp)


def test_the_kv_cache_of_a_job_holds_its_sequences(default_policy_path: str) -> None:
    # a 540-token prompt in blocks of 128: 4 shared blocks; each of 4 samples holds one block
    # for the prompt's last 28 tokens and its 96-token answer: 8 blocks (1,024 slots)
    assert CacheDemand((540,), n=4, max_new_tokens=96).tokens(block=128) == 8 * 128
    # a 600-token prompt's tail (88) and answer need 2 blocks a sample: 4 + 8 blocks
    assert CacheDemand((600, 540), 4, 96).tokens(block=128) == (12 + 8) * 128
    # in blocks of 32 (the CPU default): 18 shared blocks of 600, tail 24 + 96 in 4 a sample;
    # 16 of 540, tail 28 + 96 in 4 a sample
    assert CacheDemand((600, 540), 4, 96).tokens() == (18 + 16 + 16 + 16) * 32
    # the engine decodes 64 sequences at once: the 16 longest prompts of 4 samples count
    demand = CacheDemand((300,) * 20 + (600,) * 70, 4, 96)
    assert demand.tokens(block=128) == 16 * 12 * 128
    assert demand.tokens(block=128, max_seqs=256) == 64 * 12 * 128
    assert demand.tokens() == 16 * 34 * 32
    # one sample each: the 64 longest prompts, each 4 blocks of prompt and 2 of tail and answer
    assert CacheDemand((300,) * 20 + (600,) * 70, 1, 96).tokens(block=128) == 64 * 6 * 128
    assert CacheDemand((512,), 1, 200).tokens(block=128) == (4 + 2) * 128
    per_token = 2 * 30 * 3 * 64 * 2
    sized = cpu_kv_cache_bytes(default_policy_path, 768, "bfloat16", demand)
    assert sized == per_token * (demand.tokens() + 32)  # vLLM keeps one block empty
    # at least one full-length sequence, whatever the job
    tiny = CacheDemand((10,), 1, 5)
    assert cpu_kv_cache_bytes(default_policy_path, 768, "bfloat16", tiny) == per_token * (768 + 32)
    args = _engine_args(default_policy_path, 0, False, 768, dtype="bfloat16", kv_demand=demand)
    assert args["kv_cache_memory_bytes"] == sized and args["max_num_seqs"] == 64
    assert args["block_size"] == 32
    assert cpu_kv_cache_bytes(
        default_policy_path, 768, "bfloat16", demand, block=128
    ) == per_token * (demand.tokens(block=128) + 128)


def test_an_engine_sized_as_before_keeps_vllms_defaults(
    default_policy_path: str, monkeypatch
) -> None:
    monkeypatch.setenv(KV_ENV, "fixed")
    demand = CacheDemand((540,) * 8, 4, 96)
    args = _engine_args(default_policy_path, 0, False, 768, dtype="bfloat16", kv_demand=demand)
    assert "block_size" not in args and "max_num_seqs" not in args
    per_token = 2 * 30 * 3 * 64 * 2
    assert args["kv_cache_memory_bytes"] == max(
        per_token * 768 * CPU_KV_SEQUENCES, CPU_KV_MIN_BYTES
    )
