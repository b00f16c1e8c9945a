"""The Prefect side of a run's life: the temporary Prefect API of a command-line run, started so
that it dies with the flow process, and the flow runs marked CANCELLED when a run is stopped.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (a child ``uvicorn`` process)
at the first flow call and stops it at interpreter exit; a flow process killed outright left it
running (282 MB, minutes later). :func:`start_temporary_prefect_api` starts it first, from the
main thread, in a session of its own (a Ctrl-C in the terminal reaches only the flow, which
stops it after marking its flow runs) and with ``PR_SET_PDEATHSIG``
(:func:`tasks.common.children.die_with_parent`), so the kernel ends it when the flow process
dies, however it dies; Prefect then reuses that server.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tasks.common.children import die_with_parent

log = logging.getLogger(__name__)


def _temporary_api_wanted() -> bool:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value())


@contextlib.contextmanager
def _children_die_with_this_thread() -> Iterator[None]:
    original = subprocess.Popen

    class Popen(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("preexec_fn", die_with_parent)
            kwargs.setdefault("start_new_session", True)  # a Ctrl-C is the flow's to handle
            super().__init__(*args, **kwargs)

    subprocess.Popen = Popen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]


STARTUP_TIMEOUT_S = 120  # seconds the temporary API may take to answer /health


def start_temporary_prefect_api() -> str | None:
    """Start Prefect's temporary API server now, tied to this process (main thread only).

    Returns its URL, or None when a Prefect API is configured (``PREFECT_API_URL``) or this is
    not the main thread (then Prefect starts it as usual).
    """
    if threading.current_thread() is not threading.main_thread() or not _temporary_api_wanted():
        return None
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if not server.running:
        # Prefect waits 20 s by default: on two busy cores its server has needed more.
        timeout = max(STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        with _children_die_with_this_thread():
            server.start(timeout=timeout)
    return server.api_url


def stop_temporary_prefect_api() -> None:
    """Stop the temporary API server of this process, if one runs."""
    with contextlib.suppress(Exception):
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


def cancel_flow_runs(flow_run_id: str) -> int:
    """Mark ``flow_run_id`` and its unfinished subflow runs CANCELLED; returns how many."""
    from prefect.states import Cancelled

    return _set_unfinished(flow_run_id, lambda: Cancelled(message="stopped by a signal"))


def _set_unfinished(flow_run_id: str, state: Callable[[], Any], depth: int = 4) -> int:
    """Force ``state()`` on ``flow_run_id`` and its subflow runs (``depth`` levels down) that
    are not in a final state; returns how many."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    changed = 0
    with get_client(sync_client=True) as client:
        todo = [(flow_run_id, 0)]
        while todo:
            run_id, level = todo.pop()
            run = client.read_flow_run(run_id)
            if level < depth:
                subflows = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
                    )
                )
                todo += [(sub.id, level + 1) for sub in subflows]
            if run.state is None or not run.state.is_final():
                client.set_flow_run_state(run_id, state(), force=True)
                changed += 1
    return changed


def mark_crashed(flow_run_id: str, message: str) -> bool:
    """Mark ``flow_run_id`` and its unfinished subflow runs CRASHED (a start that was killed
    outright); returns whether any was unfinished."""
    from prefect.states import Crashed

    return _set_unfinished(flow_run_id, lambda: Crashed(message=message)) > 0
