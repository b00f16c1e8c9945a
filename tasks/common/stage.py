"""The one stage mechanism of both flows: time a stage, persist its result, serve it again only
when nothing it depends on changed.

A stage is a function with an ``out`` parameter (the file or folder it writes) that returns an
:class:`Artefact`. :func:`stage` turns it into a Prefect task that keys the stage on

- its parameters (configs, numbers, paths, as JSON),
- the fingerprints of the upstream :class:`Artefact` values and :class:`InputRef` stamps it
  takes (wherever they sit in its arguments, dataclasses included),
- the code version of the logic it calls (:func:`code_version`: the stage function, the helpers
  of its own module it uses, and every project module those reach by import),

and writes a manifest beside ``out`` (``.<name>.stage.json``: the key, the result, the size and
mtime of every output file, their content hash). Called again, the stage is served from the
manifest when the key is the same and its outputs are still there with the same content;
otherwise it runs again. An output's fingerprint is ``sha256(key, content)``, so a stage that
ran again with another key, or whose outputs came out different, changes the keys of every
stage downstream of it, and only of those.

A long stage may keep finished pieces of its work in :func:`partial_dir` (a folder beside
``out`` named by its key): they survive a stop or a crash, only a run with the same key sees
them again, and the folder is removed once the stage completes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from tasks.common import stopping
from tasks.common.hardware import cpu_dtype
from tasks.common.hashing import text_sha256, tree_sha256, tree_stamp
from tasks.common.io import atomic_path

log = logging.getLogger(__name__)

PROJECT_PACKAGES = ("tasks", "models")
"""Packages whose modules enter a stage's code version."""
MANIFEST_VERSION = 1

