"""Atomic writes and the clean-up of what a killed writer left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from tasks.common.io import remove_stale_temporaries, write_parquet


def test_killed_writer_leaves_only_temporaries_and_they_are_removed(tmp_path: Path) -> None:
    done = write_parquet(pl.DataFrame({"x": [1, 2]}), tmp_path / "done.parquet")
    (tmp_path / ".hidden").write_text("not a temporary")
    # a writer SIGKILLed in the middle of an atomic file and an atomic folder
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tasks.common.io import atomic_dir, atomic_path
        root = Path({str(tmp_path)!r})
        (root / "round_01").mkdir()
        with atomic_dir(root / "round_01" / "dpo") as d, atomic_path(root / "x.parquet") as f:
            (d / "adapter").mkdir()
            (d / "adapter" / "weights").write_bytes(b"half")
            f.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    left = sorted(p.name for p in tmp_path.rglob(".*.tmp"))
    assert len(left) == 2 and not (tmp_path / "x.parquet").exists()

    removed = remove_stale_temporaries(tmp_path)

    assert sorted(p.name for p in removed) == left
    assert not list(tmp_path.rglob(".*.tmp"))
    assert pl.read_parquet(done)["x"].to_list() == [1, 2]  # finished work untouched
    assert (tmp_path / ".hidden").exists() and (tmp_path / "round_01").is_dir()
    assert remove_stale_temporaries(tmp_path) == []


def test_a_damaged_parquet_names_its_file(tmp_path) -> None:
    """Bytes flipped in place (same size, which the manifests do not notice): one line naming
    the file and what to do, not polars' decoding error."""
    from tasks.common.io import DamagedFileError, read_parquet

    path = tmp_path / "scored.parquet"
    pl.DataFrame({"user_id": list(range(2000)), "reward": [0.5] * 2000}).write_parquet(path)
    assert read_parquet(path).height == 2000
    data = bytearray(path.read_bytes())
    data[4:20] = bytes(b ^ 0xFF for b in data[4:20])  # the first page's header, after "PAR1"
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"scored\.parquet cannot be read .*delete it"):
        read_parquet(path)
