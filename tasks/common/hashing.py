"""Content hashes of files, folders and texts: the one home of every fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tree_files(path: str | Path) -> list[Path]:
    """The files of ``path`` (itself when it is a file), sorted; hidden names are skipped in a
    folder (stage manifests, temporaries, locks)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(folder) / f for f in sorted(files) if not f.startswith("."))
    return sorted(out)


def tree_stamp(path: str | Path) -> dict[str, list[int]]:
    """``{relative name: [size, mtime_ns]}`` of the files of ``path``: a cheap check that
    nothing was changed since a content hash was taken."""
    path = Path(path)
    stamp = {}
    for f in tree_files(path):
        st = f.stat()
        stamp[str(f.relative_to(path)) if f != path else "."] = [st.st_size, st.st_mtime_ns]
    return stamp


def tree_sha256(path: str | Path) -> str:
    """Hex sha256 over the relative names and bytes of the files of ``path``; a missing path
    hashes as ``"absent"``."""
    path = Path(path)
    if not path.exists():
        return text_sha256("absent")
    h = hashlib.sha256()
    for f in tree_files(path):
        h.update((str(f.relative_to(path)) if f != path else ".").encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()
