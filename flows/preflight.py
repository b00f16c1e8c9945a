"""Checks a command-line run makes before any work, before even the temporary Prefect API
starts: the models resolve, the runs folder is writable, the MLflow store is writable or
reachable. Each failure is one :class:`PreflightError` line naming the parameter or setting.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HTTP_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """A run that would fail: what is wrong, naming the parameter or setting."""


def preflight(p: Any, *, encoder: str | None = None) -> None:
    """Check ``p`` (a resolved :class:`flows.common.RunParams`) can run here.

    Resolves the policy model (and ``encoder``), checks that ``runs_dir`` can be written and
    that the MLflow tracking store (:func:`flows.tracking.tracking_uri`) can be written or, over
    HTTP, answers within :data:`HTTP_TIMEOUT_S` seconds.
    """
    from flows.tracking import tracking_uri
    from tasks.data.assets import encoder_model, policy_model

    policy_model(p.policy_model)  # AssetError: one line naming the model
    if encoder:
        encoder_model(encoder)
    check_writable(Path(p.runs_dir), "--runs-dir")
    check_tracking_store(tracking_uri())


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


def check_tracking_store(uri: str) -> None:
    """Raise :class:`PreflightError` unless the MLflow store at ``uri`` can be used: a SQLite
    file or a local folder that can be written, or an HTTP server that answers ``/health``."""
    parsed = urllib.parse.urlparse(uri)
    where = f"MLFLOW_TRACKING_URI={uri}" if os.environ.get("MLFLOW_TRACKING_URI") else uri
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:
                if reply.status >= 400:
                    raise PreflightError(f"{where}: the tracking server answered {reply.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PreflightError(
                f"{where}: the tracking server does not answer ({reason}); start it or unset "
                "MLFLOW_TRACKING_URI to track into the project's mlflow.db"
            ) from None
        return
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return
        check_writable(db.parent, where + " (its folder)")
        if db.exists() and not os.access(db, os.W_OK):
            raise PreflightError(f"{where}: the database file {db} is not writable")
        return
    if parsed.scheme in ("", "file"):
        check_writable(Path(parsed.path or uri), where)
