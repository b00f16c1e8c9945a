"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (``kill``, a Prefect cancel): within seconds, in
any stage, leaving what finished in place.

:func:`arm` installs the handler for one run: on a signal it ends every child process
(:func:`tasks.common.children.kill_all`), runs the cleanups registered with :func:`on_stop`
(marking MLflow and Prefect runs, removing temporaries) in a helper thread for at most
:data:`CLEANUP_SECONDS`, prints one line saying where the run stopped and how to resume, and
exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal exits at once.

Why exit rather than raise: the stage that was running may sit in a worker thread, in a C call
of torch or in a pipe read, and Prefect catches exceptions on the way up; a stage's outputs are
written atomically and its manifest last, so a run ended at any instant resumes from its last
finished stage (the guarantee SIGKILL already had). Prefect installs its own SIGTERM handler
while a flow runs; :func:`rearm` (called as each stage starts) puts this one back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from tasks.common import children

log = logging.getLogger(__name__)

CLEANUP_SECONDS = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_cleanups: list[Callable[[str], None]] = []
_where: Callable[[], str] = lambda: "between stages"  # noqa: E731
_resume_hint = ""
_armed = False
_stopping = False
_previous: dict[int, object] = {}


def arm(*, where: Callable[[], str], resume_hint: str) -> bool:
    """Install the stop handler for SIGINT and SIGTERM (main thread only; returns whether it
    was installed). ``where()`` names the running stage; ``resume_hint`` ends the stop line."""
    global _where, _resume_hint, _armed
    if threading.current_thread() is not threading.main_thread():
        return False
    _where, _resume_hint = where, resume_hint
    for sig in SIGNALS:
        _previous[sig] = signal.signal(sig, _handle)
    _armed = True
    return True


def disarm() -> None:
    """Restore the handlers :func:`arm` replaced and forget the cleanups."""
    global _armed
    if _armed and threading.current_thread() is threading.main_thread():
        for sig, handler in _previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler)  # type: ignore[arg-type]
    _previous.clear()
    _cleanups.clear()
    _armed = False


def rearm() -> None:
    """Put the stop handler back where another (Prefect's SIGTERM bridge) replaced it."""
    if not _armed or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handle:
            signal.signal(sig, _handle)


def hold_if_stopping() -> None:
    """Block the calling thread for good while a stop is under way.

    A stage thread whose child the stop just ended (a vLLM worker's pipe closing) would
    otherwise raise, and Prefect would log that error's traceback before the stop's one line;
    the process exits within :data:`CLEANUP_SECONDS` anyway. Returns at once otherwise."""
    if _stopping and threading.current_thread() is not threading.main_thread():
        threading.Event().wait()


def on_stop(cleanup: Callable[[str], None]) -> None:
    """Run ``cleanup(signal_name)`` when the run is stopped (the last registered runs first)."""
    _cleanups.append(cleanup)


def _handle(signum: int, frame: object) -> None:
    global _stopping
    if _stopping:
        os._exit(128 + signum)
    _stopping = True
    name = signal.Signals(signum).name
    where = _safe(_where)
    _say(f"\n{name}: stopping the run (in {where}) ...")
    worker = threading.Thread(target=_clean_up, args=(name,), name="stop-cleanup", daemon=True)
    worker.start()
    worker.join(CLEANUP_SECONDS)
    _say(f"stopped by {name} in {where}; every finished stage is kept. {_resume_hint}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(128 + signum)


def _say(line: str) -> None:
    """One line on the real standard error (Prefect captures ``print`` inside a flow)."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


def _clean_up(name: str) -> None:
    with contextlib.suppress(Exception):
        children.kill_all(final=True)  # and no new child: a stage may be starting one
    for cleanup in reversed(_cleanups):
        try:
            cleanup(name)
        except Exception as exc:  # noqa: BLE001 - a failed cleanup must not block the others
            _say(f"  (cleanup {getattr(cleanup, '__name__', cleanup)}: {exc})")


def _safe(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return "an unknown stage"
