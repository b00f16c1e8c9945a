"""What the Prefect UI shows of a run: the form's field descriptions (with each profile's value),
the progress lines a user follows in the run log, and the report as a markdown artefact.

Prefect renders a description as markdown with HTML stripped, so a description never holds
angle brackets; a field the profile fills is ``None`` in the form, so its description says what
each profile puts there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("flows.progress")

_PROFILE_NOTE = re.compile(r"\s*\(profile\)")


def profile_values(profiles: Mapping[str, Mapping[str, Any]], name: str) -> str:
    """``profile: quick 2, study 2, paper 3`` for a field some profile fills, else ``""``."""
    parts = [
        f"{profile} {_show(values[name])}" for profile, values in profiles.items() if name in values
    ]
    return f"profile: {', '.join(parts)}" if parts else ""


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def limits_text(metadata: list[Any]) -> str:
    """``at least 1``, ``above 0, at most 1``: a field's numeric limits in words (for an
    optional field the form's own message is only "not valid under any of the given
    schemas")."""
    words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    parts = [
        f"{phrase} {getattr(item, key)}"
        for item in metadata
        for key, phrase in words.items()
        if getattr(item, key, None) is not None
    ]
    return ", ".join(parts)


def form_description(model: Any, name: str) -> str:
    """A field's description for the form and ``--help``: no angle brackets (``<=`` becomes
    ``≤``), the value each profile gives a field left unset (``(profile)`` in the source text
    becomes that list) and the field's numeric limits."""
    field = model.model_fields[name]
    text = (field.description or name).strip().replace("<=", "≤").replace(">=", "≥")
    text = text.replace("<", "").replace(">", "")
    if name == "run_name":
        dataset = model.model_fields["dataset"].default if "dataset" in model.model_fields else ""
        example = f"{getattr(model, 'RUN_PREFIX', '')}quick-{dataset}".rstrip("-")
        text = text.replace("unset = the profile and the data set", f"unset = e.g. {example}")
    values = profile_values(getattr(model, "PROFILES", {}) or {}, name)
    if values and _PROFILE_NOTE.search(text):
        text = _PROFILE_NOTE.sub(f" ({values})", text, count=1)
    elif values:
        text = f"{text} ({values}; unset = the profile's)"
    limits = limits_text(field.metadata)
    return f"{text}; {limits}" if limits else text


# --------------------------------------------------------------------------- run log


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The logger of the flow run a user opens: the root flow run (the one a deployment or
    the command line started; the pipelines run as its subflow), else the current run's, else
    a plain one outside Prefect."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        current = get_run_logger()
    except MissingContextError:
        return log
    try:
        from prefect.runtime import flow_run

        root_id, run_id = flow_run.root_flow_run_id, flow_run.id
        if root_id and run_id and str(root_id) != str(run_id):
            return _root_logger(str(root_id))
    except Exception:  # noqa: BLE001 - progress lines never fail a run
        pass
    return current


@functools.lru_cache(maxsize=8)
def _root_logger(root_id: str) -> logging.LoggerAdapter:
    from prefect.client.orchestration import get_client
    from prefect.logging.loggers import flow_run_logger

    with get_client(sync_client=True) as client:
        root = client.read_flow_run(root_id)
    return flow_run_logger(flow_run=root)


def progress(message: str, *args: Any) -> None:
    """One quiet progress line in the log of the run a user follows (``round 1/2: 100 users
    sampled, ...``)."""
    run_logger().info(message, *args)


PROJECT_LOGGERS = ("tasks", "flows", "models")


class _WarningsToRunLog(logging.Handler):
    """Sends the project's warnings to the run log a user follows (:func:`run_logger`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._inside = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name or getattr(self._inside, "active", False):
            return  # a progress line, or this handler's own line outside Prefect
        self._inside.active = True
        try:
            run_logger().log(record.levelno, "%s", record.getMessage())
        except Exception:  # noqa: BLE001 - the line is on stdout whatever happens here
            pass
        finally:
            self._inside.active = False


@contextlib.contextmanager
def warnings_in_run_log() -> Iterator[None]:
    """While open, the warnings of the project's loggers (``tasks.*``, ``flows.*``,
    ``models.*``: no preference pairs, samples with no reward list, ...) reach the Prefect flow
    run's log too, not only the worker's stdout."""
    handler = _WarningsToRunLog()
    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def run_day() -> str:
    """The current flow run's scheduled day (UTC, ``YYYY-MM-DD``); today outside a flow run."""
    from datetime import UTC, datetime

    when = None
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            when = flow_run.scheduled_start_time
    except Exception:  # noqa: BLE001 - the day falls back to today
        when = None
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d")


# --------------------------------------------------------------------------- artefacts


def flow_run_info() -> dict[str, str]:
    """The current Prefect flow run's id and UI address (empty outside a flow run)."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if not run_id:
            return {}
        # prefect.utilities.urls.url_for gives the UI's own address (/runs/flow-run/<id>, as in the
        # run log's "View at"); prefect.runtime's ui_url points at /flow-runs/..., a 404.
        from prefect.utilities.urls import url_for

        return {"id": str(run_id), "url": str(url_for("flow-run", obj_id=run_id) or "")}
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        return {}


def publish_report(
    report: str | Path, *, key: str, mlflow_url: str | None = None, mlflow_run_id: str = ""
) -> str | None:
    """The report (``report.md``) as a Prefect markdown artefact with a link to the MLflow run;
    its id, or None outside a flow run or when the server refuses it."""
    if not flow_run_info():
        return None
    text = figures_embedded(Path(report).read_text(), Path(report).parent)
    link = ""
    if mlflow_url:
        link = f"MLflow run: [{mlflow_run_id or mlflow_url}]({mlflow_url})\n\n"
    elif mlflow_run_id:
        link = f"MLflow run id: `{mlflow_run_id}`\n\n"
    try:
        from prefect.artifacts import create_markdown_artifact

        artefact = create_markdown_artifact(
            markdown=link + text, key=artifact_key(key), description=f"{key}: report.md"
        )
    except Exception as exc:  # noqa: BLE001 - the report is on disk whatever happens here
        log.warning("the report was not published as a Prefect artefact: %s", exc)
        return None
    return str(artefact)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


EMBED_MAX_BYTES = 1_500_000
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def figures_embedded(markdown: str, folder: Path) -> str:
    """The report's figures, files beside it that a Prefect artefact cannot reach, embedded in
    the markdown as data URIs so the artefact shows them; a figure that is missing, of another
    type or over :data:`EMBED_MAX_BYTES` becomes a note naming its file
    (:func:`figures_as_notes`)."""
    import base64

    def embed(match: re.Match[str]) -> str:
        caption, name = match.group(1), match.group(2)
        path = folder / name
        mime = _MIME.get(path.suffix.lower())
        if mime and path.is_file() and path.stat().st_size <= EMBED_MAX_BYTES:
            data = base64.b64encode(path.read_bytes()).decode()
            return f"![{caption}](data:{mime};base64,{data})"
        return figures_as_notes(match.group(0))

    return _IMAGE.sub(embed, markdown)


def figures_as_notes(markdown: str) -> str:
    """The report's figures are files beside it, which a Prefect artefact cannot show: each
    ``![caption](file.png)`` becomes a line naming the file and where it is."""
    return _IMAGE.sub(
        lambda m: (
            f"*Figure ({m.group(1)}): `{m.group(2)}` in the run folder and among the MLflow "
            "run's artifacts.*"
        ),
        markdown,
    )


def artifact_key(name: str) -> str:
    """Prefect artefact keys allow lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return key or "report"
