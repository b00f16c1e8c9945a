"""The reward diagnostics on hand-made rewards and vectors, then on a tiny cross-fitted reward
model that reads its knowledge vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.rlrf4rec.encode import frame_vectors, vectors_frame
from tasks.rlrf4rec.reranker import TrainConfig
from tasks.rlrf4rec.reward import train_reward_model
from tasks.rlrf4rec.reward_diagnostics import (
    derangement,
    diagnose,
    reliability,
    sensitivity,
    spread,
    swap_users,
)
from tests.conftest import DIM, FAST, make_run, random_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_derangement_moves_everyone_and_is_seeded() -> None:
    for n in (2, 3, 10):
        perm = derangement(n, seed=5)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == np.arange(n)).any()
    assert derangement(10, 1).tolist() == derangement(10, 1).tolist()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def _vectors(users: int = 4, samples: int = 3) -> pl.DataFrame:
    """Sample vectors whose first entry is the user id (a reward can read who wrote it)."""
    uids = np.repeat(np.arange(1, users + 1), samples)
    vec = np.zeros((len(uids), 2), np.float32)
    vec[:, 0] = uids
    vec[:, 1] = np.tile(np.arange(samples), users)
    frame = vectors_frame(uids, vec)
    return frame.with_columns(
        pl.Series("sample_idx", np.tile(np.arange(samples), users), dtype=pl.Int64)
    )


def test_swap_users_takes_another_users_sample() -> None:
    frame = _vectors()
    swapped = swap_users(frame, "vector", seed=3)
    assert swapped["user_id"].to_list() == frame["user_id"].to_list()
    assert swapped["sample_idx"].to_list() == frame["sample_idx"].to_list()
    donor = frame_vectors(swapped)[:, 0]
    assert (donor != frame["user_id"].to_numpy()).all()  # never the user's own
    # sample i of a user gets sample i of one other user
    assert (frame_vectors(swapped)[:, 1] == frame["sample_idx"].to_numpy()).all()
    per_user = (
        swapped.with_columns(pl.Series("donor", donor))
        .group_by("user_id")
        .agg(pl.col("donor").n_unique())
    )
    assert (per_user["donor"] == 1).all()
    texts = pl.DataFrame({"user_id": [1, 1, 2], "sample_idx": [0, 1, 0], "text": ["a", "b", "c"]})
    assert swap_users(texts, "text", seed=0)["text"].to_list() == ["c", "c", "a"]


def test_sensitivity_of_a_reward_that_reads_and_one_that_ignores() -> None:
    frame = _vectors()
    swapped = frame_vectors(swap_users(frame, "vector", seed=0))
    own = frame_vectors(frame)
    reads = sensitivity(0.1 * own[:, 0], 0.1 * swapped[:, 0])
    assert reads["changed_share"] == 1.0 and reads["mean_abs_change"] >= 0.1 - 1e-6
    ignores = sensitivity(np.full(len(own), 0.4), np.full(len(own), 0.4))
    assert ignores == {"changed_share": 0.0, "mean_abs_change": 0.0, "n": len(own)}
    half = sensitivity(np.array([0.0, 1.0, np.nan]), np.array([0.0, 0.5, 1.0]))
    assert half == {"changed_share": 0.5, "mean_abs_change": 0.25, "n": 2}


def test_spread_is_within_over_between() -> None:
    scored = pl.DataFrame(
        {"user_id": [1, 1, 2, 2, 3], "r": [0.0, 0.2, 1.0, 1.2, 5.0]}  # user 3: one sample
    )
    fig = spread(scored, "r")
    # within: sd of (0, 0.2) = sd of (1, 1.2) = 0.1414; between: sd of (0.1, 1.1) = 0.7071
    assert fig["users"] == 2
    assert fig["within_sd"] == pytest.approx(0.2 / np.sqrt(2))
    assert fig["between_sd"] == pytest.approx(1 / np.sqrt(2))
    assert fig["ratio"] == pytest.approx(0.2)


def _scored(rewards: list[list[float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [u for u, rs in enumerate(rewards) for _ in rs],
            "sample_idx": [i for rs in rewards for i in range(len(rs))],
            "r": [x for rs in rewards for x in rs],
        }
    )


def test_reliability_agreement_ties_and_reversal() -> None:
    a = _scored([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.2, 0.0]])
    same = reliability(a, a, "r")
    assert same == {"pair_agreement": 1.0, "pairs": 12, "best_agreement": 1.0, "users": 2}
    flat = _scored([[0.3] * 4, [0.3] * 4])  # a reward that ignores the text: all ties
    ties = reliability(a, flat, "r")
    assert ties["pair_agreement"] == 0.5 and ties["best_agreement"] == pytest.approx(0.25)
    assert reliability(flat, flat, "r")["best_agreement"] == pytest.approx(0.25)
    reverse = a.with_columns(-pl.col("r"))
    assert reliability(a, reverse, "r")["pair_agreement"] == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    run = make_run(tmp_path_factory.mktemp("diag"))
    users, items = random_vectors(run)  # dim 0 carries the user's parity: the lists' signal
    cfg = TrainConfig(backbone="dlcm", seed=0, **{**FAST, "epochs": 6})
    model = run / "reward"
    train_reward_model(run, model, cfg, users, items)
    return run, users, items, cfg, model


def test_diagnose_a_reward_model_that_reads_knowledge(tiny, tmp_path: Path) -> None:
    run, users, items, cfg, model = tiny
    rng = np.random.default_rng(0)
    base = frame_vectors(users)
    rows = np.repeat(np.arange(users.height), 3)
    vec = base[rows] + rng.normal(0, 0.3, (len(rows), DIM)).astype(np.float32)
    samples = vectors_frame(users["user_id"].to_numpy()[rows], vec).with_columns(
        pl.Series("sample_idx", np.tile(np.arange(3), users.height), dtype=pl.Int64)
    )
    scored = samples.select("user_id", "sample_idx").with_columns(
        pl.lit("a comedy lover").alias("text"), pl.lit(0.5).alias("genre_share")
    )
    fig = diagnose(
        model,
        run,
        round0=users,
        vectors=samples,
        scored=scored,
        items=items,
        cfg=cfg,
        n_folds=2,
        reward_col="ndcg_at_5_auc",
        seed=1,
        second_model=tmp_path / "second",
    )
    assert set(fig["columns"]) == {"ndcg_at_5", "ndcg_at_5_auc", "genre_share"}
    auc = fig["columns"]["ndcg_at_5_auc"]
    assert auc["swapped"]["changed_share"] > 0.5  # another user's vector moves the reward
    assert auc["zeroed"]["changed_share"] > 0.5
    assert 0.0 <= auc["reliability"]["pair_agreement"] <= 1.0
    assert (tmp_path / "second" / "reward.json").is_file()
    # every text is the same: the text reward ignores whose text it is
    assert fig["columns"]["genre_share"]["swapped"]["changed_share"] == 0.0
    ablation = fig["knowledge_ablation"]
    assert ablation["n"] >= 2 and ablation["own"] > ablation["shuffled"]
    assert fig["samples"] > 0 and fig["seconds"]["second_model"] > 0
