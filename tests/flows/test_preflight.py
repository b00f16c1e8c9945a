"""A run that cannot work here fails in one line before any work: an unwritable runs folder,
an unwritable or unreachable MLflow store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from flows.preflight import PreflightError, check_tracking_store, check_writable

UNWRITABLE = Path("/proc/rlrf4rec-no-such-folder")  # not creatable, even by root


def test_unwritable_runs_folder_names_the_parameter() -> None:
    with pytest.raises(PreflightError, match=r"--runs-dir /proc/rlrf4rec-no-such-folder: cannot"):
        check_writable(UNWRITABLE, "--runs-dir")


def test_sqlite_store_in_an_unwritable_folder(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="its folder"):
        check_tracking_store(f"sqlite:///{UNWRITABLE / 'mlflow.db'}")
    check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a writable one passes
    assert not (tmp_path / "mlflow.db").exists()  # and nothing was created


def test_unreachable_http_store_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(PreflightError, match="does not answer"):
        check_tracking_store(f"http://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10


def test_cli_refuses_before_any_work(monkeypatch, capsys, tmp_path: Path, tiny_llm_path) -> None:
    from flows.iterate import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{UNWRITABLE / 'mlflow.db'}")
    runs = tmp_path / "runs"
    code = main(["--policy-model", tiny_llm_path, "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert not any(runs.iterdir())  # the write check left nothing behind
