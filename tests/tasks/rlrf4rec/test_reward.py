from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.data.prepare import load_prepared
from tasks.rlrf4rec.encode import frame_vectors, vectors_frame
from tasks.rlrf4rec.reranker import TrainConfig, train_reranker
from tasks.rlrf4rec.reranker_data import user_folds
from tasks.rlrf4rec.reward import (
    REWARD_FILE,
    reward_lists,
    score_samples,
    score_samples_naive,
    train_reward_model,
)
from tests.conftest import DIM, FAST, make_run, random_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N_SAMPLES = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def reward_model(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    users, items = random_vectors(run)
    out = tmp_path_factory.mktemp("rm") / "reward"
    train_reward_model(run, out, TrainConfig(backbone="prm", seed=0, **FAST), users, items)
    return out


def make_samples(run: Path, seed: int = 1) -> pl.DataFrame:
    """N_SAMPLES noisy copies of every user's vector (test users included)."""
    users, _ = random_vectors(run)
    rng = np.random.default_rng(seed)
    base = frame_vectors(users)
    rows = np.repeat(np.arange(users.height), N_SAMPLES)
    vec = base[rows] + rng.normal(0, 1.0, (len(rows), DIM)).astype(np.float32)
    frame = vectors_frame(users["user_id"].to_numpy()[rows], vec)
    return frame.with_columns(
        pl.Series("sample_idx", np.tile(np.arange(N_SAMPLES), users.height), dtype=pl.Int64)
    ).select("user_id", "sample_idx", "vector")


def test_reward_model_layout(reward_model: Path) -> None:
    meta = json.loads((reward_model / REWARD_FILE).read_text())
    assert meta["n_folds"] == 2 and [f["fold"] for f in meta["folds"]] == [0, 1]
    for f in meta["folds"]:
        assert (reward_model / f["dir"] / "model.safetensors").is_file()
        assert f["summary"]["train_lists"] < 36  # each fold model sees part of the train users


def test_reward_lists_cover_non_test_users(run: Path) -> None:
    data = load_prepared(run)
    lists = reward_lists(data, n_folds=2, fold_seed=0)
    assert set(lists["split"]) == {"train", "valid"}
    assert lists.height == data.lists.filter(pl.col("split") != "test").height
    folds = user_folds(data.users, 2, 0)
    joined = lists.join(folds, on="user_id", suffix="_u")
    assert (joined["fold"] == joined["fold_u"]).all()
    with pytest.raises(ValueError, match="splits"):
        reward_lists(data, splits=("train", "holdout"))


def test_batched_equals_loop(run: Path, reward_model: Path) -> None:
    samples = make_samples(run)
    batched = score_samples(reward_model, run, samples, batch_size=7)  # many small chunks
    naive = score_samples_naive(reward_model, run, samples)
    assert batched.columns == [
        "user_id", "sample_idx", "map_at_5", "ndcg_at_5", "soft_auc", "ndcg_at_5_auc", "n_lists"
    ]  # fmt: skip
    assert batched.select("user_id", "sample_idx").equals(samples.select("user_id", "sample_idx"))
    assert batched["n_lists"].to_list() == naive["n_lists"].to_list()
    scored = batched.filter(pl.col("n_lists") > 0)
    assert np.allclose(scored["map_at_5"], naive.filter(pl.col("n_lists") > 0)["map_at_5"])
    assert np.allclose(scored["ndcg_at_5"], naive.filter(pl.col("n_lists") > 0)["ndcg_at_5"])
    assert np.allclose(scored["soft_auc"], naive.filter(pl.col("n_lists") > 0)["soft_auc"])
    # the tie-break reward: NDCG@5 + 0.01 x soft-AUC
    assert np.allclose(scored["ndcg_at_5_auc"], scored["ndcg_at_5"] + 0.01 * scored["soft_auc"])
    # soft-AUC is continuous: a user's samples never tie on it, even where NDCG@5 ties
    auc_spread = scored.group_by("user_id").agg(pl.col("soft_auc").n_unique().alias("n"))
    assert (auc_spread["n"] == scored.group_by("user_id").len().sort("user_id")["len"].max()).all()
    # the sample's vector matters: samples of one user do not all get the same reward
    spread = scored.group_by("user_id").agg(pl.col("ndcg_at_5").n_unique().alias("n"))
    assert spread["n"].max() > 1
    # test users are not scored by default; every non-test user has all its lists
    data = load_prepared(run)
    test_users = set(data.users.filter(pl.col("split") == "test")["user_id"])
    none = batched.filter(pl.col("n_lists") == 0)
    assert set(none["user_id"]) == test_users and none["map_at_5"].null_count() == none.height
    assert set(scored["n_lists"]) == {4}


def test_one_big_chunk_and_test_users(run: Path, reward_model: Path) -> None:
    samples = make_samples(run, seed=2)
    small = score_samples(reward_model, run, samples, batch_size=5)
    big = score_samples(reward_model, run, samples, batch_size=100_000)
    assert np.allclose(small["map_at_5"].fill_null(-1), big["map_at_5"].fill_null(-1))
    every = score_samples(reward_model, run, samples, splits=("train", "valid", "test"))
    assert (every["n_lists"] == 4).all()


def test_plain_dlcm_model(run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    users, _ = random_vectors(run)
    train_reranker(run, tmp_path / "dlcm", TrainConfig(backbone="dlcm", **FAST), users)
    samples = make_samples(run).filter(pl.col("user_id") <= 6)
    with caplog.at_level(logging.WARNING, logger="tasks.rlrf4rec.reward"):
        batched = score_samples(tmp_path / "dlcm", run, samples, batch_size=4)
    assert "not a cross-fitted reward model" in caplog.text
    naive = score_samples_naive(tmp_path / "dlcm", run, samples)
    assert np.allclose(batched["ndcg_at_5"].fill_null(-1), naive["ndcg_at_5"].fill_null(-1))


def test_bad_samples(run: Path, reward_model: Path) -> None:
    samples = make_samples(run)
    with pytest.raises(ValueError, match="sample_idx"):
        score_samples(reward_model, run, samples.drop("sample_idx"))
    with pytest.raises(ValueError, match="duplicate"):
        score_samples(reward_model, run, pl.concat([samples, samples.head(1)]))
    narrow = samples.with_columns(pl.col("vector").list.head(3))
    with pytest.raises(ValueError, match="width 3"):
        score_samples(reward_model, run, narrow)
