"""What every flow shares: the parameters every run has, the Prefect form built from a pydantic
model, one lock-and-track wrapper around a pipeline, the task-runner choice and the command line
that runs a flow (its parser: :mod:`flows.cli`; MLflow: :mod:`flows.tracking`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.cli import parse_params
from flows.prefect_runs import (
    cancel_flow_runs,
    mark_crashed,
    start_temporary_prefect_api,
    stop_temporary_prefect_api,
)
from flows.prefect_ui import warnings_in_run_log
from flows.preflight import PreflightError, preflight
from flows.run_record import RunRecord, SettingChangedError
from flows.tracking import Tracker, changed_params, tracker_for
from tasks.common import stopping
from tasks.common.io import remove_stale_temporaries
from tasks.common.runlock import RunLockedError, run_lock
from tasks.common.stage import InputRef
from tasks.data.parted_assets import POLICY_HELP

log = logging.getLogger(__name__)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- task runner


def make_task_runner(kind: Literal["threads", "ray"], max_workers: int | None = None):
    """Threads by default; Ray (``prefect-ray``) for a cluster or several GPUs."""
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RuntimeError(
                "task_runner='ray' needs prefect-ray: pip install -e '.[ray]'"
            ) from exc
        address = os.environ.get("RAY_ADDRESS")
        init_kwargs = {"num_cpus": max_workers} if (max_workers and not address) else {}
        return RayTaskRunner(address=address, init_kwargs=init_kwargs or None)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------- flat flow signature


def flat_signature(model: type[BaseModel]) -> inspect.Signature:
    """A keyword-only signature with one parameter per field of ``model``.

    Given to a flow function, it makes Prefect show the model's fields as a flat form (with
    their descriptions) and accept ``prefect deployment run ... -p rounds=3``, while the model
    stays the single definition of the parameters.
    """
    from flows.prefect_ui import form_description

    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=field.default,
            # Every constraint (ge, gt, le, pattern, ...) travels with the field, so Prefect's
            # parameter schema refuses what the model refuses, before a run is created.
            annotation=Annotated[
                (
                    field.annotation,
                    *field.metadata,
                    Field(description=form_description(model, name)),
                )
            ],
        )
        for name, field in model.model_fields.items()
    ]
    return inspect.Signature(params, return_annotation=dict)


def flat_docstring(model: type[BaseModel], summary: str) -> str:
    """A Google-style docstring whose ``Args:`` are the model's field descriptions.

    Prefect reads parameter descriptions for its UI form from the flow function's docstring.
    """
    from flows.prefect_ui import form_description

    lines = [summary.strip(), "", "Args:"]
    for name in model.model_fields:
        lines.append(f"    {name}: {form_description(model, name)}")
    return "\n".join(lines) + "\n"


RESUME_NOTE = (
    " Unset parameters take the profile's values; the same run name and parameters resume a "
    "run from its last finished stage; what changed is recomputed with everything downstream "
    "of it."
)


def params_flow(model: type[BaseModel], run: Any, name: str, summary: str, **flow_kwargs: Any):
    """A Prefect flow whose parameters are the fields of ``model``, flat.

    The flow calls ``run(model(**kwargs))``; its signature and docstring come from the model
    (:func:`flat_signature`, :func:`flat_docstring`), so the Prefect form lists every field with
    its description and ``prefect deployment run ... -p rounds=3`` works.
    """
    from prefect import flow

    def fn(**kwargs: Any) -> dict:
        return run(model(**kwargs))

    fn.__name__ = fn.__qualname__ = name.replace("-", "_")
    fn.__signature__ = flat_signature(model)  # type: ignore[attr-defined]
    fn.__doc__ = flat_docstring(model, summary)
    flow_kwargs.setdefault("flow_run_name", _flow_run_namer(model, name))
    return flow(name=name, **flow_kwargs)(fn)


def flow_run_name_of(model: type[RunParams], parameters: Mapping[str, Any]) -> str:
    """The name of a flow run with ``parameters``: the run name they resolve to (``ui-tiny``,
    ``paper-ml-100k-2026-12-13`` for a dated schedule), so the Prefect UI lists runs by the
    run folder they write."""
    return str(model(**parameters).resolved().run_name)


def _flow_run_namer(model: type[RunParams], fallback: str) -> Callable[[], str]:
    """Prefect's ``flow_run_name``: :func:`flow_run_name_of` the flow run's parameters (the
    flow's name where they do not resolve: a name never fails a run)."""

    def flow_run_name() -> str:
        try:
            from prefect.runtime import flow_run

            return flow_run_name_of(model, flow_run.parameters)
        except Exception:  # noqa: BLE001
            return fallback

    return flow_run_name


# --------------------------------------------------------------------------- shared parameters


class RunParams(BaseModel):
    """The parameters every flow has; a flow's model adds its own and its ``PROFILES``.

    Subclasses set ``PROFILES`` (values for every field left unset, per profile),
    ``RUN_PREFIX`` (the default run name is ``<prefix><profile>-<dataset>``) and, when the
    model lives outside its flow's module, ``FLOW_MODULE`` (MLflow's source, e.g.
    ``flows.direct``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}
    RUN_PREFIX: ClassVar[str] = ""
    FLOW_MODULE: ClassVar[str] = ""

    profile: Literal["quick", "study", "paper"] = Field(
        "quick",
        description="quick: CPU, a subset of users, minutes; study: every user at CPU "
        "settings, the experiment a 2-core CPU runs in a session (about 2 hours for "
        "flows.iterate, 90 minutes for flows.direct); paper: all users, the paper's settings. "
        "Fills every parameter left unset.",
    )
    run_name: str | None = Field(
        None,
        description="run folder under runs_dir: letters, digits, '.', '_' and '-', no spaces; "
        "unset = the profile and the data set; the same name with the same parameters resumes",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    dated: bool = Field(
        False,
        description="append the flow run's scheduled day (UTC, YYYY-MM-DD) to the run name, "
        "e.g. paper-ml-100k-2026-12-06: a weekly deployment writes a fresh run folder (and "
        "MLflow run) each week; give that full name as run_name to resume one week's run",
    )
    runs_dir: str = Field("runs", description="folder holding the run folders")
    data_dir: str | None = Field(
        None, description="folder with the data set's files (optional for ml-100k)"
    )
    policy_model: str = Field("SmolLM2-135M-Instruct", description=POLICY_HELP)
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="generation backend; auto = chosen once per run folder: vLLM where its "
        "engine starts, else transformers; a resume keeps it",
    )
    task_runner: Literal["threads", "ray"] = Field(
        "threads", description="threads, or Ray (prefect-ray) with one GPU per sampling shard"
    )
    experiment: str = Field("rlrf4rec", description="MLflow experiment name")
    allow_setting_change: bool = Field(
        False,
        description="resume a run folder although its recorded generation backend or CPU dtype "
        "would change (what depends on them is recomputed); off: such a resume is refused",
    )

    @field_validator("policy_model", "data_dir")
    @classmethod
    def _existing_path(cls, v: str | None) -> str | None:
        return existing_path(v)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        if cls.PROFILES and v not in cls.PROFILES:
            raise ValueError(f"this flow has the profiles {', '.join(cls.PROFILES)}, not {v!r}")
        return v

    def resolved(self) -> typing.Self:
        """A copy with every unset parameter filled from the profile, and a run name."""
        fill = {k: v for k, v in self.PROFILES[self.profile].items() if getattr(self, k) is None}
        out = self.model_copy(update=fill)
        if out.run_name is None:
            out = out.model_copy(update={"run_name": self.default_run_name()})
        if self.dated:
            from flows.prefect_ui import run_day

            day = run_day()
            if not out.run_name.endswith(f"-{day}"):
                out = out.model_copy(update={"run_name": f"{out.run_name}-{day}"})
        return out

    def default_run_name(self) -> str:
        return f"{self.RUN_PREFIX}{self.profile}-{getattr(self, 'dataset', 'data')}"

    def run_dir(self) -> Path:
        base = Path(self.runs_dir)
        if not base.is_absolute():
            base = Path.cwd() / base
        return (base / (self.run_name or self.default_run_name())).resolve()


def existing_path(v: str | None) -> str | None:
    """``v`` unchanged, unless it looks like a local path that does not exist (then an error
    naming it)."""
    if v is None:
        return v
    looks_like_path = v.startswith(("/", "./", "../", "~")) or os.sep * 2 in v
    if looks_like_path and not Path(v).expanduser().exists():
        raise ValueError(f"path {v!r} does not exist")
    return v


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares, fixed when the run starts.

    Attributes:
        run_dir: the run folder (locked for the run's duration).
        policy: the base policy LLM (resolved from the offline assets or a local folder).
        experiment, parent_run_id: the MLflow experiment and this flow run's parent run.
        gpus: visible GPUs; ``n_shards`` sampling shards (one engine each).
        encoder: the knowledge encoder, for the flows that encode texts.
        settings: the run folder's recorded settings (``backend``, ``cpu_dtype``), each with
            its value and the reason it was chosen (:meth:`RunRecord.summary`).
    """

    run_dir: Path
    policy: InputRef
    experiment: str
    parent_run_id: str
    gpus: tuple[int, ...] = ()
    n_shards: int = 1
    encoder: InputRef | None = None
    settings: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def tracker(self) -> Tracker:
        return tracker_for(self.experiment)


def run_tracked(
    p: RunParams,
    pipeline: Any,
    *,
    encoder: str | None = None,
    n_shards: int = 0,
) -> dict:
    """Resolve the models, lock the run folder, keep its recorded settings and MLflow parent
    run, arm the stop handler and run ``pipeline(p, ctx)`` (a Prefect flow) with the chosen
    task runner.

    A missing model fails before any work. The generation backend is chosen once per run folder
    (:func:`tasks.llm.backend.choose_backend`) and the CPU dtype recorded with it
    (:class:`flows.run_record.RunRecord`). One run folder is one MLflow parent run: a resume
    reopens it. A failure ends the parent and its open children FAILED, a stop (SIGINT,
    SIGTERM, :mod:`tasks.common.stopping`) KILLED.
    """
    from flows.provenance import tag_run
    from tasks.common.hardware import cpu_dtype
    from tasks.data.assets import encoder_model, policy_model
    from tasks.llm.devices import available_gpus

    policy = InputRef.of(policy_model(p.policy_model))
    enc = InputRef.of(encoder_model(encoder)) if encoder else None
    dtype = cpu_dtype()
    log.info("CPU dtype: %s", dtype.reason)
    run_dir = p.run_dir()
    gpus = tuple(available_gpus())
    with run_lock(run_dir), run_temporaries(run_dir):
        record = RunRecord.load(run_dir)
        record.starts += 1
        p = p.model_copy(update={"backend": _keep_backend(p, record, policy.path)})
        record.keep(
            "cpu_dtype",
            dtype.name,
            dtype.reason,
            allow_change=p.allow_setting_change,
            hint=f"resume it on a CPU like the first one, or set RLRF4REC_CPU_DTYPE="
            f"{record.settings.get('cpu_dtype')}",
        )
        tracker = tracker_for(p.experiment)
        parent = _parent_run(tracker, record, p, run_dir)
        tag_run(tracker, parent, p, run_dir)  # git commit, CPU, dtype, backend, Prefect run
        record.prefect = _prefect_run_of_this_start(record.prefect)
        record.save(run_dir)
        log.info("run settings: %s", ", ".join(f"{k}={v}" for k, v in record.settings.items()))
        ctx = RunContext(
            run_dir=run_dir,
            policy=policy,
            experiment=p.experiment,
            parent_run_id=parent,
            gpus=gpus,
            n_shards=n_shards or max(1, len(gpus)),
            encoder=enc,
            settings=record.summary(),
        )
        _arm_stop(p, tracker, parent, run_dir)
        runner = make_task_runner(p.task_runner)
        try:
            with warnings_in_run_log():
                result = pipeline.with_options(task_runner=runner)(p, ctx)
        except BaseException:
            tracker.end_family(parent, "FAILED")
            raise
        finally:
            stopping.disarm()
        tracker.end(parent)
    return {**result, "mlflow_run_id": parent}


def _keep_backend(p: RunParams, record: RunRecord, policy: str) -> str:
    """The run's backend: the recorded one on a resume (``auto`` keeps it; another explicit
    backend is refused unless ``allow_setting_change``), else chosen now."""
    from tasks.llm.backend import choose_backend

    recorded = record.settings.get("backend")
    if recorded and p.backend in ("auto", recorded):
        return recorded
    if recorded and not p.allow_setting_change:
        raise SettingChangedError(
            f"this run folder was started with backend={recorded} "
            f"({record.reasons.get('backend', '')}); --backend {p.backend} would change it. "
            f"Pass --backend {recorded} (or auto), or --allow-setting-change to recompute "
            "what depends on it"
        )
    choice = choose_backend(p.backend, policy)
    log.info("generation backend: %s (%s)", choice.backend, choice.reason)
    return record.keep("backend", choice.backend, choice.reason, allow_change=True, hint="")


def _parent_run(tracker: Tracker, record: RunRecord, p: RunParams, run_dir: Path) -> str:
    """The run folder's MLflow parent run: the recorded one, reopened, when it is in this
    store and experiment and its parameters are this start's; else a new one, recorded.

    MLflow parameters cannot change, and a parent must never show a value its latest results
    did not use: a start with changed parameters (``--temperature 0.7`` after 1.0) gets a new
    parent run, tagged ``previous_parent_run_id`` and ``params.changed`` (the old one is tagged
    ``superseded_by``), and the stages it reuses log their figures there again.
    """
    old = record.mlflow.get("parent_run_id")
    same_store = record.mlflow.get("tracking_uri") == tracker.uri
    params = p.model_dump()
    reuse = bool(old and same_store and tracker.exists(old))
    changed: list[str] = []
    if reuse:
        for child in tracker.open_children(old):  # left RUNNING by a killed process
            tracker.client.set_terminated(child, "KILLED")
        changed = changed_params(tracker.client.get_run(old).data.params, params)
    if reuse and not changed:
        tracker.reopen(old)
        tracker.client.set_tag(old, "starts", str(record.starts))
        parent = old
    else:
        tags = {
            "run_dir": str(run_dir),
            "starts": str(record.starts),
            **{f"settings.{k}": v for k, v in record.settings.items()},
        }
        if changed:
            tags |= {"previous_parent_run_id": old, "params.changed": ", ".join(changed)}
        parent = tracker.start(p.run_name or run_dir.name, tags=tags)
        if changed:
            if tracker.client.get_run(old).info.status == "RUNNING":  # a killed start's
                tracker.end(old, "KILLED")
            tracker.client.set_tag(old, "superseded_by", parent)
            log.info(
                "MLflow: parameters changed (%s): new parent run %s after %s",
                ", ".join(changed),
                parent,
                old,
            )
        record.mlflow = {
            "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id,
            "parent_run_id": parent,
        }
    for key, value in record.settings.items():
        tracker.client.set_tag(parent, f"settings.{key}", value)
    tracker.params(parent, params)
    return parent


@contextlib.contextmanager
def run_temporaries(run_dir: Path) -> Iterator[Path]:
    """Point the process's temporary folder (vLLM engine and job folders, anything a library
    makes with :mod:`tempfile`) at ``<run>/.tmp`` for the run, and remove it after. A killed
    run's ``.tmp`` is removed by the next run's lock (:func:`remove_stale_temporaries`)."""
    tmp = Path(run_dir) / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = before
        shutil.rmtree(tmp, ignore_errors=True)


def _prefect_run_of_this_start(previous: dict[str, str]) -> dict[str, str]:
    """``{"flow_run_id"}`` of this start; the previous start's flow run, if a SIGKILL left it
    unfinished, is marked CRASHED (in the same Prefect API)."""
    flow_run_id = _prefect_flow_run_id()
    old = previous.get("flow_run_id")
    if old and old != flow_run_id:
        with contextlib.suppress(Exception):
            mark_crashed(old, f"its process was killed; resumed by flow run {flow_run_id}")
    return {"flow_run_id": flow_run_id} if flow_run_id else {}


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.get_id()
    except Exception:  # noqa: BLE001 - outside a flow run
        return None


def _arm_stop(p: RunParams, tracker: Tracker, parent: str, run_dir: Path) -> None:
    """Install the stop handler: on SIGINT/SIGTERM end the children, mark the MLflow runs
    KILLED and the Prefect flow runs CANCELLED, remove temporaries, exit with one line."""
    from tasks.common.stage import where

    if sys.argv and Path(sys.argv[0]).parent.name == "flows" and getattr(sys, "orig_argv", None):
        hint = f"Resume with the same command: {shlex.join(sys.orig_argv)}"
    else:  # a deployment's run on a worker, or a flow called from Python
        hint = f"Resume by running the flow again with the same parameters (run_name={p.run_name})."
    if not stopping.arm(where=where, resume_hint=hint):
        return
    flow_run_id = _prefect_flow_run_id()

    def mlflow_killed(_: str) -> None:
        tracker.end_family(parent, "KILLED")

    def prefect_cancelled(_: str) -> None:
        if flow_run_id:
            cancel_flow_runs(flow_run_id)
        stop_temporary_prefect_api()

    def temporaries_removed(_: str) -> None:
        shutil.rmtree(run_dir / ".tmp", ignore_errors=True)
        remove_stale_temporaries(run_dir)

    for cleanup in (temporaries_removed, prefect_cancelled, mlflow_killed):
        stopping.on_stop(cleanup)


def prepared_or_removed(p: RunParams, prepare: Callable[[Any], None]) -> None:
    """``prepare(p)`` with the run folder locked; a failure removes the run folder if this
    call made it (a run that never started leaves nothing behind)."""
    from tasks.data.prepare import remove_if_only_lock

    run_dir = p.run_dir()
    made = not run_dir.exists()
    try:
        with run_lock(run_dir):
            prepare(p)
    except BaseException:
        if made:
            remove_if_only_lock(run_dir)
        raise


def run_main(
    model: type[RunParams],
    flow_fn: Callable[..., dict],
    argv: list[str] | None,
    *,
    description: str,
    prepare_first: Callable[[Any], None] | None = None,
) -> int:
    """A flow's command line (``python -m <model.FLOW_MODULE>``): parse the parameters, check
    them (:func:`preflight`), prepare the data with ``prepare_first`` (a fault in the data's
    content is then one line, before Prefect and vLLM start, and leaves no run folder), run the
    flow, print the report."""
    from tasks.common.stage import failed_stage
    from tasks.data.assets import AssetError
    from tasks.data.schema import DataError
    from tasks.llm.backend import ModelLoadError
    from tasks.llm.vllm_engine import GenerationError

    prog = f"python -m {model.FLOW_MODULE}"
    params, _ = parse_params(model, argv, prog, description)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        preflight(params.resolved(), encoder=getattr(params, "encoder", None))
    except (PreflightError, AssetError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if prepare_first is not None:
        try:
            prepared_or_removed(params.resolved(), prepare_first)
        except (DataError, AssetError, RunLockedError) as exc:  # fails the same way again
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: stopped while preparing the data; nothing ran yet", file=sys.stderr)
            return 130
    start_temporary_prefect_api()
    try:
        result = flow_fn(**params.model_dump(exclude_unset=True))
    except (AssetError, ModelLoadError, RunLockedError, SettingChangedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DataError as exc:  # bad data fails the same way again: no advice to resume
        where = failed_stage()
        print(f"error{f' in stage {where!r}' if where else ''}: {exc}", file=sys.stderr)
        return 1
    except GenerationError as exc:
        where = failed_stage()
        print(
            f"error{f' in stage {where!r}' if where else ''}: {exc}. Every finished stage is "
            "kept: run the same command again to resume.",
            file=sys.stderr,
        )
        return 1
    print(Path(result["report"]).read_text())
    print(f"run folder: {result['run_dir']}")
    return 0
