"""The CPU dtype: bf16 only with native bf16 instructions, fp32 otherwise, an env override."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common import hardware
from tasks.common.hardware import (
    DTYPE_ENV,
    DtypeChoice,
    cpu_dtype,
    cpu_flags,
    cpu_model,
    native_bf16,
    torch_dtype,
    train_dtype,
)
from tasks.llm import hf_backend, lora
from tasks.llm import vllm_engine as eng
from tests.conftest import tiny_lm_config

# /proc/cpuinfo of a Sapphire Rapids Xeon (AMX, AVX512-BF16), first core, abridged.
XEON_AMX = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology \
nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe \
popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch ssbd ibrs ibpb stibp \
ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx \
smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves \
avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq \
avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm md_clear \
serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs eibrs_pbrsb
bogomips\t: 5399.99

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc avx512_bf16 amx_bf16
"""

# /proc/cpuinfo of an AMD EPYC 7B12 (Zen 2): AVX2, no AVX-512, no bf16 instructions.
EPYC_AVX2 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl \
nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe \
popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse \
3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 \
rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt \
nrip_save umip rdpid
bugs\t\t: sysret_ss_attrs spectre_v1 spectre_v2 spec_store_bypass retbleed smt_rsb
bogomips\t: 4499.99
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DTYPE_ENV, raising=False)


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Make this host's /proc/cpuinfo read as the given fixture text."""

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(hardware, "CPUINFO", path)

    return use


@pytest.fixture
def tiny_config(tmp_path: Path) -> str:
    """A model folder with only a config.json: 4 layers x 2 KV heads x 16 dims."""
    from transformers import LlamaConfig

    out = tmp_path / "tiny"
    tiny_lm_config(
        LlamaConfig,
        vocab_size=256,
        layers=4,
        head_dim=16,
        max_position_embeddings=512,
        dtype="bfloat16",
    ).save_pretrained(out)
    return str(out)


def test_flags_are_parsed_from_cpuinfo() -> None:
    xeon, epyc = cpu_flags(XEON_AMX), cpu_flags(EPYC_AVX2)
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= xeon
    assert "bugs" not in xeon and "spectre_v1" not in xeon  # only the flags line
    assert "avx2" in epyc and not any(f.startswith(("avx512", "amx")) for f in epyc)
    assert native_bf16(xeon) and not native_bf16(epyc)
    assert native_bf16(["amx_bf16"]) and native_bf16({"avx512_bf16"})
    assert cpu_flags("processor : 0\nFeatures : fp asimd bf16\n") == frozenset()  # no flags line
    assert cpu_flags("") == frozenset()


def test_missing_cpuinfo_gives_no_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "absent")
    assert cpu_flags() == frozenset()
    assert cpu_dtype().name == "float32"


def test_choice_follows_the_cpu(cpu) -> None:
    xeon = cpu_dtype(cpu_flags(XEON_AMX))
    assert xeon == DtypeChoice(
        "bfloat16", "bfloat16: the CPU has native bf16 instructions (amx_bf16, avx512_bf16)"
    )
    epyc = cpu_dtype(cpu_flags(EPYC_AVX2))
    assert epyc.name == "float32"
    assert "no native bf16" in epyc.reason and "avx512_bf16" in epyc.reason
    cpu(EPYC_AVX2)  # default flags: read from the (patched) /proc/cpuinfo
    assert cpu_dtype() == epyc
    cpu(XEON_AMX)
    assert cpu_dtype() == xeon


def test_env_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DTYPE_ENV, "float32")
    choice = cpu_dtype(cpu_flags(XEON_AMX))
    assert choice.name == "float32" and DTYPE_ENV in choice.reason
    monkeypatch.setenv(DTYPE_ENV, " BFloat16 ")
    assert cpu_dtype(cpu_flags(EPYC_AVX2)).name == "bfloat16"
    monkeypatch.setenv(DTYPE_ENV, "")  # empty: no override
    assert cpu_dtype(cpu_flags(EPYC_AVX2)).name == "float32"


def test_bad_override_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match=f"{DTYPE_ENV}='fp16'.*bfloat16, float32"):
        cpu_dtype(cpu_flags(XEON_AMX))


def test_torch_dtypes(cpu) -> None:
    import torch

    cpu(EPYC_AVX2)
    assert torch_dtype("cpu") is torch.float32
    assert torch_dtype(torch.device("cuda:1")) is torch.bfloat16
    assert hf_backend._hf_dtype(torch.device("cpu"), "auto") is torch.float32
    assert hf_backend._hf_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16  # asked for
    cpu(XEON_AMX)
    assert torch_dtype(torch.device("cpu")) is torch.bfloat16
    assert hf_backend._hf_dtype(torch.device("cpu"), "auto") is torch.bfloat16
    # training stays fp32 on every CPU, bf16 on CUDA
    assert train_dtype("cpu") is torch.float32
    assert train_dtype(torch.device("cuda")) is torch.bfloat16


def test_cpu_engine_gets_the_cpu_dtype(cpu, tiny_config: str) -> None:
    cpu(EPYC_AVX2)
    args = eng._engine_args(tiny_config, 0, gpu_visible=False, max_model_len=256)
    assert args["dtype"] == "float32"
    assert args["kv_cache_memory_bytes"] == eng.cpu_kv_cache_bytes(tiny_config, 256, "float32")
    cpu(XEON_AMX)
    assert eng._engine_args(tiny_config, 0, False, 256)["dtype"] == "bfloat16"
    # an explicit dtype, and any dtype on a GPU, are passed as given
    assert eng._engine_args(tiny_config, 0, False, 256, dtype="float32")["dtype"] == "float32"
    cpu(EPYC_AVX2)
    assert eng._engine_args(tiny_config, 0, True, 256)["dtype"] == "auto"


def test_kv_cache_doubles_per_token_in_fp32(
    cpu, tiny_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eng, "CPU_KV_MIN_BYTES", 1)  # no floor: see the per-token size
    per_token_bf16 = 2 * 4 * 2 * 16 * 2  # K and V x layers x KV heads x head_dim x 2 bytes
    bf16 = eng.cpu_kv_cache_bytes(tiny_config, 256, "bfloat16")
    assert bf16 == per_token_bf16 * 256 * eng.CPU_KV_SEQUENCES
    assert eng.cpu_kv_cache_bytes(tiny_config, 256, "float32") == 2 * bf16
    cpu(EPYC_AVX2)  # default: the CPU's dtype
    assert eng.cpu_kv_cache_bytes(tiny_config, 256) == 2 * bf16
    cpu(XEON_AMX)
    assert eng.cpu_kv_cache_bytes(tiny_config, 256) == bf16
    with pytest.raises(ValueError, match="fp8"):
        eng.cpu_kv_cache_bytes(tiny_config, 256, "fp8")


def test_merged_checkpoint_is_saved_in_the_cpu_dtype(
    cpu, tiny_llm_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llm_path)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    monkeypatch.setattr(lora, "available_gpus", lambda: [])

    def saved_dtype(folder: str) -> torch.dtype:
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype

    cpu(EPYC_AVX2)
    fp32 = lora.merge_lora(tiny_llm_path, tmp_path / "adapter", tmp_path / "avx2")
    assert saved_dtype(fp32) is torch.float32
    cpu(XEON_AMX)
    bf16 = lora.merge_lora(tiny_llm_path, tmp_path / "adapter", tmp_path / "amx")
    assert saved_dtype(bf16) is torch.bfloat16


def test_cpu_model_reads_cpuinfo() -> None:
    assert cpu_model("processor: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_model("")  # falls back to platform
