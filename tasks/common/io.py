"""Atomic writes: every artefact is written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``target``.

    On error the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success swap it in.

    An existing ``target`` is replaced only once the new one is complete, so a crash
    at any point leaves either the old directory or the new one, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the temporaries that :func:`atomic_path` / :func:`atomic_dir` left under ``root``
    when their writer was killed (``.<name>.<random>.tmp``); returns what was removed.

    Only the single writer of ``root`` may call this (the flows do, holding the run lock): a
    live writer's temporary looks the same.
    """
    removed: list[Path] = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = Path(folder) / name
            if name in dirs:
                dirs.remove(name)  # do not walk into what is being removed
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` atomically and return the path."""
    with atomic_path(Path(path)) as tmp:
        df.write_parquet(tmp)
    return Path(path)


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


class DamagedFileError(RuntimeError):
    """A file a finished stage wrote cannot be read back; the message names it."""


def read_parquet(path: str | Path, **kwargs: Any) -> pl.DataFrame:
    """``pl.read_parquet(path)``, but a damaged file (corrupted after its stage finished, even
    with its size and mtime unchanged, which the stage manifests do not notice) fails with one
    line naming it and what to do, not polars' decoding error naming no file."""
    try:
        return pl.read_parquet(path, **kwargs)
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DamagedFileError(
            f"{path} cannot be read ({first}); delete it and run the same command again to "
            "recompute it"
        ) from None