P = ParamSpec("P")
A = TypeVar("A", bound="Artefact")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Artefact:
    """What a stage wrote: ``path`` (file or folder) and its ``extra`` outputs.

    Attributes:
        path: the stage's ``out``.
        stats: small numbers and names worth reporting (counts, losses, token rates).
        extra: further files or folders the stage wrote (fingerprinted with ``path``).
        skipped: why nothing was computed (e.g. no preference pairs); ``None`` when it ran.
        fingerprint: ``sha256(stage key, content of the outputs)``, set by the mechanism.
        seconds: wall time of the run that made it (also when served from the manifest: the
            seconds it was made in).
        why: why that run made it rather than serving a manifest (``temperature 1.0 -> 0.7``,
            ``input samples changed``, ``its code changed``, ``not made before``).
        cached: whether this call was served from the manifest (not persisted).
    """

    path: str
    stats: dict[str, Any] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    skipped: str | None = None
    fingerprint: str = ""
    seconds: float = 0.0
    why: str | None = None
    cached: bool = False

    def outputs(self) -> list[str]:
        return [self.path, *self.extra]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("cached")
        out["extra"] = list(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artefact:
        return cls(**{**data, "extra": tuple(data.get("extra", ()))})


@dataclass(frozen=True)
class InputRef:
    """A file or folder the flow reads but no stage wrote (a model, a data folder, a table).

    ``stamp`` hashes the relative names, sizes and mtimes of its files (or the name alone for a
    hub id that is not a local path), so a stage keyed on it runs again when it is replaced.
    """

    path: str
    stamp: str

    @classmethod
    def of(cls, path: str | Path) -> InputRef:
        p = Path(path).expanduser()
        if not p.exists():
            return cls(str(path), text_sha256(f"name:{path}")[:16])
        stamp = json.dumps(tree_stamp(p), sort_keys=True)
        return cls(str(p.resolve()), text_sha256(stamp)[:16])


# --------------------------------------------------------------------------- code version


def _module_source(name: str) -> str:
    """The source text of project module ``name`` ('' when it has no file)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    return Path(spec.origin).read_text()


def _is_project(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PROJECT_PACKAGES  # type: ignore[union-attr]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def _imported_modules(tree: ast.AST) -> set[str]:
    """Project modules named by the import statements anywhere in ``tree``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _is_project(a.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_project(node.module):
            base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _is_module(sub) else base)
    return found


@functools.cache
def _module_closure(name: str) -> frozenset[str]:
    """``name`` and every project module it reaches by import (at any depth)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        source = _module_source(mod)
        if source:
            todo.extend(_imported_modules(ast.parse(source)) - seen)
    return frozenset(seen)


def _function_parts(fn: Callable[..., Any]) -> tuple[list[str], set[str]]:
    """Sources of ``fn`` and the helpers of its own module it uses (recursively), and the
    other project modules they reach."""
    fn = inspect.unwrap(fn)
    home = fn.__module__
    sources: list[str] = []
    modules: set[str] = set()
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            source = textwrap.dedent(inspect.getsource(obj))
        except (OSError, TypeError):
            continue
        sources.append(source)
        tree = ast.parse(source)
        modules |= _imported_modules(tree)
        names = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})
        for ref in (vars(inspect.getmodule(obj)).get(n) for n in names):
            if isinstance(ref, types.ModuleType) and _is_project(ref.__name__):
                modules.add(ref.__name__)
            elif getattr(ref, "__module__", None) == home and (
                inspect.isfunction(ref) or inspect.isclass(ref)
            ):
                todo.append(ref)
            elif _is_project(getattr(ref, "__module__", None)):
                modules.add(ref.__module__)
    return sources, modules


def code_version(fn: Callable[..., Any]) -> str:
    """sha256 (16 hex) of the code a stage runs: ``fn``'s source, the helpers of its own
    module that it uses, and the whole source of every project module they reach by import.

    An edit of the pairing logic under a thin stage therefore changes the stage's key, and an
    edit of an unrelated module does not.
    """
    sources, modules = _function_parts(fn)
    closure: set[str] = set()
    for mod in modules:
        closure |= _module_closure(mod)
    h = hashlib.sha256()
    for source in sorted(sources):  # a set's order changes with the process's hash seed
        h.update(source.encode())
    for mod in sorted(closure):
        h.update(mod.encode() + b"\0" + _module_source(mod).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- keys


def key_value(obj: Any) -> Any:
    """The JSON value of a stage argument in its key: an :class:`Artefact` by its
    fingerprint, a dataclass by its fields, paths as text."""
    if isinstance(obj, Artefact):
        return {"artefact": obj.fingerprint}
    if isinstance(obj, InputRef):
        return {"input": obj.path, "stamp": obj.stamp}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: key_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): key_value(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple | set | frozenset):
        items = [key_value(v) for v in obj]
        return sorted(items, key=json.dumps) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"stage argument of type {type(obj).__name__} cannot enter a cache key")


RESULT_ENV = (
    "RLRF4REC_CPU_DTYPE",  # tasks.common.hardware.DTYPE_ENV
    "RLRF4REC_VLLM_TOP_P",  # tasks.llm.top_p.ENV
    "RLRF4REC_VLLM_NORM",  # tasks.llm.cpu_norm.ENV
    "RLRF4REC_VLLM_KV",  # tasks.llm.vllm_engine.KV_ENV
    "RLRF4REC_TRL_HEAD",  # tasks.llm.trl_cpu.ENV
    "RLRF4REC_DPO_PACKING",  # tasks.llm.dpo_packing.ENV
    "RLRF4REC_DPO_ATTENTION",  # tasks.llm.dpo_packing.ATTENTION_ENV
    "RLRF4REC_BACKWARD_DTYPE",  # tasks.llm.bf16_backward.ENV
    "RLRF4REC_ENCODER_DTYPE",  # tasks.rlrf4rec.encode.ENCODER_DTYPE_ENV
)
"""Environment switches that change what a stage computes: the ones set are part of every key."""


def key_body(name: str, fn: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """What a stage's key hashes: its name, arguments (:func:`key_value`), code version and
    the :data:`RESULT_ENV` switches that are set. Kept in the manifest, so that ``diff`` tells
    why a stage ran again."""
    body = {
        "stage": name,
        "version": MANIFEST_VERSION,
        "code": code_version(fn),
        "arguments": {k: key_value(v) for k, v in arguments.items()},
    }
    # The CPU dtype models run in (chosen from the CPU's flags): a stage computed in bf16 is
    # never served to a resume on a CPU that runs fp32.
    body["cpu_dtype"] = cpu_dtype().name
    switches = {k: os.environ[k] for k in RESULT_ENV if os.environ.get(k)}
    if switches:
        body["environment"] = switches
    return body


def stage_key(name: str, fn: Callable[..., Any], arguments: dict[str, Any]) -> str:
    """sha256 of :func:`key_body`."""
    return text_sha256(json.dumps(key_body(name, fn, arguments), sort_keys=True))


# --------------------------------------------------------------------------- manifest


def manifest_path(out: str | Path) -> Path:
    """Where the manifest of the stage writing ``out`` lives: ``<parent>/.<name>.stage.json``."""
    out = Path(out)
    return out.parent / f".{out.name}.stage.json"


def _content(paths: Iterable[str]) -> str:
    return text_sha256("\n".join(f"{p}:{tree_sha256(p)}" for p in paths))


def _stamps(paths: Iterable[str]) -> dict[str, dict[str, list[int]]]:
    return {p: tree_stamp(p) for p in paths}


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The manifest of the stage writing ``out``, None when there is none (or it is damaged)."""
    try:
        manifest = json.loads(manifest_path(out).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def cached_result(out: str | Path, key: str) -> Artefact | None:
    """The manifest's result for ``key`` when the outputs it lists are unchanged, else None.

    Sizes and mtimes are compared first; when they differ the content is hashed again, so a
    file merely touched is still served and a changed or deleted one is not.
    """
    path = manifest_path(out)
    manifest = read_manifest(out)
    if manifest is None:
        return None
    if manifest.get("key") != key or manifest.get("version") != MANIFEST_VERSION:
        return None
    result = Artefact.from_json(manifest["result"])
    outputs = result.outputs()
    if _stamps(outputs) != manifest.get("stamps"):
        if _content(outputs) != manifest.get("content"):
            return None
        _write_manifest(path, {**manifest, "stamps": _stamps(outputs)})
    return dataclasses.replace(result, cached=True)


def why_again(manifest: dict[str, Any] | None, body: dict[str, Any], key: str) -> str:
    """Why a stage whose key body is ``body`` is not served from ``manifest``: the arguments
    that changed (``sampling.temperature 1.0 -> 0.7``, ``input samples changed``), its code,
    the CPU dtype or a result switch; its outputs changed or deleted; or no manifest."""
    if manifest is None:
        return "not made before"
    if manifest.get("key") == key:
        return "its outputs were changed or deleted"
    old = manifest.get("key_body") or {}
    reasons = _changed("", old.get("arguments", {}), body.get("arguments", {}))
    if old.get("code") != body.get("code"):
        reasons.append("its code changed")
    if old.get("cpu_dtype") != body.get("cpu_dtype"):
        reasons.append(f"CPU dtype {old.get('cpu_dtype')} -> {body.get('cpu_dtype')}")
    if old.get("environment") != body.get("environment"):
        reasons.append("a result switch in the environment changed")
    return "; ".join(reasons) or "its key changed"


def _changed(prefix: str, old: Any, new: Any) -> list[str]:
    """The differences of two key values, by dotted name."""
    if old == new:
        return []
    name = prefix or "arguments"
    if isinstance(new, dict) and ("artefact" in new or "input" in new):
        return [f"input {name} changed"]
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed(f"{prefix}.{k}" if prefix else str(k), old.get(k), new.get(k))
        return out
    return [f"{name} {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")


def run_stage(name: str, fn: Callable[..., Artefact], /, *args: Any, **kwargs: Any) -> Artefact:
    """Serve ``fn(*args, **kwargs)`` from its manifest or run it and write the manifest."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    out = bound.arguments["out"]
    body = key_body(name, fn, bound.arguments)
    key = text_sha256(json.dumps(body, sort_keys=True))
    hit = cached_result(out, key)
    if hit is not None:
        log.info("%s: unchanged, served from %s", name, manifest_path(out))
        made_here = _ran_outside.pop((name, str(out)), None)  # by this start, before its flow
        _record(
            name, out, made_here if made_here and made_here.fingerprint == hit.fingerprint else hit
        )
        return hit
    why = why_again(read_manifest(out), body, key)
    log.info("%s: runs (%s)", name, why)
    stopping.rearm()
    t0 = time.perf_counter()
    with _running_as(name), _partial_work(out, key):
        try:
            result = fn(*bound.args, **bound.kwargs)
        except Exception as exc:
            stopping.hold_if_stopping()  # an error the stop caused is not the run's error
            exc.add_note(f"in stage {name!r}")
            _failed.append(name)
            raise
    if not isinstance(result, Artefact):
        raise TypeError(f"stage {name!r} returned {type(result).__name__}, not an Artefact")
    outputs = result.outputs()
    content = _content(outputs)
    result = dataclasses.replace(
        result,
        fingerprint=text_sha256(key + content)[:16],
        seconds=round(time.perf_counter() - t0, 3),
        why=why,
        cached=False,
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": name,
        "key": key,
        "key_body": body,
        "content": content,
        "stamps": _stamps(outputs),
        "result": result.to_json(),
    }
    _write_manifest(manifest_path(out), manifest)
    shutil.rmtree(_partial_root(out), ignore_errors=True)
    _record(name, out, result)
    if getattr(_outside, "active", False):
        later = f"{why}; before the flow started"
        _ran_outside[(name, str(out))] = dataclasses.replace(result, why=later)
    return result


_ran_outside: dict[tuple[str, str], Artefact] = {}
_outside = threading.local()


def run_outside_prefect(task: Any, /, *args: Any, **kwargs: Any) -> Artefact:
    """Run the stage behind ``task`` (a :func:`stage`) in this thread, without Prefect: the
    same key and manifest, so the flow's own call of ``task`` is then served from it (and
    the run's stage ledger says it ran in this start, with why)."""
    _outside.active = True
    try:
        return run_stage(task.name, task.stage_fn, *args, **kwargs)
    finally:
        _outside.active = False


_ledger: list[dict[str, Any]] | None = None
_ledger_lock = threading.Lock()


@contextmanager
def stage_ledger() -> Iterator[list[dict[str, Any]]]:
    """Collect every stage a run serves or runs, in order: ``stage``, ``out``, ``cached``,
    ``seconds`` (those it was made in, also when served from its manifest) and ``why`` it ran
    again (None when served). The report's "Stages" table."""
    global _ledger
    entries: list[dict[str, Any]] = []
    _ledger = entries
    try:
        yield entries
    finally:
        _ledger = None


def _record(name: str, out: Any, artefact: Artefact) -> None:
    if _ledger is None:
        return
    entry = {
        "stage": name,
        "out": str(out),
        "cached": artefact.cached,
        "seconds": artefact.seconds,
        "why": None if artefact.cached else artefact.why,
    }
    with _ledger_lock:
        _ledger.append(entry)


_running: dict[int, list[str]] = {}
_failed: list[str] = []
_partial = threading.local()


def _partial_root(out: str | Path) -> Path:
    path = Path(out)
    return path.parent / f".{path.name}.partial"


@contextmanager
def _partial_work(out: str | Path, key: str) -> Iterator[None]:
    """Make :func:`partial_dir` the running stage's folder; drop other keys' partial work."""
    root = _partial_root(out)
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name != key[:16]:
                shutil.rmtree(stale, ignore_errors=True)
    before = getattr(_partial, "dir", None)
    _partial.dir = root / key[:16]
    try:
        yield
    finally:
        _partial.dir = before


def partial_dir() -> Path:
    """The running stage's folder for finished pieces of its work (created on first use).

    It sits beside the stage's ``out`` (``.<out name>.partial/<key>``) and outlives a stop or a
    crash; the stage's next run with the same key finds what it holds, a run with another key
    never does, and it is removed when the stage completes. Write into it atomically.
    """
    folder = getattr(_partial, "dir", None)
    if folder is None:
        raise RuntimeError("partial_dir() is only available inside a running stage")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _running_as(name: str) -> Iterator[None]:
    stack = _running.setdefault(threading.get_ident(), [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def running_stages() -> list[str]:
    """The stages running now, innermost of each thread (for a stop message)."""
    return [stack[-1] for stack in list(_running.values()) if stack]


def failed_stage() -> str | None:
    """The last stage that raised in this process, if any."""
    return _failed[-1] if _failed else None


def where() -> str:
    """``stage 'x'`` (or ``stages 'x', 'y'``) running now, else ``between stages``."""
    names = running_stages()
    if not names:
        return "between stages"
    return ("stage " if len(names) == 1 else "stages ") + ", ".join(f"'{n}'" for n in names)


def measured_seconds(*artefacts: Artefact | None) -> float:
    """Seconds this process spent making ``artefacts``: 0 for one served from its manifest (its
    ``seconds`` are those of the run that made it), so that a run's stage seconds add up to at
    most its wall time, also after a resume; 0 for None (a stage the run did not need)."""
    return sum(0.0 if a is None or a.cached else a.seconds for a in artefacts)


def stage(name: str, **task_options: Any) -> Callable[[Callable[P, A]], Any]:
    """Make ``fn`` (which takes ``out`` and returns an :class:`Artefact`) a Prefect task run
    through :func:`run_stage`. Prefect's own caching is off: the manifest is the cache.

    The undecorated function stays reachable as ``.stage_fn``.
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def decorate(fn: Callable[P, A]) -> Any:
        if "out" not in inspect.signature(fn).parameters:
            raise TypeError(f"stage {name!r}: {fn.__qualname__} needs an 'out' parameter")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Artefact:
            return run_stage(name, fn, *args, **kwargs)

        # Prints stay prints (stdout), never the run's log: under ``log_prints`` Prefect's
        # patched ``print`` also catches what libraries print into a swapped ``sys.stdout`` --
        # dill disassembling a function while ``datasets`` fingerprints TRL's tokenizing map --
        # and floods the log with ~266 lines of bytecode per DPO stage.
        options = {"log_prints": False, "task_run_name": _task_run_namer(name), **task_options}
        wrapped = task(name=name, cache_policy=NO_CACHE, persist_result=False, **options)(run)
        wrapped.stage_fn = fn
        return wrapped

    return decorate


def _task_run_namer(name: str) -> Callable[..., str]:
    """Prefect's ``task_run_name`` for stage ``name``: :func:`task_run_label` of its ``out``."""

    def task_run_name(parameters: dict[str, Any]) -> str:
        try:
            return task_run_label(name, parameters.get("out"))
        except Exception:  # noqa: BLE001 - a name never fails a run
            return name

    return task_run_name


_NUMBERED = re.compile(r"^([A-Za-z]+)[_-]?0*(\d+)$")


def task_run_label(name: str, out: str | Path | None) -> str:
    """A stage run's name in Prefect: the stage and where it writes below the run folder (the
    first folder up that holds ``.lock`` or ``run.json``), in words: ``sample round 1``,
    ``train-reranker eval dlcm kar seed 1``; file suffixes, and a last part named like the
    stage, are dropped."""
    if out is None:
        return name
    out = Path(out)
    base = next(
        (d for d in out.parents if (d / ".lock").exists() or (d / "run.json").exists()), None
    )
    parts = list(out.relative_to(base).parts) if base else list(out.parts[-2:])
    words = []
    for part in parts:
        stem = part.split(".")[0] if not part.startswith(".") else part
        numbered = _NUMBERED.match(stem)
        word = f"{numbered.group(1)} {int(numbered.group(2))}" if numbered else stem
        words.append(word.replace("_", " "))
    if words and words[-1] in (name, name.replace("-", " ")):
        words.pop()
    return " ".join([name, *words])
