"""Shared-prompt packing of DPO pairs: the layout, and the same log-probs and gradients as
TRL's two padded rows per pair."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tasks.llm import dpo_packing
from tasks.llm.dpo_packing import IGNORE, pack_pairs
from tests.conftest import tiny_lm_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trl_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """TRL's DPO collator: rows [prompt + chosen ...; prompt + rejected ...], right-padded,
    labels -100 on the prompt and the padding."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs]
    masks += [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        att[i, : len(row)] = 1
        lab[i, : len(row)] = torch.where(torch.tensor(m) == 1, torch.tensor(row), IGNORE)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def test_the_layout_of_one_pair() -> None:
    # prompt 10 11 12, chosen 20 21, rejected 30 31 32
    batch = trl_batch([([10, 11, 12], [20, 21], [30, 31, 32])])
    packed = pack_pairs(**batch)
    assert packed is not None
    # shared prompt minus its last token | 12 chosen | 12 rejected
    assert packed.input_ids.tolist() == [[10, 11, 12, 20, 21, 12, 30, 31, 32]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    # each branch's head (the prompt's last token) scores the branch's first answer token
    assert packed.shift_labels.tolist() == [[IGNORE, IGNORE, 20, 21, IGNORE, 30, 31, 32, IGNORE]]
    allowed = packed.allowed[0, 0]
    assert allowed[5].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0]  # rejected head: prompt + itself
    assert allowed[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # chosen tail: never rejected
    assert allowed[8].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1]
    # TRL's layout: chosen row 0 scores positions 2, 3 (tokens 3, 4); rejected row 1: 2, 3, 4
    assert packed.out_shape == (2, 5)
    assert list(zip(*[t.tolist() for t in packed.dst], strict=True)) == [
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (1, 4),
    ]


def test_batches_that_are_not_shared_prompt_pairs_are_left_alone() -> None:
    batch = trl_batch([([10, 11, 12], [20], [30]), ([13, 14], [21, 22], [31])])
    assert pack_pairs(**batch) is not None
    odd = {k: v[:3] for k, v in batch.items()}
    assert pack_pairs(**odd) is None
    different = {k: v.clone() for k, v in batch.items()}
    different["input_ids"][2, 0] = 99  # rejected of pair 0 has another prompt
    assert pack_pairs(**different) is None
    left = {k: v.clone() for k, v in batch.items()}
    left["attention_mask"][3] = left["attention_mask"][3].flip(0)  # 0 1 1 1
    assert pack_pairs(**left) is None


def fused_outputs(
    model_path: str, batch: dict[str, torch.Tensor], packed: bool, implementation: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TRL's fused-head forward on ``batch``, optionally through the packing wrapper: the
    per-token outputs and the gradient of a DPO-like loss on a layer's attention weights.
    ``implementation`` "split" is sdpa with the packed rows' attention in two parts."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    split = implementation == "split"
    implementation = "sdpa" if split else implementation
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=implementation
    )
    if split:
        dpo_packing._register_split_sdpa()
        model.config._attn_implementation = dpo_packing.SPLIT_SDPA
    utils.add_fused_lm_head(model, outputs=dpo_packing.PER_TOKEN)
    forward = model.forward
    if packed:
        forward = dpo_packing.packed_forward(forward, implementation, torch.float32)
    out = forward(**batch, fused_lm_head=True, use_cache=False)
    logps = out.log_probs.sum(dim=1)
    chosen, rejected = logps.chunk(2)
    (-torch.nn.functional.logsigmoid(0.1 * (chosen - rejected))).sum().backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    fields = {name: getattr(out, name) for name in (*dpo_packing.PER_TOKEN, "label_mask")}
    return {k: v.detach() for k, v in fields.items()}, grad


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "split"])
def test_packed_pairs_score_like_trl_rows(
    tiny_llm_path: str, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.integrations import sdpa_attention

    calls: list[tuple[int, int, bool]] = []  # (queries, keys, masked) of each sdpa call
    plain_sdpa = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], key.shape[2], attention_mask is not None))
        return plain_sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 1000, (n,), generator=g).tolist()

    # two pairs: different prompt lengths, chosen longer / shorter than rejected (padding)
    batch = trl_batch([(tokens(9), tokens(4), tokens(6)), (tokens(5), tokens(7), tokens(2))])
    plain, plain_grad = fused_outputs(tiny_llm_path, batch, False, implementation)
    calls.clear()
    packed, packed_grad = fused_outputs(tiny_llm_path, batch, True, implementation)
    if implementation == "split":
        # per layer and row: the prompt minus its last token causally, then both branches
        # (its last token + the answer, twice) over the row with the mask; rows 8+5+7 = 20
        # and 4+8+3 = 15 positions, padded to 20
        assert calls == [(8, 8, False), (12, 20, True), (4, 4, False), (11, 15, True)] * 2
    assert (plain["log_probs"] != 0).sum() == 4 + 6 + 7 + 2  # every answer token scored
    assert_same_outputs(plain, packed, plain_grad, packed_grad)


