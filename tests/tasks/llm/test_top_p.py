"""Exact top-p without a full sort: the kept set equals vLLM's sort-based one."""

from __future__ import annotations

import pytest
import torch

from tasks.llm.top_p import install, patched, top_p_filter

NEG = float("-inf")


def reference_keep(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The nucleus written out: a token stays when the tokens ranked above it hold < p;
    p = 1 keeps the whole row."""
    probs = logits.float().softmax(-1)
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(-1, order)
    above = ranked.cumsum(-1) - ranked
    keep_ranked = (above < p[:, None]) | (torch.arange(logits.shape[1]) == 0) | (p[:, None] >= 1)
    keep = torch.zeros_like(keep_ranked)
    return keep.scatter_(-1, order, keep_ranked)


def test_a_hand_computed_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: p=0.7 keeps the first two (above: 0, 0.5, 0.8, ...)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = top_p_filter(logits.clone(), torch.tensor([0.7]), widths=(2,))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    # p=0.4: only the most likely token; p=1: everything; kept logits are untouched
    assert torch.isfinite(top_p_filter(logits.clone(), torch.tensor([0.4]))).sum() == 1
    whole = top_p_filter(logits.clone(), torch.tensor([1.0]))
    assert torch.equal(whole, logits)


@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])
def test_matches_the_sorted_nucleus_on_flat_and_peaked_rows(scale: float) -> None:
    """Flat rows (scale 0.3) need the full-sort fallback, peaked ones fit in 16 candidates;
    the widths force every path."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 3000, generator=g) * scale
    p = torch.tensor([0.95] * 20 + [0.5, 0.99, 1.0, 0.1])
    out = top_p_filter(logits.clone(), p, widths=(16, 256))
    keep = torch.isfinite(out)
    assert torch.equal(keep, reference_keep(logits, p))
    assert torch.equal(out[keep], logits[keep])


def test_agrees_with_vllms_sampler_function() -> None:
    sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 5000, generator=g) * 4
    p = torch.full((16,), 0.95)
    ours = torch.isfinite(top_p_filter(logits.clone(), p))
    theirs = torch.isfinite(sampler.apply_top_k_top_p_pytorch(logits.clone(), None, p))
    # the cumulative sums round differently: at most a boundary token per row may differ
    assert (ours != theirs).sum(-1).max() <= 1
    assert (ours != theirs).sum() <= 2


def test_the_patch_leaves_top_k_to_vllm() -> None:
    calls = []

    def original(logits, k, p):
        calls.append((k, p))
        return logits

    fn = patched(original)
    logits = torch.randn(2, 50)
    fn(logits.clone(), torch.tensor([5, 5]), torch.tensor([0.9, 0.9]))
    fn(logits.clone(), None, None)
    assert len(calls) == 2
    out = fn(logits.clone(), None, torch.tensor([0.5, 0.5]))
    assert len(calls) == 2 and (out == NEG).any()
    assert fn.original is original


def test_install_replaces_vllms_function_once() -> None:
    sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    before = sampler.apply_top_k_top_p
    try:
        assert install() and install()
        assert sampler.apply_top_k_top_p.original is getattr(before, "original", before)
    finally:
        sampler.apply_top_k_top_p = getattr(before, "original", before)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.6, 0.9), (1.3, 0.95), (0.8, 1.0)])
def test_transformers_fallback_nucleus_matches_its_own_warpers(
    temperature: float, top_p: float
) -> None:
    """The fallback's processor (temperature, then the nucleus without a sort) gives the scores
    transformers' TemperatureLogitsWarper + TopPLogitsWarper give: the same kept tokens, the
    same values."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from tasks.llm.hf_backend import NucleusProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g) * 4.0
    ids = torch.zeros(6, 1, dtype=torch.long)
    theirs = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(ids, theirs)
    ours = NucleusProcessor(temperature, top_p)(ids, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(ours)
    assert 6 < kept.sum() < 6 * 5000 or top_p == 1.0
    torch.testing.assert_close(ours[kept], theirs[kept])


def test_transformers_fallback_arguments() -> None:
    """On CPU generate runs at temperature 1 and top-p 1 with the processor; greedy takes no
    sampling arguments; on GPU transformers' own warpers stay."""
    from tasks.llm.hf_backend import NucleusProcessor, sampling_kwargs
    from tasks.llm.sampling import SamplingConfig

    cpu = sampling_kwargs(SamplingConfig(temperature=0.7, top_p=0.9), torch.device("cpu"))
    assert (cpu["temperature"], cpu["top_p"], cpu["do_sample"]) == (1.0, 1.0, True)
    (nucleus,) = cpu["logits_processor"]
    assert isinstance(nucleus, NucleusProcessor) and (nucleus.temperature, nucleus.top_p) == (
        0.7, 0.9
    )  # fmt: skip
    assert sampling_kwargs(SamplingConfig(temperature=0.0), torch.device("cpu")) == {
        "do_sample": False
    }
    gpu = sampling_kwargs(SamplingConfig(temperature=0.7, top_p=0.9), torch.device("cuda", 0))
    assert (gpu["temperature"], gpu["top_p"]) == (0.7, 0.9) and "logits_processor" not in gpu
