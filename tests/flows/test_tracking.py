"""MLflow state after a failure: the parent run of a failed flow run is FAILED, and the run
folder keeps that parent for its resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


def _failing(tmp_path: Path, ml100k_dir: Path, tiny_llm_path: str, name: str) -> dict:
    """The parameters of a tiny run that fails early: too few users (``max_users`` 2), so a
    stage fails (preparing the data or the reward model)."""
    return {
        "run_name": name,
        "runs_dir": str(tmp_path / "runs"),
        "data_dir": str(ml100k_dir),
        "max_users": 2,
        "policy_model": tiny_llm_path,
        "backend": "transformers",
        "experiment": f"tiny-{name}",
    }


def test_a_failed_run_is_marked_failed_and_its_resume_reuses_the_parent(
    tmp_path: Path, tiny_llm_path: str, ml100k_dir: Path, prefect_harness, monkeypatch
) -> None:
    from flows.iterate import iterate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setitem(os.environ, "MLFLOW_TRACKING_URI", uri)
    params = _failing(tmp_path, ml100k_dir, tiny_llm_path, "fails")
    for _ in range(2):
        with pytest.raises(ValueError):  # DataError is a ValueError
            iterate(**params)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-fails")
    runs = client.search_runs([exp.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("fails", "FAILED")]
    record = json.loads((tmp_path / "runs" / "fails" / "run.json").read_text())
    assert record["mlflow"]["parent_run_id"] == runs[0].info.run_id and record["starts"] == 2
    assert record["settings"]["backend"] == "transformers"


def test_a_changed_parameter_opens_a_new_parent_run(
    tmp_path: Path, tiny_llm_path: str, ml100k_dir: Path, prefect_harness, monkeypatch
) -> None:
    """End to end on the tiny model: MLflow never shows ``temperature=1.0`` next to results
    made at 0.7; the run folder's new parent links the old one."""
    from flows.iterate import iterate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setitem(os.environ, "MLFLOW_TRACKING_URI", uri)
    params = _failing(tmp_path, ml100k_dir, tiny_llm_path, "temps")  # a parent run all the same
    for temperature in (1.0, 0.7):
        with pytest.raises(ValueError):
            iterate(**params, temperature=temperature)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-temps")
    runs = {r.data.params["temperature"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["0.7", "1.0"]
    old, new = runs["1.0"], runs["0.7"]
    assert new.data.tags["previous_parent_run_id"] == old.info.run_id
    assert old.data.tags["superseded_by"] == new.info.run_id
    record = json.loads((tmp_path / "runs" / "temps" / "run.json").read_text())
    assert record["mlflow"]["parent_run_id"] == new.info.run_id
