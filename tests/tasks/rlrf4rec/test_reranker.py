from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tasks.data.prepare import load_prepared
from tasks.rlrf4rec.reranker import (
    TrainConfig,
    deterministic_torch,
    evaluate_reranker,
    train_reranker,
    training_lists,
)
from tasks.rlrf4rec.reranker_data import user_folds
from tasks.rlrf4rec.reranker_results import reference_results, write_eval
from tests.conftest import DIM, FAST, make_run, random_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


METRIC_KEYS = {f"{m}@{k}" for m in ("map", "ndcg") for k in (1, 3, 5, 7)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("rerank"))


def test_train_and_evaluate_base(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "dlcm"
    summary = train_reranker(run, out, TrainConfig(backbone="dlcm", seed=1, **FAST))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "train_log.json",
    ]
    log = json.loads((out / "train_log.json").read_text())
    valid_curve = [h["valid_map@5"] for h in log["history"]]
    # the checkpoint is the best validation epoch (test is never looked at)
    assert summary["best_epoch"] == int(np.argmax(valid_curve)) + 1
    assert set(summary["valid"]) == METRIC_KEYS and summary["seconds_per_epoch"] > 0
    assert not summary["knowledge"] and summary["train_lists"] == 36
    result = evaluate_reranker(out, run)
    assert set(result.metrics) == METRIC_KEYS and result.split == "test"
    assert result.n_lists == 16
    assert result.per_list.columns == ["list_id", "user_id", *sorted(METRIC_KEYS)]
    assert result.metrics["map@5"] == pytest.approx(result.per_list["map@5"].mean())
    path = write_eval(result, tmp_path / "eval" / "dlcm.json")
    assert json.loads(path.read_text())["metrics"] == result.metrics
    assert pl.read_parquet(tmp_path / "eval" / "dlcm.per_list.parquet").height == 16


