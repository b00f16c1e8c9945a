"""MLflow tracking with explicit run ids: where the store is, and one :class:`Tracker` per
experiment and store.

Every call names its run id, so logging is safe from Prefect's worker threads.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


ARTIFACTS_DIR = "mlartifacts"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artefacts go: beside a SQLite store (``<its folder>/mlartifacts/
    <experiment>``), whatever folder the command runs from; None (the store's own choice) for
    a folder store or a server. MLflow's default for SQLite, ``./mlruns``, is relative to the
    working folder of the process that creates the experiment."""
    root = sqlite_artifact_root(uri)
    return (root / experiment).as_uri() if root else None


def sqlite_artifact_root(uri: str) -> Path | None:
    """``<folder of the database>/mlartifacts`` for ``sqlite:///<file>``, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :]
    if db in ("", ":memory:"):
        return None
    return Path(db).expanduser().resolve().parent / ARTIFACTS_DIR


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite at an absolute path in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


class Tracker:
    """MLflow logging with explicit run ids (safe from Prefect's worker threads).

    Every call names its run id; nothing relies on MLflow's thread-local active run.
    """

    def __init__(self, experiment: str, uri: str | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                experiment, artifact_location=artifact_location(self.uri, experiment)
            )
        )

    def start(self, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> str:
        """Create a run (a child when ``parent_run_id`` is given) and return its id.

        A child of the same name under the same parent (a resumed run's round) is reopened
        instead of duplicated.
        """
        all_tags = dict(tags or {})
        if parent_run_id:
            found = self.find(name, parent_run_id)
            if found:
                self.reopen(found)
                return found
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this experiment."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MLflow raises its own error types per store
            return False
        return run.info.experiment_id == self.experiment_id and (
            run.info.lifecycle_stage == "active"
        )

    def reopen(self, run_id: str) -> None:
        """Mark a finished, failed or killed run RUNNING again (a resume continues it)."""
        self.client.update_run(run_id, status="RUNNING")

    def open_children(self, parent_run_id: str) -> list[str]:
        query = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
        return [r.info.run_id for r in self.client.search_runs([self.experiment_id], query)]

    def end_family(self, parent_run_id: str, status: str) -> None:
        """End the parent run and every child still RUNNING with ``status``."""
        for child in self.open_children(parent_run_id):
            self.client.set_terminated(child, status)
        self.client.set_terminated(parent_run_id, status)

    def find(self, name: str, parent_run_id: str | None = None) -> str | None:
        """The id of an unfinished-or-finished run with this name (and parent), if any."""
        query = f"attributes.run_name = '{name}'"
        if parent_run_id:
            query += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=1)
        return runs[0].info.run_id if runs else None

    def params(self, run_id: str, params: Mapping[str, Any]) -> list[str]:
        """Log ``params`` (flattened: ``data.users``) on ``run_id``: the keys it lacks. MLflow
        keeps a parameter's first value, so a key logged before with another value is not
        logged again: its name is returned (and warned about), for the caller to start a new
        run (:func:`flows.common._parent_run` does for the flow's parameters)."""
        from mlflow.entities import Param

        flat = param_values(params)
        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in flat.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start : start + 100])
        changed = changed_params(existing, params)
        if changed:
            log.warning(
                "MLflow run %s keeps earlier values of %s (MLflow parameters cannot change)",
                run_id,
                ", ".join(changed),
            )
        return changed

    def metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(_clean_key(k), float(v), now, step or 0)
            for k, v in _flatten(metrics).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for start in range(0, len(rows), 500):
            self.client.log_batch(run_id, metrics=rows[start : start + 500])

    def artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


def param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """``params`` flattened (``data.users``) with each value as MLflow stores it (text, at most
    6,000 characters)."""
    return {k: str(v)[:6000] for k, v in _flatten(params).items()}


def changed_params(logged: Mapping[str, str], params: Mapping[str, Any]) -> list[str]:
    """The keys of ``params`` that ``logged`` (a run's MLflow parameters) holds with another
    value, sorted."""
    return sorted(k for k, v in param_values(params).items() if k in logged and logged[k] != v)


def _clean_key(key: str) -> str:
    """MLflow keys allow letters, digits and ``_-./ ``: ``ndcg@5`` becomes ``ndcg_at_5``."""
    key = key.replace("@", "_at_")
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def tracker_for(experiment: str) -> Tracker:
    """One :class:`Tracker` per experiment, tracking store and process."""
    return _tracker(experiment, tracking_uri())


@functools.lru_cache(maxsize=8)
def _tracker(experiment: str, uri: str) -> Tracker:
    return Tracker(experiment, uri)
