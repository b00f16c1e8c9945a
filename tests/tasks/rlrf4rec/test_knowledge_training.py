"""The reward-model options that make a reranker lean on knowledge: several vectors per user
drawn at random, and the knowledge-contrastive term (arithmetic written out)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tasks.rlrf4rec.encode import frame_vectors, vectors_frame
from tasks.rlrf4rec.knowledge_training import DrawTable, knowledge_contrast, other_user_rows
from tasks.rlrf4rec.reranker import TrainConfig, train_reranker
from tests.conftest import DIM, FAST, make_run, random_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frame() -> pl.DataFrame:
    vec = np.array([[1, 0], [2, 0], [3, 0], [4, 0], [5, 0]], np.float32)
    return vectors_frame(np.array([7, 3, 7, 3, 9]), vec)


def test_draw_table_first_rows_and_draws() -> None:
    table = DrawTable(_frame())
    assert table.dim == 2
    first = table.matrix[table.rows(np.array([7, 3, 9]))][:, 0]
    assert first.tolist() == [1.0, 2.0, 5.0]  # each user's first vector in frame order
    rng = np.random.default_rng(0)
    drawn = table.matrix[table.draw_rows(np.full(2000, 7), rng)][:, 0]
    assert set(drawn.tolist()) == {1.0, 3.0}
    assert 0.45 < float((drawn == 1.0).mean()) < 0.55  # uniform over the user's 2 vectors
    assert set(table.matrix[table.draw_rows(np.full(50, 9), rng)][:, 0].tolist()) == {5.0}
    with pytest.raises(ValueError, match="no vector for 1 ids"):
        table.rows(np.array([7, 4]))


def test_knowledge_contrast_written_out() -> None:
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    other = torch.tensor([[0.0, 0.0], [1.0, -1.0]])

    def bce(z: float, y: float) -> float:  # -y log s(z) - (1 - y) log(1 - s(z))
        return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))

    own_l = [(bce(2, 1) + bce(-2, 0)) / 2, (bce(0, 0) + bce(0, 1)) / 2]
    other_l = [(bce(0, 1) + bce(0, 0)) / 2, (bce(1, 0) + bce(-1, 1)) / 2]
    softplus = [math.log1p(math.exp(o - t)) for o, t in zip(own_l, other_l, strict=True)]
    both = knowledge_contrast(own, other, labels, torch.tensor([True, True]))
    assert float(both) == pytest.approx(sum(softplus) / 2, rel=1e-6)
    first = knowledge_contrast(own, other, labels, torch.tensor([True, False]))
    assert float(first) == pytest.approx(softplus[0], rel=1e-6)
    assert float(knowledge_contrast(own, other, labels, torch.tensor([False, False]))) == 0.0


def test_other_user_rows_is_the_next_list() -> None:
    rows, differs = other_user_rows(np.array([4, 5, 6]), np.array([1, 1, 2]))
    assert rows.tolist() == [6, 4, 5] and differs.tolist() == [True, False, True]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    run = make_run(tmp_path_factory.mktemp("kt"))
    users, items = random_vectors(run)
    return run, users, items


def test_draws_train_on_several_vectors_per_user(tiny, tmp_path: Path) -> None:
    run, users, items = tiny
    noisy = users.with_columns(
        pl.Series("vector", frame_vectors(users) + 0.5, dtype=users.schema["vector"])
    )
    both = pl.concat([users, noisy])
    cfg = TrainConfig(backbone="dlcm", seed=0, **FAST)
    with pytest.raises(ValueError, match="more than one vector"):
        train_reranker(run, tmp_path / "one", cfg, both, items)
    summary = train_reranker(
        run, tmp_path / "draws", TrainConfig(**{**cfg.to_dict(), "knowledge_draws": True}),
        both, items,
    )  # fmt: skip
    assert summary["knowledge"] and summary["epochs_run"] >= 1


def test_contrastive_term_changes_training(tiny, tmp_path: Path) -> None:
    run, users, items = tiny
    cfg = TrainConfig(backbone="dlcm", seed=0, **FAST)
    plain = train_reranker(run, tmp_path / "plain", cfg, users, items)
    contrast = train_reranker(
        run, tmp_path / "contrast", TrainConfig(**{**cfg.to_dict(), "contrastive": 1.0}),
        users, items,
    )  # fmt: skip
    # the term is softplus(...) >= 0, about ln 2 at the start: the first epoch's loss carries it
    first = [
        json.loads((tmp_path / name / "train_log.json").read_text())["history"][0]["train_loss"]
        for name in ("plain", "contrast")
    ]
    assert first[1] > first[0] + 0.3
    assert contrast["valid"] != plain["valid"]
    with pytest.raises(ValueError, match="contrastive must be >= 0"):
        TrainConfig(contrastive=-1.0)
    assert DIM == users["vector"].list.len()[0]
