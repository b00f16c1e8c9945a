"""The Prefect form of both flows: the parameter schema carries every limit of the pydantic
model, so Prefect refuses before a run is created what the command line refuses, and its
descriptions show what each profile fills in."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate

from flows.direct import direct_flow
from flows.direct_params import DirectParams
from flows.iterate import IterateParams, iterate
from flows.prefect_ui import artifact_key, form_description, profile_values

FLOWS = [pytest.param(iterate, id="iterate"), pytest.param(direct_flow, id="direct")]


def _schema(flow) -> dict:
    return parameter_schema(flow.fn).model_dump()


def _branches(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


def _limit(prop: dict, key: str):
    return next((b[key] for b in _branches(prop) if key in b), None)


@pytest.mark.parametrize("flow", FLOWS)
def test_the_schema_carries_the_limits(flow) -> None:
    props = _schema(flow)["properties"]
    assert _limit(props["top_p"], "exclusiveMinimum") == 0
    assert _limit(props["top_p"], "maximum") == 1
    assert _limit(props["run_name"], "pattern") == r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    profiles = (
        ["quick", "study", "loop-check", "paper"]
        if flow is iterate
        else ["quick", "study", "paper"]
    )
    assert _limit(props["profile"], "enum") == profiles
    assert _limit(props["backend"], "enum") == ["auto", "vllm", "transformers"]
    if flow is iterate:
        assert _limit(props["rounds"], "minimum") == 0
        assert _limit(props["max_users"], "minimum") == 0
        assert _limit(props["n_samples"], "minimum") == 2
    else:
        assert _limit(props["max_eval_users"], "minimum") == 0
        assert _limit(props["min_ground_truth"], "maximum") == 5
        assert _limit(props["format_bonus"], "maximum") == 0.005


@pytest.mark.parametrize(
    ("flow", "bad"),
    [
        pytest.param(iterate, {"rounds": -1}, id="iterate-rounds-negative"),
        pytest.param(iterate, {"max_users": -5}, id="iterate-max-users-negative"),
        pytest.param(iterate, {"run_name": "my run #1"}, id="iterate-run-name-space"),
        pytest.param(iterate, {"profile": "huge"}, id="iterate-profile-unknown"),
        pytest.param(direct_flow, {"max_eval_users": -5}, id="direct-max-eval-users-negative"),
        pytest.param(direct_flow, {"run_name": "my run #1"}, id="direct-run-name-space"),
        pytest.param(direct_flow, {"top_p": 1.5}, id="direct-top-p"),
    ],
)
def test_prefect_refuses_what_the_cli_refuses(flow, bad) -> None:
    schema = _schema(flow)
    assert validate({}, schema) == []  # the defaults pass
    assert validate({"rounds": 3} if flow is iterate else {"max_eval_users": 4}, schema) == []
    errors = validate(bad, schema)
    assert errors, f"{bad} passed Prefect's validation"
    (name,) = bad
    assert any(name in list(e.path) or name in e.message for e in errors)


@pytest.mark.parametrize("flow", FLOWS)
def test_descriptions_render_in_the_ui(flow) -> None:
    props = _schema(flow)["properties"]
    for name, prop in props.items():
        description = prop.get("description", "")
        assert "<" not in description and ">" not in description, name
    assert "unset = e.g. " in props["run_name"]["description"]
    assert "profile: quick" in props["max_new_tokens"]["description"]


def test_descriptions_name_each_profiles_value() -> None:
    rounds = "profile: quick 2, study 2, loop-check 3, paper 3"
    assert profile_values(IterateParams.PROFILES, "rounds") == rounds
    assert rounds in form_description(IterateParams, "rounds")
    assert "(profile)" not in form_description(IterateParams, "rounds")
    eval_each = form_description(IterateParams, "eval_each_round")
    assert "quick no, study no, loop-check no, paper yes" in eval_each
    assert "quick 0, study 0, paper 0,1,2" in form_description(DirectParams, "seeds")
    assert "direct-quick-ml-100k" in form_description(DirectParams, "run_name")
    assert profile_values(IterateParams.PROFILES, "seed") == ""
    # the limits in words: for an optional field the form only says "not valid under any of
    # the given schemas"
    assert form_description(IterateParams, "n_samples").endswith("; at least 2")
    assert form_description(IterateParams, "top_p").endswith("; above 0, at most 1")
    assert "(≤ 0.005)" in form_description(DirectParams, "format_bonus")
    assert "no spaces" in form_description(IterateParams, "run_name")


def test_an_unset_optional_boolean_stays_unset() -> None:
    props = _schema(iterate)["properties"]
    assert props["eval_each_round"]["default"] is None
    assert {"type": "null"} in props["eval_each_round"]["anyOf"]
    paper = IterateParams(profile="paper", eval_each_round=None).resolved()
    assert paper.eval_each_round is True  # the profile's value, not False
    assert IterateParams(profile="paper", eval_each_round=False).resolved().eval_each_round is False


def test_artifact_keys_are_what_prefect_allows() -> None:
    assert artifact_key("rlrf4rec quick_ml-100k") == "rlrf4rec-quick-ml-100k"


def test_the_artefact_names_the_figures_it_cannot_show() -> None:
    from flows.prefect_ui import figures_as_notes

    text = figures_as_notes("a\n![per-round curve](fig4_rounds.png)\nb")
    assert "![" not in text and "`fig4_rounds.png` in the run folder" in text


def test_a_dated_run_is_named_by_its_scheduled_day(monkeypatch) -> None:
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    monkeypatch.setitem(flow_run.FIELDS, "id", lambda: "a-flow-run")
    monkeypatch.setitem(
        flow_run.FIELDS, "scheduled_start_time", lambda: datetime(2026, 12, 6, 2, tzinfo=UTC)
    )
    weekly = IterateParams(profile="paper", dated=True).resolved()
    assert weekly.run_name == "paper-ml-100k-2026-12-06"
    assert weekly.resolved().run_name == weekly.run_name  # resolving twice adds no second day
    named = DirectParams(profile="paper", dated=True, run_name="weekly").resolved()
    assert named.run_name == "weekly-2026-12-06"
    assert IterateParams(profile="paper").resolved().run_name == "paper-ml-100k"
    monkeypatch.setitem(
        flow_run.FIELDS, "scheduled_start_time", lambda: datetime(2026, 12, 13, 2, tzinfo=UTC)
    )
    second_week = IterateParams(profile="paper", dated=True).resolved()
    assert second_week.run_name == "paper-ml-100k-2026-12-13"  # a fresh run folder


def test_the_deployments_parameters_pass_the_form() -> None:
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).parents[2] / "deployments" / "prefect.yaml").read_text())
    flows = {"flows/iterate.py:iterate": iterate, "flows/direct.py:direct_flow": direct_flow}
    for deployment in spec["deployments"]:
        schema = _schema(flows[deployment["entrypoint"]])
        assert validate(deployment["parameters"], schema) == [], deployment["name"]
        if deployment.get("schedules"):  # a weekly run: dated, never a fixed name
            assert deployment["parameters"].get("dated") is True, deployment["name"]
            assert "run_name" not in deployment["parameters"], deployment["name"]


def test_flow_runs_are_named_after_their_run(monkeypatch) -> None:
    """The Prefect UI lists ``ui-tiny``, ``paper-ml-100k-2026-12-13``: not ``delta3-minnobia``."""
    from datetime import UTC, datetime

    from prefect.runtime import flow_run

    monkeypatch.setitem(flow_run.FIELDS, "id", lambda: "a-flow-run")
    monkeypatch.setitem(
        flow_run.FIELDS, "scheduled_start_time", lambda: datetime(2026, 12, 13, 2, tzinfo=UTC)
    )
    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: {"run_name": "ui-tiny"})
    assert iterate.flow_run_name() == "ui-tiny" and direct_flow.flow_run_name() == "ui-tiny"
    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: {"profile": "paper", "dated": True})
    assert iterate.flow_run_name() == "paper-ml-100k-2026-12-13"
    assert direct_flow.flow_run_name() == "direct-paper-ml-100k-2026-12-13"
    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: {"rounds": -1})  # never raises
    assert iterate.flow_run_name() == iterate.name


def test_the_projects_warnings_reach_the_run_log(monkeypatch) -> None:
    """Warnings of the project's loggers go to the flow run's log too, only while a run is on,
    and the run log's own lines are not sent twice."""
    import logging

    import flows.prefect_ui as ui

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    run_log = logging.getLogger("test.run-log")
    run_log.propagate = False
    run_log.addHandler(Collect())
    monkeypatch.setattr(ui, "run_logger", lambda: run_log)
    with ui.warnings_in_run_log():
        logging.getLogger("tasks.pairing").warning("round %d: no preference pairs", 1)
        logging.getLogger("tasks.pairing").info("an info line stays on stdout")
        logging.getLogger("flows.progress").warning("a progress line")
        logging.getLogger("transformers").warning("a library's warning stays on stdout")
    logging.getLogger("tasks.pairing").warning("after the run")
    assert seen == ["round 1: no preference pairs"]


def test_the_artefact_shows_the_figures(tmp_path) -> None:
    """The report's PNGs are embedded (a data URI the artefact can show); a missing one is a
    note naming its file."""
    import base64

    from flows.prefect_ui import figures_embedded

    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    (tmp_path / "fig4_rounds.png").write_bytes(png)
    text = figures_embedded("a\n![per-round curve](fig4_rounds.png)\n![x](gone.png)", tmp_path)
    assert "![per-round curve](data:image/png;base64,iVBORw0KGgo" in text
    assert "`gone.png` in the run folder" in text and "![x]" not in text