@pytest.fixture(scope="module")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Qwen2 (the opt-in Qwen2.5-Coder policies' architecture: biased q/k/v, an
    untied output matrix) with random weights and non-zero q/k biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = tiny_lm_config(
        Qwen2Config,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "split"])
def test_packed_pairs_score_like_trl_rows_on_qwen2(
    tiny_qwen2_path: str, implementation: str
) -> None:
    g = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 1000, (n,), generator=g).tolist()

    batch = trl_batch([(tokens(9), tokens(4), tokens(6)), (tokens(5), tokens(7), tokens(2))])
    plain, plain_grad = fused_outputs(tiny_qwen2_path, batch, False, implementation)
    packed, packed_grad = fused_outputs(tiny_qwen2_path, batch, True, implementation)
    assert_same_outputs(plain, packed, plain_grad, packed_grad)


def test_split_attention_equals_one_masked_call() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    # pair 0: a one-token prompt (nothing shared); pair 1: 6 shared positions, padded by 2
    batch = trl_batch([([10], [20, 21, 22], [30, 31, 32, 33]), ([11] * 7, [23], [34])])
    packed = pack_pairs(**batch)
    assert packed is not None and packed.shared == (0, 6) and packed.lengths == (9, 10)
    mask = packed.attention_mask("sdpa", torch.float32)

    class Attention(torch.nn.Module):
        num_key_value_groups = 2

    heads, width = 4, packed.input_ids.shape[1]
    q = torch.randn((2, heads, width, 8), generator=g, requires_grad=True)
    k, v = (torch.randn((2, 2, width, 8), generator=g, requires_grad=True) for _ in "kv")
    split, _ = dpo_packing.split_sdpa_attention(Attention(), q, k, v, mask, scaling=0.3)
    masked, _ = sdpa_attention_forward(Attention(), q, k, v, packed.allowed, scaling=0.3)
    assert split.shape == masked.shape == (2, width, heads, 8)
    real = torch.arange(width)[None, :] < torch.tensor(packed.lengths)[:, None]
    torch.testing.assert_close(split[real], masked[real], rtol=1e-5, atol=1e-6)
    assert not split[~real].any()  # padding positions: zeros
    weights = torch.randn(masked[real].shape, generator=g)
    grads = [torch.autograd.grad((out[real] * weights).sum(), (q, k, v)) for out in (split, masked)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # any other call (no packed layout on the mask) is plain sdpa
    plain, _ = dpo_packing.split_sdpa_attention(Attention(), q, k, v, packed.allowed)
    torch.testing.assert_close(
        plain, sdpa_attention_forward(Attention(), q, k, v, packed.allowed)[0]
    )


def make_trainer(implementation: str):
    class Config:
        _attn_implementation = implementation

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.w = torch.nn.Parameter(torch.zeros(1))

    class Trainer:
        model = Model()

    return Trainer()


def test_install_follows_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dpo_packing.ENV, "0")
    assert not dpo_packing.install(make_trainer("sdpa"))
    monkeypatch.delenv(dpo_packing.ENV)
    trainer = make_trainer("sdpa")
    assert dpo_packing.install(trainer) and dpo_packing.install(trainer)
    assert trainer.model.forward.packs_pairs
    assert trainer.model.config._attn_implementation == dpo_packing.SPLIT_SDPA
    monkeypatch.setenv(dpo_packing.ATTENTION_ENV, "masked")
    masked = make_trainer("sdpa")
    assert dpo_packing.install(masked) and masked.model.config._attn_implementation == "sdpa"
    eager = make_trainer("eager")
    assert dpo_packing.install(eager) and eager.model.config._attn_implementation == "eager"
    assert not dpo_packing.install(make_trainer("flash_attention_2"))
    monkeypatch.setenv(dpo_packing.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="RLRF4REC_DPO_ATTENTION='fast'"):
        dpo_packing.install(make_trainer("sdpa"))


def test_train_dpo_packs_the_pairs_and_learns_the_same(
    tiny_llm_path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tasks.llm.dpo import train_dpo
    from tests.tasks.llm.test_dpo import FAST, PAIRS

    with caplog.at_level(logging.INFO, logger="tasks.llm.dpo"):
        packed = train_dpo(tiny_llm_path, PAIRS, tmp_path / "packed", FAST)["metrics"]
    assert "prompt computed once per pair: True" in caplog.text
    monkeypatch.setenv(dpo_packing.ENV, "0")
    plain = train_dpo(tiny_llm_path, PAIRS, tmp_path / "plain", FAST)["metrics"]
    assert plain["rewards/margins"] > 0.01  # the pairs teach something
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key


def assert_same_outputs(plain: dict, packed: dict, plain_grad, packed_grad) -> None:
    """The packed row's outputs and gradients equal TRL's two rows (masks exactly)."""
    for name, value in plain.items():
        if value.dtype == torch.bool:
            assert torch.equal(packed[name], value), name
        else:
            torch.testing.assert_close(packed[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-4, atol=1e-6)
