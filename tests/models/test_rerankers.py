from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.base import Reranker, RerankerConfig
from models.rerankers import DLCM, PRM, PhiFunction, build_reranker, load_reranker, sinusoid_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N_ITEMS, N_GENRES, DIM = 30, 4, 12


def tiny(
    backbone: str, user_dim: int = 0, item_dim: int = 0, seed: int = 0, arch: str = "default"
) -> Reranker:
    torch.manual_seed(seed)
    cfg = RerankerConfig(
        backbone=backbone,
        n_items=N_ITEMS,
        n_genres=N_GENRES,
        user_dim=user_dim,
        item_dim=item_dim,
        expert_hidden=16,
        dropout=0.0,
        arch=arch,  # type: ignore[arg-type]
        genre_names=("a", "b", "c", "d"),
    )
    model = build_reranker(cfg)
    ids = torch.arange(1, N_ITEMS + 1) * 10  # raw ids 10, 20, ..., 300
    genre = torch.arange(N_ITEMS) % (N_GENRES + 1)
    vec = torch.randn(N_ITEMS, item_dim) if item_dim else None
    model.set_catalogue(ids, genre, vec)
    return model


def batch(b: int = 6, user_dim: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"item_ids": torch.randint(1, N_ITEMS + 1, (b, 10), generator=g) * 10}
    if user_dim:
        out["user_vec"] = torch.randn(b, user_dim, generator=g)
    return out


VARIANTS = [(bb, ud, idim) for bb in ("dlcm", "prm") for ud, idim in ((0, 0), (DIM, 0), (DIM, DIM))]
ARCH_VARIANTS = [(*v, arch) for v in VARIANTS for arch in ("default", "kar")]


def warm_batch_norm(model: Reranker, user_dim: int) -> None:
    """A few training-mode passes so KAR's BatchNorm running stats are not the identity."""
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(batch(8, user_dim, seed=10 + seed))
    model.eval()


@pytest.mark.parametrize(("backbone", "user_dim", "item_dim"), VARIANTS)
def test_shapes_and_input_width(backbone: str, user_dim: int, item_dim: int) -> None:
    model = tiny(backbone, user_dim, item_dim)
    assert isinstance(model, DLCM if backbone == "dlcm" else PRM)
    expected_width = 64 + (32 if user_dim else 0) + (32 if item_dim else 0)
    assert model.cfg.input_dim == expected_width
    x = model.candidate_features(batch(user_dim=user_dim))
    assert x.shape == (6, 10, expected_width)
    assert model(batch(user_dim=user_dim)).shape == (6, 10)


def test_paper_widths() -> None:
    cfg = RerankerConfig(backbone="dlcm", n_items=5, n_genres=2, user_dim=384, item_dim=384)
    model = build_reranker(cfg)
    assert cfg.input_dim == 128  # 32 id + 32 genre + 64 adaptor
    assert model.gru.input_size == 128 and model.gru.hidden_size == 64


@pytest.mark.parametrize(("backbone", "user_dim", "item_dim", "arch"), ARCH_VARIANTS)
def test_training_steps_lower_the_loss(
    backbone: str, user_dim: int, item_dim: int, arch: str
) -> None:
    model = tiny(backbone, user_dim, item_dim, arch=arch)
    b = batch(16, user_dim)
    labels = (b["item_ids"] % 30 == 0).float()  # learnable from the item id
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(model(b), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_loss_is_bce_with_logits() -> None:
    scores = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([[1, 0]])
    expected = (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(2.0)))) / 2
    assert Reranker.loss(scores, labels).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("backbone", "user_dim", "item_dim", "arch"), ARCH_VARIANTS)
