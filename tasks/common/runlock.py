"""The run-folder lock: one writer per run folder, released by the kernel even on SIGKILL."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.common.io import remove_stale_temporaries

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another process is writing the same run folder."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` for the duration of a flow run.

    The lock is an ``flock`` on ``<run_dir>/.lock``: the kernel releases it when the holder
    dies, even by SIGKILL, so a killed run can be resumed at once. Once held, the temporaries
    a killed writer left in the folder are removed
    (:func:`tasks.common.io.remove_stale_temporaries`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole context
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"run folder {run_dir} is in use by another run (pid {holder}); "
                "wait for it to finish or choose another --run-name"
            ) from None
        raise
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        for path in remove_stale_temporaries(run_dir):
            log.info("removed %s, left by a run that was killed while writing it", path)
        yield run_dir
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
