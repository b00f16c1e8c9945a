"""A run that cannot work here fails in one line before any work: an unwritable runs folder or
run folder, one held by another run, an MLflow store that cannot be used, a model whose
config does not parse, a data set without its files."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from flows.preflight import (
    PreflightError,
    check_model_config,
    check_run_folder,
    check_tracking_store,
    check_writable,
)

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


# ----------------------------------------------------------- the run folder, the store, the model


def test_run_folder_that_is_a_file(tmp_path: Path) -> None:
    run = tmp_path / "quick-ml-100k"
    run.write_text("not a folder")
    with pytest.raises(PreflightError, match=r"run folder .*quick-ml-100k is a file, not a folder"):
        check_run_folder(run)
    check_run_folder(tmp_path / "new-run")  # one that does not exist passes, and is not made
    assert not (tmp_path / "new-run").exists()


def test_read_only_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only run folder (simulated: tests may run as root, where chmod does not bite)."""
    import errno
    import tempfile

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(PreflightError, match=r"run folder .*run: cannot write there \(Read-only"):
        check_run_folder(run)


def test_run_folder_held_by_another_run(tmp_path: Path) -> None:
    from tasks.common.runlock import run_lock

    run = tmp_path / "run"
    with run_lock(run), pytest.raises(PreflightError, match=r"is in use by another run \(pid"):
        check_run_folder(run)
    check_run_folder(run)  # released: passes


def test_unknown_tracking_scheme_fails_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(PreflightError, match="no tracking store of scheme 'bogus'"):
        check_tracking_store("bogus://x")
    assert time.perf_counter() - t0 < 1
    check_tracking_store("postgresql+psycopg2://u@127.0.0.1/db")  # a database MLflow opens


def test_http_server_that_is_not_mlflow() -> None:
    """A server that answers ``/health`` (as many do) but not MLflow's API: one line, fast."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def do_POST(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<html>not found</html>")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(PreflightError, match=r"not as an MLflow tracking server.*HTTP 404"):
            check_tracking_store(f"http://127.0.0.1:{server.server_address[1]}")
        assert time.perf_counter() - t0 < 10
    finally:
        server.shutdown()


def test_model_with_an_unparsable_config(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(PreflightError, match=r"--policy-model .*config.json cannot be read as"):
        check_model_config(str(model), "--policy-model")
    (model / "config.json").write_text('{"model_type": "llama"}')
    check_model_config(str(model), "--policy-model")
    check_model_config("HuggingFaceTB/SmolLM2-135M-Instruct", "--policy-model")  # a hub id


def test_cli_refuses_a_model_with_a_broken_config(
    monkeypatch, capsys, tmp_path: Path, broken_config_llm: Path
) -> None:
    """End to end on the tiny model: one line, exit 2, no run folder and no run.json (so no
    backend is recorded for a run folder that a fixed config would then keep using)."""
    from flows.iterate import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    code = main(
        ["--policy-model", str(broken_config_llm), "--runs-dir", str(runs), "--run-name", "bad"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "config.json cannot be read as JSON" in err
    assert not (runs / "bad").exists()


def test_cli_refuses_missing_data_files_before_any_work(
    monkeypatch, capsys, tmp_path: Path, tiny_llm_path
) -> None:
    from flows.iterate import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs, data = tmp_path / "runs", tmp_path / "ml-1m"
    data.mkdir()
    (data / "users.dat").write_text("1::M::25::4::00000\n")
    args = ["--dataset", "ml-1m", "--data-dir", str(data), "--runs-dir", str(runs)]
    code = main([*args, "--policy-model", tiny_llm_path, "--run-name", "nodata"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "movies.dat: file not found" in err and "resume" not in err
    assert not (runs / "nodata").exists()


def test_cli_finds_a_fault_in_the_data_before_prefect_starts(
    monkeypatch, capsys, tmp_path: Path, tiny_llm_path
) -> None:
    """A rating line that does not parse: one line naming the file and line, before the
    temporary Prefect API starts, no advice to resume, and no run folder left behind."""
    import flows.common
    from flows.iterate import main

    def no_prefect() -> None:
        raise AssertionError("Prefect started before the data were checked")

    monkeypatch.setattr(flows.common, "start_temporary_prefect_api", no_prefect)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs, data = tmp_path / "runs", tmp_path / "ml-1m"
    data.mkdir()
    (data / "users.dat").write_text("1::M::25::4::00000\n2::F::35::1::00000\n")
    (data / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n2::Heat (1995)::Crime\n")
    (data / "ratings.dat").write_text("1::1::5::978300760\n1::2::five::978300761\n")
    args = ["--dataset", "ml-1m", "--data-dir", str(data), "--runs-dir", str(runs)]
    code = main([*args, "--policy-model", tiny_llm_path, "--run-name", "baddata"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "ratings.dat:2:" in err, err
    assert "resume" not in err and "Traceback" not in err
    assert not (runs / "baddata").exists()


def test_unwritable_artefact_folder_of_an_existing_experiment(tmp_path: Path) -> None:
    """The experiment was created with artefacts in a folder that cannot be written (an old
    ``./mlruns``): one line before any work, not an ``OSError`` at the end of round 1."""
    import sqlite3

    from flows.preflight import check_artifact_location

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (name TEXT, artifact_location TEXT)")
        con.execute("INSERT INTO experiments VALUES ('old', ?)", (UNWRITABLE.as_uri(),))
    with pytest.raises(PreflightError, match=r"experiment 'old': its artefact folder .*cannot"):
        check_artifact_location(f"sqlite:///{db}", "old")
    check_artifact_location(f"sqlite:///{db}", "new")  # a new one goes beside the store
    assert (tmp_path / "mlartifacts" / "new").is_dir()