def test_save_load_round_trip(
    backbone: str, user_dim: int, item_dim: int, arch: str, tmp_path: Path
) -> None:
    model = tiny(backbone, user_dim, item_dim, arch=arch)
    warm_batch_norm(model, user_dim)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["backbone"] == backbone and cfg["genre_names"] == ["a", "b", "c", "d"]
    assert cfg["arch"] == arch
    loaded = load_reranker(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    b = batch(user_dim=user_dim)
    with torch.no_grad():
        assert torch.equal(model(b), loaded(b))
    assert torch.equal(loaded.item_vocab, model.item_vocab)


def test_unknown_items_map_to_row_zero() -> None:
    model = tiny("prm")
    idx = model.item_index(torch.tensor([[10, 15, 300, 310, 0]]))
    assert idx.tolist() == [[1, 0, 30, 0, 0]]


@pytest.mark.parametrize("backbone", ["dlcm", "prm"])
@pytest.mark.parametrize("item_dim", [0, DIM])
@pytest.mark.parametrize("arch", ["default", "kar"])
def test_score_pairs_equals_forward(backbone: str, item_dim: int, arch: str) -> None:
    model = tiny(backbone, DIM, item_dim, seed=3, arch=arch)
    warm_batch_norm(model, DIM)
    lists = batch(5)["item_ids"]
    users = torch.randn(4, DIM)
    rows = torch.tensor([[0, 1, 2], [1, -1, -1], [2, 3, 0], [3, 3, -1], [0, 1, 2]])
    with torch.no_grad():
        got = model.score_pairs(lists, users, rows, model.pair_tables())
        generic = Reranker._pair_scores(
            model,
            model.item_index(lists),
            Reranker.pair_tables(model),
            model.adaptor.task_forward(0, users),
            rows.clamp(0),
        )
        assert got.shape == (5, 3, 10)
        for li in range(5):
            for n in range(3):
                r = int(rows[li, n])
                if r < 0:
                    assert (got[li, n] == 0).all()
                    continue
                one = model({"item_ids": lists[li : li + 1], "user_vec": users[r : r + 1]})[0]
                assert torch.allclose(got[li, n], one, atol=1e-5)
                assert torch.allclose(generic[li, n], one, atol=1e-5)
        # the user_index form of forward: many lists sharing vectors
        li = torch.tensor([0, 2, 2, 4])
        ui = torch.tensor([1, 0, 3, 2])
        via_index = model({"item_ids": lists[li], "user_vec": users, "user_index": ui})
        direct = model({"item_ids": lists[li], "user_vec": users[ui]})
    assert torch.allclose(via_index, direct, atol=1e-6)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="backbone"):
        RerankerConfig(backbone="lstm", n_items=3, n_genres=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be equal"):
        RerankerConfig(backbone="prm", n_items=3, n_genres=1, user_dim=8, item_dim=4)
    model = tiny("dlcm", DIM)
    with pytest.raises(ValueError, match="user_vec"):
        model(batch())
    with pytest.raises(ValueError, match="list_len"):
        model({"item_ids": torch.ones(2, 11, dtype=torch.long), "user_vec": torch.randn(2, DIM)})
    with pytest.raises(RuntimeError, match="eval"):
        model.train().score_pairs(batch(2)["item_ids"], torch.randn(1, DIM), torch.zeros(2, 1))
    with pytest.raises(FileNotFoundError, match="not a saved reranker"):
        load_reranker(Path("/nonexistent"))


# --------------------------------------------------------------------------- arch="kar"


def test_kar_phi_batch_norms_final_and_sequence_states() -> None:
    """KAR's Phi_function on a batch of 2 final states of width 3, in training mode.

    fc1 = identity (zero bias), fc2 rows a = (1, 2, 3), b = (0, 1, 0), so the logit is
    a - b = (1, 1, 3) . z, and BatchNorm's gamma = 1, beta = 0.

    final states (1, 0, 2) and (3, 0, 0): per-channel means (2, 0, 1), biased variances
    (1, 0, 1) -> normalised (-1, 0, 1) and (1, 0, -1) (a zero-variance channel gives 0), so
    c = tanh(.) = (-t, 0, t) and (t, 0, -t) with t = tanh(1) = 0.761594.
    sequence states (one per list): (0, 0, 0) and (2, 4, 6): means (1, 2, 3), variances
    (1, 4, 9) -> normalised (-1, -1, -1) and (1, 1, 1).
    list 0: z = (-t * -1, 0, t * -1) = (t, 0, -t) -> logit t + 0 - 3t = -2t = -1.523188
    list 1: z = (t * 1, 0, -t * 1) = (t, 0, -t) -> logit -2t as well.
    Today's phi (no BatchNorm: v . (o * tanh(W s + b))) gives 0 for list 0, o = 0.
    """
    phi = PhiFunction(3, dropout=0.0).train()
    with torch.no_grad():
        phi.fc1.weight.copy_(torch.eye(3))
        phi.fc1.bias.zero_()
        phi.fc2.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]))
        phi.fc2.bias.zero_()
    final = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    seq = torch.tensor([[[0.0, 0.0, 0.0]], [[2.0, 4.0, 6.0]]])  # [B=2, L=1, H=3]
    logits = phi(seq, final)
    t = 0.761594
    assert logits.shape == (2, 1)
    assert logits[:, 0].tolist() == pytest.approx([-2 * t, -2 * t], abs=1e-4)
    # one training pass moved the running stats: 0.9 * 0 + 0.1 * mean, 0.9 * 1 + 0.1 * the
    # unbiased variance ((1 - 3)^2 / 2 = 2, 0, 2)
    assert phi.bn_final.running_mean.tolist() == pytest.approx([0.2, 0.0, 0.1])
    assert phi.bn_final.running_var.tolist() == pytest.approx([1.1, 0.9, 1.1])
    # KAR's score is softmax(fc2(z))[0]; the logit's sigmoid is that probability
    z = phi.context(final).unsqueeze(1) * phi.bn_seq(seq.transpose(1, 2)).transpose(1, 2)
    kar_score = torch.softmax(phi.fc2(z), dim=-1)[..., 0]
    assert torch.allclose(torch.sigmoid(logits), kar_score, atol=1e-6)