def test_same_seed_same_model(run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(backbone="prm", seed=5, **FAST)
    train_reranker(run, tmp_path / "a", cfg)
    train_reranker(run, tmp_path / "b", cfg)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b


def test_same_seed_same_model_with_threads(run: Path, tmp_path: Path) -> None:
    """Two intra-op threads sum some CPU gradients in a scheduling-dependent order; training
    runs in deterministic mode so the weights still match bit for bit, and the caller's mode
    comes back afterwards."""
    users, items = random_vectors(run)
    cfg = TrainConfig(backbone="dlcm", seed=5, **{**FAST, "num_threads": 2, "epochs": 4})
    for name in ("a", "b", "c"):
        train_reranker(run, tmp_path / name, cfg, users, items)
    first = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert all((tmp_path / n / "model.safetensors").read_bytes() == first for n in "bc")
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_torch_fixes_threaded_gather_gradients() -> None:
    """The gradient of a gather (``x[idx]``, as the adaptor reads item vectors) accumulates in
    a thread-dependent order on CPU once the work is large enough; not in the block."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 60, (2000,), generator=gen)
    x = torch.randn(60, 64, generator=gen, requires_grad=True)
    upstream = torch.randn(2000, 64, generator=gen)

    def grad() -> torch.Tensor:
        x.grad = None
        (x[idx] * upstream).sum().backward()
        return x.grad.clone()

    before = torch.get_num_threads()  # the module runs on one thread (one_torch_thread)
    torch.set_num_threads(2)
    try:
        with deterministic_torch():
            assert torch.are_deterministic_algorithms_enabled()
            grads = [grad() for _ in range(30)]
    finally:
        torch.set_num_threads(before)
    assert not torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_knowledge_model(run: Path, tmp_path: Path) -> None:
    users, items = random_vectors(run)
    out = tmp_path / "prm-k"
    cfg = TrainConfig(backbone="prm", seed=2, **FAST)
    summary = train_reranker(run, out, cfg, users, items)
    assert summary["knowledge"] and summary["item_knowledge"]
    config = json.loads((out / "config.json").read_text())
    assert config["user_dim"] == DIM and config["item_dim"] == DIM
    result = evaluate_reranker(out, run, users, split="valid")
    assert result.n_lists == 12 and result.name == "prm+knowledge"
    with pytest.raises(ValueError, match="pass user_vectors"):
        evaluate_reranker(out, run)
    with pytest.raises(ValueError, match="user_vectors has no vector"):
        evaluate_reranker(out, run, users.head(3))
    with pytest.raises(ValueError, match="item_vectors needs user_vectors"):
        train_reranker(run, tmp_path / "x", cfg, None, items)
    base = tmp_path / "prm-base"
    train_reranker(run, base, TrainConfig(backbone="prm", **FAST))
    with pytest.raises(ValueError, match="base model"):
        evaluate_reranker(base, run, users)


def test_reference_rows(run: Path) -> None:
    refs = reference_results(run, "test")
    assert set(refs) == {"initial", "popularity", "oracle"}
    data = load_prepared(run)
    test = data.lists.filter(pl.col("split") == "test")
    share_positive = float((test["labels"].list.sum() > 0).mean())
    assert refs["oracle"].metrics["map@5"] == pytest.approx(share_positive)
    assert refs["oracle"].metrics["ndcg@3"] == pytest.approx(share_positive)
    assert refs["initial"].metrics["map@5"] <= refs["oracle"].metrics["map@5"]


def test_folds_and_training_lists(run: Path) -> None:
    data = load_prepared(run)
    folds = user_folds(data.users, n_folds=2, seed=0)
    assert folds.height == 12 and set(folds["split"]) == {"train", "valid"}
    assert sorted(folds.group_by("fold").len()["len"].to_list()) == [6, 6]
    cfg = TrainConfig(exclude_fold=1)
    kept = training_lists(data, cfg)
    held = set(folds.filter(pl.col("fold") == 1)["user_id"])
    assert kept.height > 0 and not set(kept["user_id"]) & held
    assert set(kept["split"]) == {"train"}


def test_config() -> None:
    paper = TrainConfig.paper("prm")
    assert (paper.batch_size, paper.lr, paper.epochs) == (64, 1e-3, 50)
    # KAR's architecture (RS/main_rerank.py defaults); today's stays the default
    assert (paper.arch, paper.dropout, paper.mlp) == ("kar", 0.0, (200, 80))
    assert (TrainConfig().arch, TrainConfig().dropout, TrainConfig().mlp) == ("default", 0.1, (64,))
    model_cfg = paper.model_config(10, 3, 384, 384)
    assert (model_cfg.arch, model_cfg.input_dim, model_cfg.n_heads) == ("kar", 128, 2)
    assert TrainConfig().epochs < paper.epochs
    with pytest.raises(ValueError, match="backbone"):
        TrainConfig(backbone="gru")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclude_fold"):
        TrainConfig(exclude_fold=2, n_folds=2)


def test_table1_cli(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tasks.rlrf4rec.table1 import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--knowledge" in capsys.readouterr().out
    args = ["--run", str(run), "--knowledge", "profile", "--seeds", "1,2", "--backbones", "prm"]
    args += ["--epochs", "2", "--batch-size", "8", "--threads", "1", "--n-boot", "50"]
    args += ["--out", str(tmp_path / "t1"), "--cache-dir", str(tmp_path / "emb")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| PRM | base |" in out and "| PRM | profile |" in out
    assert "profile - base (lists, bootstrap)" in out and "| reference | popularity |" in out
    results = json.loads((tmp_path / "t1" / "results.json").read_text())
    rows = results["backbones"]["prm"]["rows"]
    assert rows["base"]["map@5"]["n"] == 2 and set(rows) == {"base", "profile"}
    assert results["backbones"]["prm"]["delta"]["ndcg@5"]["lists"]["n"] == 16
    # a second run reuses the finished models
    assert main(args) == 0
    assert main([*args[:3], "missing.parquet", *args[4:]]) == 1


@pytest.mark.parametrize("backbone", ["dlcm", "prm"])
def test_kar_arch_trains_with_a_last_batch_of_one(backbone: str, run: Path, tmp_path: Path) -> None:
    """36 train lists in batches of 35 leave a last batch of 1, which KAR's BatchNorm cannot
    take in training mode: it is skipped, and the saved model is KAR's."""
    users, items = random_vectors(run)
    cfg = TrainConfig.paper(backbone, **{**FAST, "batch_size": 35, "epochs": 2, "patience": 2})
    summary = train_reranker(run, tmp_path / "m", cfg, users, items)
    assert summary["train_lists"] == 36 and summary["epochs_run"] == 2
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["arch"], saved["dropout"], saved["mlp"]) == ("kar", 0.0, [200, 80])
    result = evaluate_reranker(tmp_path / "m", run, users)
    assert 0.0 <= result.metrics["map@5"] <= 1.0
