from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.base import Reranker, RerankerConfig
from models.rerankers import DLCM, PRM, build_reranker, load_reranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N_ITEMS, N_GENRES, DIM = 30, 4, 12


def tiny(backbone: str, user_dim: int = 0, item_dim: int = 0, seed: int = 0) -> Reranker:
    torch.manual_seed(seed)
    cfg = RerankerConfig(
        backbone=backbone,
        n_items=N_ITEMS,
        n_genres=N_GENRES,
        user_dim=user_dim,
        item_dim=item_dim,
        expert_hidden=16,
        dropout=0.0,
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


@pytest.mark.parametrize(("backbone", "user_dim", "item_dim"), VARIANTS)
def test_training_steps_lower_the_loss(backbone: str, user_dim: int, item_dim: int) -> None:
    model = tiny(backbone, user_dim, item_dim)
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


@pytest.mark.parametrize(("backbone", "user_dim", "item_dim"), VARIANTS)
def test_save_load_round_trip(backbone: str, user_dim: int, item_dim: int, tmp_path: Path) -> None:
    model = tiny(backbone, user_dim, item_dim).eval()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["backbone"] == backbone and cfg["genre_names"] == ["a", "b", "c", "d"]
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
def test_score_pairs_equals_forward(backbone: str, item_dim: int) -> None:
    model = tiny(backbone, DIM, item_dim, seed=3).eval()
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