def test_kar_dlcm_uses_phi_and_no_input_dropout() -> None:
    cfg = RerankerConfig(backbone="dlcm", n_items=5, n_genres=2, dropout=0.5, arch="kar")
    model = build_reranker(cfg)
    assert isinstance(model.phi, PhiFunction) and not hasattr(model, "score_vec")
    model.set_catalogue([1, 2, 3, 4, 5], [1, 2, 0, 1, 2])
    b = {"item_ids": torch.tensor([[1, 2, 3], [3, 4, 5]])}
    model.train()
    x = model.candidate_features(b)
    out, last = model.gru(x)  # no dropout of x: the GRU states are those of the plain input
    normed = model.phi.bn_seq(out.transpose(1, 2)).transpose(1, 2)
    assert normed.shape == (2, 3, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(b), model(b))  # eval: dropout 0.5 is off


def test_sinusoid_table_first_rows() -> None:
    """KAR's table with d = 4: angle = pos / 10000^(2 * (j // 2) / 4), i.e. pos / (1, 1, 100,
    100); sin at even j, cos at odd j; row 0 all zeros.
    row 1: sin 1 = 0.841471, cos 1 = 0.540302, sin 0.01 = 0.0099998, cos 0.01 = 0.99995
    row 2: sin 2 = 0.909297, cos 2 = -0.416147, sin 0.02 = 0.0199987, cos 0.02 = 0.9998"""
    table = sinusoid_table(3, 4)
    assert table.shape == (3, 4)
    assert table[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert table[1].tolist() == pytest.approx([0.841471, 0.540302, 0.0099998, 0.99995], abs=1e-6)
    assert table[2].tolist() == pytest.approx([0.909297, -0.416147, 0.0199987, 0.9998], abs=1e-6)


def test_kar_prm_positions_are_fixed_and_default_learned() -> None:
    kar = tiny("prm", arch="kar")
    assert "pos_emb" in dict(kar.named_buffers())
    assert "pos_emb" not in dict(kar.named_parameters())
    assert torch.equal(kar.pos_emb, sinusoid_table(10, 64))
    default = tiny("prm")
    assert "pos_emb" in dict(default.named_parameters())  # today's: learned, N(0, 0.02)
    assert default.pos_emb[0].abs().sum() > 0


def test_kar_init_std() -> None:
    """xavier-normal: std = sqrt(2 / (fan_in + fan_out)).
    item table 1,000 rows x 32: sqrt(2 / 1032) = 0.044023 (PyTorch's default N(0, 1): 1.0);
    PRM MLP's first Linear 256 -> 200 ([200, 256]): sqrt(2 / 456) = 0.066227, zero bias;
    adaptor expert 384 -> 128: sqrt(2 / 512) = 0.0625, zero bias."""
    torch.manual_seed(0)
    cfg = RerankerConfig(
        backbone="prm",
        n_items=999,
        n_genres=3,
        user_dim=384,
        item_dim=384,
        mlp=(200, 80),
        arch="kar",
    )
    model = build_reranker(cfg)
    emb = model.item_emb.weight.detach()
    assert emb.shape == (1000, 32)
    assert emb[0].abs().sum() == 0  # the unknown row stays zero
    assert emb[1:].std().item() == pytest.approx(0.044023, rel=0.03)
    first = model.mlp[0]
    assert first.weight.shape == (200, 256)
    assert first.weight.std().item() == pytest.approx(0.066227, rel=0.03)
    assert first.bias.abs().sum() == 0
    assert model.attn.out_proj.bias.abs().sum() == 0
    w1 = model.adaptor.specific[0].w1.detach()  # [6, 384, 128]
    assert w1.std().item() == pytest.approx(0.0625, rel=0.03)
    assert model.adaptor.specific[0].b1.abs().sum() == 0
    default = build_reranker(RerankerConfig(backbone="prm", n_items=999, n_genres=3))
    assert default.item_emb.weight[1:].std().item() == pytest.approx(1.0, rel=0.03)


def test_bad_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        RerankerConfig(backbone="prm", n_items=3, n_genres=1, arch="prm2")  # type: ignore[arg-type]
