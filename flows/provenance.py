"""Where a run comes from, on its MLflow parent run: the code's git commit, the host's CPU and
the dtype models run in there, the generation backend, the Prefect flow run (id and address),
the run folder, and the data set as an MLflow input.

Nothing here may fail a run: a missing git, an unreadable ``/proc/cpuinfo`` or a refused
dataset log leave a tag out (with a warning), never the run.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flows.tracking import PROJECT_ROOT

log = logging.getLogger(__name__)


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str, bool]:
    """``(commit, dirty)`` of the checkout at ``root`` (``("", False)`` without git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "", False
    return head, bool(status)


def provenance_tags(p: Any, run_dir: Path) -> dict[str, str]:
    """The tags of a run's MLflow parent run (``p``: the resolved parameters)."""
    from flows.prefect_ui import flow_run_info
    from tasks.common.hardware import cpu_dtype, cpu_model

    commit, dirty = git_commit()
    tags = {
        "run_dir": str(run_dir),
        "backend": str(getattr(p, "backend", "")),
        "profile": str(getattr(p, "profile", "")),
        "dataset": str(getattr(p, "dataset", "")),
        "host.cpu": cpu_model(),
        "host.cpu_dtype": cpu_dtype().name,
        # MLflow's "Source" column: the flow's module (python -m flows.iterate)
        "mlflow.source.name": flow_module(p),
        "mlflow.source.type": "LOCAL",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
        tags["git.dirty"] = str(dirty).lower()
    prefect = flow_run_info()
    if prefect:
        tags["prefect.flow_run_id"] = prefect["id"]
        if prefect.get("url"):
            tags["prefect.flow_run_url"] = prefect["url"]
    tags["mlflow.note.content"] = run_description(p, run_dir, prefect.get("url", ""))
    return tags


def flow_module(p: Any) -> str:
    """The module a run's flow is started from (``flows.iterate``): the parameter model's
    ``FLOW_MODULE`` when it lives elsewhere, else its module; never ``__main__`` (``python -m``
    runs the module as ``__main__``: its spec keeps the real name)."""
    import sys

    name = getattr(p, "FLOW_MODULE", "") or type(p).__module__
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return name


def run_description(p: Any, run_dir: Path, prefect_url: str = "") -> str:
    """The MLflow run's description (markdown): what ran, where its folder is, and the Prefect
    flow run that started it."""
    what = f"`{getattr(p, 'run_name', '') or run_dir.name}`: `python -m {flow_module(p)}`"
    profile, dataset = getattr(p, "profile", ""), getattr(p, "dataset", "")
    if profile:
        what += f", profile {profile}" + (f" on {dataset}" if dataset else "")
    lines = [what + ".", f"Run folder: `{run_dir}`."]
    if prefect_url:
        lines.append(f"Prefect flow run: [{prefect_url}]({prefect_url})")
    return "\n\n".join(lines)


def tag_run(tracker: Any, run_id: str, p: Any, run_dir: Path) -> dict[str, str]:
    """Set :func:`provenance_tags` on ``run_id``; the tags set."""
    try:
        tags = provenance_tags(p, run_dir)
        for key, value in tags.items():
            tracker.client.set_tag(run_id, key, value)
    except Exception as exc:  # noqa: BLE001 - provenance must never fail a run
        log.warning("provenance tags not set on MLflow run %s: %s", run_id, exc)
        return {}
    return tags


def mlflow_run_url(tracker: Any, run_id: str) -> str | None:
    """The MLflow UI's address of ``run_id``: the tracking server's when the tracking URI is
    one (http), else ``$MLFLOW_UI_URL`` (for ``mlflow ui`` over a local store), else None."""
    import os

    base = os.environ.get("MLFLOW_UI_URL") or (
        tracker.uri if str(tracker.uri).startswith(("http://", "https://")) else ""
    )
    if not base:
        return None
    # MLflow 3 opens an experiment in its GenAI view unless the link asks for model training.
    return (
        f"{base.rstrip('/')}/#/experiments/{tracker.experiment_id}/runs/{quote(run_id)}"
        "?workflowType=machine_learning"
    )


def log_dataset(
    tracker: Any, run_id: str, folder: str | Path, *, name: str, context: str = "train"
) -> bool:
    """The data set behind a run as an MLflow input: the prepared ``ratings.parquet`` (else the
    folder's first parquet file) as a polars-backed dataset with its schema, row count and
    digest, its source the file's path. Whether it was logged."""
    try:
        import mlflow.data
        import polars as pl
        from mlflow.entities import DatasetInput, InputTag

        folder = Path(folder)
        if folder.is_dir():
            ratings = folder / "ratings.parquet"
            files = [ratings] if ratings.exists() else sorted(folder.rglob("*.parquet"))
        else:
            files = [folder] if folder.suffix == ".parquet" and folder.exists() else []
        if not files:
            return False
        frame = pl.read_parquet(files[0])
        with warnings.catch_warnings():  # MLflow 3.17 registers its local source class twice
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = mlflow.data.from_polars(frame, source=str(files[0]), name=name)
        entry = DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
        )
        tracker.client.log_inputs(run_id, datasets=[entry])
    except Exception as exc:  # noqa: BLE001 - provenance must never fail a run
        log.warning("data set not logged as an MLflow input of %s: %s", run_id, exc)
        return False
    return True
