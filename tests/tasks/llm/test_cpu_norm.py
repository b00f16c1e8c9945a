"""vLLM's C++ RMSNorm as the CPU engine's IR-op implementation: the arithmetic, the dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tasks.llm import cpu_norm  # noqa: E402

EPS = 1e-5


def rows(n: int, hidden: int = 576, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(n, hidden, generator=g).to(torch.bfloat16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
    return x, r, w


def written_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, in fp32."""
    x = x.float()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.float()


@pytest.fixture
def installed():
    if not cpu_norm.install():
        pytest.skip("no C++ RMSNorm in this vLLM build")
    from vllm import ir

    return ir.ops


@pytest.mark.parametrize("n", [1, 128, 2048])
def test_the_kernels_compute_the_norm_written_out(installed, n: int) -> None:
    x, r, w = rows(n)
    out = cpu_norm.rms_norm(x, w, EPS)
    # one bf16 rounding of values up to ~4.5: half an ulp there is 1/64
    torch.testing.assert_close(out.float(), written_out(x, w), atol=2e-2, rtol=8e-3)
    xx, rr = x.clone(), r.clone()
    normed, residual = cpu_norm.fused_add_rms_norm(xx, rr, w, EPS)
    assert normed.data_ptr() == xx.data_ptr() and residual.data_ptr() == rr.data_ptr()
    # the fp32 sum rounded to bf16: to nearest with native bf16 (AVX-512 BF16), truncated on
    # vLLM's emulated path (an AVX2-only CPU); either way within one bf16 ulp of the sum
    exact = x.float() + r.float()
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(residual, exact.to(torch.bfloat16)) or torch.equal(residual, truncated)
    torch.testing.assert_close(normed.float(), written_out(residual, w), atol=2e-2, rtol=8e-3)


def test_vllm_dispatches_to_them_where_the_arguments_fit(installed) -> None:
    ops = installed
    x, r, w = rows(64, seed=1)
    native = ops.rms_norm.impls["native"].impl_fn
    native_fused = ops.fused_add_rms_norm.impls["native"].impl_fn
    with (
        ops.rms_norm.set_priority(cpu_norm.PRIORITY["rms_norm"]),
        ops.fused_add_rms_norm.set_priority(cpu_norm.PRIORITY["fused_add_rms_norm"]),
    ):
        assert torch.equal(ops.rms_norm(x, w, EPS), cpu_norm.rms_norm(x, w, EPS))
        xx, rr = x.clone(), r.clone()
        got = ops.fused_add_rms_norm.maybe_inplace(xx, rr, w, EPS)
        want = cpu_norm.fused_add_rms_norm(x.clone(), r.clone(), w, EPS)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        # rows the kernel does not take (strided, a variance over part of the row, an fp32
        # weight) go to vLLM's native chain
        strided = torch.cat([x, x], dim=1)[:, ::2]
        assert torch.equal(ops.rms_norm(strided, w, EPS), native(strided, w, EPS))
        assert torch.equal(ops.rms_norm(x, w, EPS, 288), native(x, w, EPS, 288))
        assert torch.equal(ops.rms_norm(x, w.float(), EPS), native(x, w.float(), EPS))
        got = ops.fused_add_rms_norm(x, r, w.float(), EPS)
        want = native_fused(x, r, w.float(), EPS)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # the kernel and the native chain differ only by bf16 rounding
    torch.testing.assert_close(
        cpu_norm.rms_norm(x, w, EPS).float(), native(x, w, EPS).float(), atol=7e-2, rtol=2e-2
    )


def test_install_is_idempotent_and_the_switch_turns_it_off(installed, monkeypatch) -> None:
    ops = installed
    assert cpu_norm.install()
    assert cpu_norm.PROVIDER in ops.rms_norm.impls
    assert cpu_norm.PROVIDER in ops.fused_add_rms_norm.impls
    monkeypatch.setenv(cpu_norm.ENV, "native")
    assert not cpu_norm.install()
