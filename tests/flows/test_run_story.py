"""What the Prefect and MLflow UIs show of a run: provenance tags, the data set as an input,
metric shapes (one key per stage, step = round; per-step training curves), the report as a
Prefect artefact, and stages that keep library prints out of the run log."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from flows.metric_shapes import log_training_curve, per_stage, step_history
from flows.provenance import git_commit, log_dataset, mlflow_run_url, tag_run
from flows.tracking import Tracker
from tasks.common.hardware import cpu_model
from tasks.common.stage import Artefact, stage


@pytest.fixture
def tracker(tmp_path: Path) -> Tracker:
    return Tracker("story", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_provenance_tags(tracker: Tracker, tmp_path: Path) -> None:
    run = tracker.start("p")
    params = SimpleNamespace(backend="transformers", profile="quick", dataset="ml-100k")
    tags = tag_run(tracker, run, params, tmp_path / "runs" / "p")
    got = tracker.client.get_run(run).data.tags
    commit, _ = git_commit()
    assert len(commit) == 40 and got["git.commit"] == commit
    assert got["mlflow.source.git.commit"] == commit
    assert got["host.cpu"] == cpu_model() and got["host.cpu_dtype"] in ("float32", "bfloat16")
    assert got["backend"] == "transformers" and got["run_dir"].endswith("runs/p")
    assert "prefect.flow_run_id" not in tags  # outside a flow run
    from flows.iterate import IterateParams

    tags = tag_run(tracker, run, IterateParams(), tmp_path)
    assert tags["mlflow.source.name"] == "flows.iterate"


def test_the_data_set_is_an_mlflow_input(tracker: Tracker, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "rating": [5, 1]}).write_parquet(
        folder / "ratings.parquet"
    )
    run = tracker.start("d")
    assert log_dataset(tracker, run, folder, name="ml-100k")
    inputs = tracker.client.get_run(run).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["ml-100k"]
    assert "ratings.parquet" in inputs[0].dataset.source
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == 2
    assert not log_dataset(tracker, run, tmp_path / "missing", name="x")


def test_mlflow_run_url(tracker: Tracker, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert mlflow_run_url(tracker, "abc") is None  # a local store has no address
    monkeypatch.setenv("MLFLOW_UI_URL", "http://127.0.0.1:5000/")
    url = mlflow_run_url(tracker, "abc")
    assert url == (  # the Model training view, not MLflow 3's GenAI view
        f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/abc"
        "?workflowType=machine_learning"
    )


def test_source_and_description(tracker: Tracker, tmp_path: Path, monkeypatch) -> None:
    """``python -m flows.iterate`` runs the module as ``__main__``: the source still names it;
    the description says what ran and links the Prefect flow run."""
    import sys

    from flows.direct_params import DirectParams
    from flows.provenance import flow_module, run_description

    main_module = SimpleNamespace(__spec__=SimpleNamespace(name="flows.iterate"))
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    as_main = type("IterateParams", (), {"__module__": "__main__"})()
    assert flow_module(as_main) == "flows.iterate"
    assert flow_module(DirectParams()) == "flows.direct"
    text = run_description(DirectParams(run_name="d1"), tmp_path / "d1", "http://prefect/run/1")
    assert "`d1`: `python -m flows.direct`" in text
    assert "[http://prefect/run/1](http://prefect/run/1)" in text
    run = tracker.start("p")
    tag_run(tracker, run, DirectParams(run_name="d1"), tmp_path / "d1")
    assert "python -m flows.direct" in tracker.client.get_run(run).data.tags["mlflow.note.content"]


def test_artefacts_land_beside_the_store(tmp_path: Path, monkeypatch) -> None:
    """Not in ``./mlruns`` of whatever folder the command runs from."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    store.mkdir()
    tracker = Tracker("art", f"sqlite:///{store / 'mlflow.db'}")
    run = tracker.start("r")
    (tmp_path / "report.md").write_text("# report\n")
    tracker.artifact(run, tmp_path / "report.md")
    assert list((store / "mlartifacts" / "art").rglob("report.md"))
    assert not (elsewhere / "mlruns").exists()


def test_changed_parameters_start_a_new_parent(tracker: Tracker, tmp_path: Path) -> None:
    """MLflow keeps a parameter's first value: a start with another temperature gets a new
    parent run (linked both ways); the same parameters again reuse it."""
    from flows.common import _parent_run
    from flows.direct_params import DirectParams
    from flows.run_record import RunRecord

    record, run_dir = RunRecord.load(tmp_path / "r"), tmp_path / "r"
    record.starts = 1
    first = DirectParams(run_name="r").resolved()
    a = _parent_run(tracker, record, first, run_dir)
    got = tracker.client.get_run(a).data
    assert got.params["temperature"] == "1.0" and got.tags["starts"] == "1"
    record.starts = 2
    b = _parent_run(tracker, record, first.model_copy(update={"temperature": 0.7}), run_dir)
    assert b != a and record.mlflow["parent_run_id"] == b
    got = tracker.client.get_run(b).data
    assert got.params["temperature"] == "0.7"
    assert got.tags["previous_parent_run_id"] == a and got.tags["params.changed"] == "temperature"
    assert tracker.client.get_run(a).data.tags["superseded_by"] == b
    record.starts = 3
    again = _parent_run(tracker, record, first.model_copy(update={"temperature": 0.7}), run_dir)
    assert again == b and tracker.client.get_run(b).data.tags["starts"] == "3"


