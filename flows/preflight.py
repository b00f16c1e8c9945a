"""Checks a command-line run makes before any work, before even the temporary Prefect API
starts: the models resolve and their ``config.json`` parses, the runs folder is writable, the
run folder is a writable folder no other run holds, the MLflow store is writable or an MLflow
server answers, and the data set's files are there. Each failure is one
:class:`PreflightError` line naming the parameter or setting.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HTTP_TIMEOUT_S = 5.0
# Tracking stores MLflow opens: SQLAlchemy databases, a local folder, a server, Databricks.
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https")
STORE_SCHEMES_OTHER = ("databricks", "databricks-uc", "uc")


class PreflightError(RuntimeError):
    """A run that would fail: what is wrong, naming the parameter or setting."""


def preflight(p: Any, *, encoder: str | None = None) -> None:
    """Check ``p`` (a resolved :class:`flows.common.RunParams`) can run here.

    Resolves the policy model (and ``encoder``) and parses their ``config.json``; checks that
    ``runs_dir`` can be written, that the run folder is a folder that can be written and that
    no other run holds, that the MLflow tracking store (:func:`flows.tracking.tracking_uri`)
    can be written or, over HTTP, is an MLflow server answering within
    :data:`HTTP_TIMEOUT_S` seconds, and that the data set's files are in ``data_dir``.
    """
    from flows.tracking import tracking_uri
    from tasks.data.assets import encoder_model, policy_model

    check_model_config(policy_model(p.policy_model), "--policy-model")  # AssetError: one line
    if encoder:
        check_model_config(encoder_model(encoder), "--encoder")
    check_writable(Path(p.runs_dir), "--runs-dir")
    check_run_folder(p.run_dir())
    check_tracking_store(tracking_uri())
    check_artifact_location(tracking_uri(), p.experiment)
    if getattr(p, "dataset", None):
        check_data(p)


def check_model_config(model: str, what: str) -> None:
    """Raise :class:`PreflightError` when the model folder ``model`` holds a ``config.json``
    that is not a JSON object (a hub id or a folder without one is left to the loaders)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return
    try:
        parsed = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PreflightError(
            f"{what} {model}: {config.name} cannot be read as JSON ({exc}); fix or replace it"
        ) from None
    if not isinstance(parsed, dict):
        raise PreflightError(f"{what} {model}: {config.name} is not a JSON object")


def check_writable(folder: Path, what: str) -> None:
    """Raise :class:`PreflightError` unless a file can be created in ``folder`` (made if
    missing)."""
    folder = folder.expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise PreflightError(
            f"{what} {folder}: cannot write there ({exc.strerror or exc})"
        ) from None


def check_run_folder(run_dir: Path) -> None:
    """Raise :class:`PreflightError` when the run folder is a file, cannot be written (nor
    its ``.lock``), or is held by another run. A folder that does not exist yet is not made
    (its parent, the runs folder, is checked by :func:`check_writable`)."""
    what = f"run folder {run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise PreflightError(f"{what} is a file, not a folder; choose another --run-name")
    if not run_dir.exists():
        return
    check_writable(run_dir, "run folder")
    lock = run_dir / ".lock"
    try:
        fh = open(lock, "a+")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise PreflightError(
            f"{what}: cannot write its lock file {lock.name} ({exc.strerror or exc})"
        ) from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise PreflightError(f"{what}: cannot lock it ({exc.strerror or exc})") from None
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PreflightError(
                f"{what} is in use by another run (pid {holder}); wait for it to finish or "
                "choose another --run-name"
            ) from None
        fcntl.flock(fh, fcntl.LOCK_UN)


def check_artifact_location(uri: str, experiment: str) -> None:
    """Raise :class:`PreflightError` unless the experiment's artefact folder can be written
    (a SQLite store: the location the experiment has, read from the database without MLflow,
    else the one it will be created with, :func:`flows.tracking.artifact_location`)."""
    import sqlite3

    from flows.tracking import artifact_location

    if not uri.startswith("sqlite:///"):
        return
    location = artifact_location(uri, experiment)
    db = Path(uri[len("sqlite:///") :])
    if db.is_file():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                row = con.execute(
                    "SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)
                ).fetchone()
        except sqlite3.Error:
            row = None  # an empty or older database: MLflow creates or migrates it
        location = row[0] if row and row[0] else location
    parsed = urllib.parse.urlparse(location or "")
    if parsed.scheme in ("", "file") and parsed.path:
        where = f"MLflow experiment {experiment!r}: its artefact folder"
        check_writable(Path(urllib.parse.unquote(parsed.path)), where)


def check_data(p: Any) -> None:
    """Raise :class:`PreflightError` when the data set's files are not in ``p.data_dir``
    (:func:`tasks.data.datasets.check_data_files`); nothing is read."""
    from tasks.data.amazon_books import AmazonConfig
    from tasks.data.assets import AssetError
    from tasks.data.datasets import check_data_files
    from tasks.data.schema import DataError

    build = getattr(p, "amazon_build", None) or "kcore"
    amazon = AmazonConfig(build=build) if p.dataset == "amazon-books" else None
    try:
        check_data_files(p.dataset, p.data_dir, amazon)
    except (DataError, AssetError) as exc:
        raise PreflightError(f"--dataset {p.dataset}: {exc}") from None


def check_tracking_store(uri: str) -> None:
    """Raise :class:`PreflightError` unless the MLflow store at ``uri`` can be used: a SQLite
    file or a local folder that can be written, an HTTP server that answers ``/health`` and
    MLflow's API, or another store MLflow knows (a database, Databricks)."""
    parsed = urllib.parse.urlparse(uri)
    where = f"MLFLOW_TRACKING_URI={uri}" if os.environ.get("MLFLOW_TRACKING_URI") else uri
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2 is postgresql
    if scheme and scheme not in STORE_SCHEMES + STORE_SCHEMES_OTHER:
        raise PreflightError(
            f"{where}: MLflow has no tracking store of scheme {parsed.scheme!r}; use "
            "sqlite:///<file>, a folder, or http://<host>:<port> (unset it to track into the "
            "project's mlflow.db)"
        )
    if scheme in ("http", "https"):
        _check_tracking_server(uri, where)
        return
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return
        check_writable(db.parent, where + " (its folder)")
        if db.exists() and not os.access(db, os.W_OK):
            raise PreflightError(f"{where}: the database file {db} is not writable")
        return
    if scheme in ("", "file"):
        check_writable(Path(parsed.path or uri), where)


def _check_tracking_server(uri: str, where: str) -> None:
    """``/health`` answers, and so does MLflow's REST API (a search for one experiment)."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=HTTP_TIMEOUT_S) as reply:
            if reply.status >= 400:
                raise PreflightError(f"{where}: the tracking server answered {reply.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreflightError(
            f"{where}: the tracking server does not answer ({reason}); start it or unset "
            "MLFLOW_TRACKING_URI to track into the project's mlflow.db"
        ) from None
    request = urllib.request.Request(
        base + "/api/2.0/mlflow/experiments/search",
        data=json.dumps({"max_results": 1}).encode(),
        headers={"Content-Type": "application/json", **_auth_headers()},
        method="POST",
    )
    problem = None
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
            body = json.loads(reply.read() or b"{}")
            if not isinstance(body, dict):
                problem = "its answer is not a JSON object"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    if problem:
        raise PreflightError(
            f"{where}: answers /health but not as an MLflow tracking server (MLflow's "
            f"experiments/search: {problem}); check the address and port"
        )


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (``MLFLOW_TRACKING_TOKEN``, or the
    username and password)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}
