from __future__ import annotations

import pytest
import torch

from models.adaptor import AdaptorConfig, HybridExpertAdaptor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shapes_and_default_layout() -> None:
    cfg = AdaptorConfig(in_dim=12)
    assert (cfg.n_shared, cfg.n_specific, cfg.hidden, cfg.out_dim) == (2, 6, 128, 32)
    ad = HybridExpertAdaptor(cfg)
    user, item = torch.randn(5, 12), torch.randn(5, 12)
    out = ad([user, item])
    assert out.shape == (5, 64) == (5, cfg.output_dim)
    # a task's output depends only on its own input and matches task_forward
    assert torch.allclose(out[:, :32], ad.task_forward(0, user))
    assert torch.allclose(out[:, 32:], ad.task_forward(1, item))
    # experts: shared group of 2, one specific group of 6 per task, each 12 -> 128 -> 32
    assert ad.shared.w1.shape == (2, 12, 128) and ad.shared.w2.shape == (2, 128, 32)
    assert len(ad.specific) == 2 and ad.specific[0].w1.shape == (6, 12, 128)
    assert ad.gate_weights(0, user).shape == (5, 8)
    assert torch.allclose(ad.gate_weights(1, item).sum(-1), torch.ones(5))


def test_gate_mixes_expert_outputs() -> None:
    torch.manual_seed(0)
    ad = HybridExpertAdaptor(AdaptorConfig(in_dim=4, n_shared=1, n_specific=2, hidden=8))
    x = torch.randn(3, 4)
    experts = torch.cat([ad.shared(x), ad.specific[0](x)], dim=1)  # [3, 3, 32]
    gate = ad.gate_weights(0, x)
    expected = (gate.unsqueeze(-1) * experts).sum(1)
    assert torch.allclose(ad.task_forward(0, x), expected, atol=1e-6)
    # each expert is relu(relu(x W1 + b1) W2 + b2)
    sh = ad.shared
    e0 = torch.relu(torch.relu(x @ sh.w1[0] + sh.b1[0]) @ sh.w2[0] + sh.b2[0])
    assert torch.allclose(experts[:, 0], e0, atol=1e-6)


def test_configurable_and_trainable() -> None:
    torch.manual_seed(1)
    ad = HybridExpertAdaptor(AdaptorConfig(in_dim=6, n_tasks=1, n_shared=0, n_specific=3))
    x = torch.randn(16, 6)
    target = torch.randn(16, 32).abs()
    opt = torch.optim.Adam(ad.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = ((ad([x]) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_bad_config_and_inputs() -> None:
    with pytest.raises(ValueError, match="at least one expert"):
        AdaptorConfig(in_dim=4, n_shared=0, n_specific=0)
    with pytest.raises(ValueError, match="in_dim"):
        AdaptorConfig(in_dim=0)
    ad = HybridExpertAdaptor(AdaptorConfig(in_dim=4))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        ad.task_forward(0, torch.randn(2, 5))
    with pytest.raises(ValueError, match="one per task"):
        ad([torch.randn(2, 4)])
