"""Child processes that never outlive the run: started in a session of their own (so a Ctrl-C
in the terminal reaches only the flow, which then stops them), registered so a stop can end
them, and ended by the kernel or by themselves when the flow process dies, even by SIGKILL.

- :func:`spawn` starts a child (``subprocess.Popen``) in its own session and registers it;
  :func:`kill_all` ends every registered child that is still running.
- :func:`die_with_parent` (a ``preexec_fn``) asks the kernel to send the child SIGKILL when the
  thread that started it dies (Linux ``PR_SET_PDEATHSIG``): for children started from the main
  thread, whose death is the process's.
- :func:`exit_when_orphaned` (called in a child we wrote, such as the vLLM worker) exits the
  child as soon as its parent is gone, whichever thread started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
import weakref
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_children: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()
_lock = threading.Lock()
_closed = False  # set by a final kill_all: the run is stopping


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that forked it dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` in a session of its own, registered for
    :func:`kill_all`. Once a final :func:`kill_all` has run (the run is stopping) no child is
    started: the calling thread waits for the process's exit instead, so a stage that was
    about to start a vLLM worker does not leave one behind the stop."""
    with _lock:
        if not _closed:
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            _children.add(proc)
            return proc
    threading.Event().wait()
    raise AssertionError("unreachable")


def register(proc: subprocess.Popen) -> None:
    """Have :func:`kill_all` end ``proc`` (and its process group) if it is still running."""
    with _lock:
        _children.add(proc)


def running_children() -> list[subprocess.Popen]:
    with _lock:
        return [p for p in _children if p.poll() is None]


def kill_all(timeout: float = 3.0, *, final: bool = False) -> int:
    """SIGTERM every registered child's process group, SIGKILL what is left after ``timeout``
    seconds; returns how many were running. ``final`` (a stop): :func:`spawn` starts no child
    after this."""
    global _closed
    if final:
        with _lock:
            _closed = True
    procs = running_children()
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
    return len(procs)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # spawned with its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def exit_when_orphaned(interval: float = 0.5) -> threading.Thread:
    """In a child process: a daemon thread that ends this process (``os._exit(1)``) as soon as
    its parent has died (the parent id changes when the parent is gone)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    thread = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    thread.start()
    return thread