def test_stage_seconds_are_one_key_per_stage() -> None:
    seconds = {"round_01.sample": 1.0, "round_01.dpo": 2.0, "round_01.knowledge.encode": 3.0}
    assert per_stage(seconds, "round_01") == {"sample": 1.0, "dpo": 2.0, "knowledge.encode": 3.0}


def test_training_curve_per_optimiser_step(tracker: Tracker, tmp_path: Path) -> None:
    history = [
        {"loss": 0.69, "rewards/margins": 0.0, "epoch": 0.5, "step": 1},
        {"loss": 0.60, "rewards/margins": 0.1, "epoch": 1.0, "step": 2},
        {"train_runtime": 3.0, "train_loss": 0.65, "step": 2},
    ]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"metrics": {}, "log_history": history}))
    assert len(step_history(metrics)) == 2
    run = tracker.start("round_01")
    artefact = Artefact(str(tmp_path / "adapter"), extra=(str(metrics),))
    assert log_training_curve(tracker, run, artefact, "dpo") == 2
    loss = tracker.client.get_metric_history(run, "dpo_step.loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(1, 0.69), (2, 0.6)]
    assert "dpo_step.epoch" not in tracker.client.get_run(run).data.metrics
    assert log_training_curve(tracker, run, Artefact(str(tmp_path)), "dpo") == 0


def test_metric_series_keep_their_step(tracker: Tracker) -> None:
    run = tracker.start("s")
    for r in (1, 2):
        tracker.metrics(run, {"seconds": {"dpo": float(r)}}, step=r)
    steps = sorted(m.step for m in tracker.client.get_metric_history(run, "seconds.dpo"))
    assert steps == [1, 2]


@stage("capture")
def _captures_its_own_stdout(*, out: Path) -> Artefact:
    """What dill does while ``datasets`` fingerprints a function: print into a swapped stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print("Disassembly of <code object>")
    Path(out).write_text(buffer.getvalue())
    return Artefact(str(out))


def test_stages_keep_prints_out_of_the_run_log(prefect_harness, tmp_path: Path) -> None:
    from prefect import flow

    @flow(log_prints=True)
    def noisy(out: Path) -> str:
        return _captures_its_own_stdout(out=out).path

    assert _captures_its_own_stdout.log_prints is False
    path = noisy(tmp_path / "captured.txt")
    # Under Prefect's patched print the text went to the run log and the buffer stayed empty.
    assert Path(path).read_text() == "Disassembly of <code object>\n"


def test_the_report_is_a_prefect_artefact(prefect_harness, tmp_path: Path) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.prefect_ui import flow_run_info, progress, publish_report

    report = tmp_path / "report.md"
    report.write_text(
        "# RLRF4Rec run report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![curve](fig.png)\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2], [0.5, 0.6, 0.55])
    fig.savefig(tmp_path / "fig.png")
    plt.close(fig)

    @flow
    def publishing() -> dict:
        progress("round %d/%d: %s pairs kept", 1, 2, 40)
        key = publish_report(
            report, key="rlrf4rec quick", mlflow_url="http://mlflow/#/r/1", mlflow_run_id="1"
        )
        return {"artefact": key, **flow_run_info()}

    result = publishing()
    assert result["artefact"] and result["id"]
    assert "/flow-runs/" not in result.get("url", "")  # the UI's address is /runs/flow-run/
    assert publish_report(report, key="outside") is None  # outside a flow run: nothing
    found = Artifact.get("rlrf4rec-quick")
    assert found is not None and found.type == "markdown"
    assert "MLflow run: [1](http://mlflow/#/r/1)" in found.data
    assert "| 1 | 2 |" in found.data
    assert "![curve](data:image/png;base64," in found.data  # the figure travels with it
    assert str(found.flow_run_id) == result["id"]


def test_progress_lines_go_to_the_run_a_user_opens(prefect_harness) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.runtime import flow_run

    from flows.prefect_ui import progress

    @flow
    def pipeline() -> str:
        progress("round %d/%d: %s pairs kept", 1, 2, 40)
        return str(flow_run.id)

    @flow
    def started_by_a_deployment() -> tuple[str, str]:
        return str(flow_run.id), pipeline()

    root, sub = started_by_a_deployment()
    APILogWorker.drain_all()

    def messages(run_id: str) -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return [entry.message for entry in logs]

    assert "round 1/2: 40 pairs kept" in messages(root)
    assert "round 1/2: 40 pairs kept" not in messages(sub)
