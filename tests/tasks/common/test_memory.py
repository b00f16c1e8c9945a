"""Returning freed heap memory to the operating system."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tasks.common.memory import _malloc_trim, releases_memory

# In a fresh interpreter (a clean heap): 375 MiB of 64 KiB blocks (below malloc's mmap
# threshold), each followed by a small survivor. Once the blocks are freed the heap cannot
# shrink from its top, so their pages stay resident until trimmed.
SCENARIO = textwrap.dedent("""
    import gc, json, os
    from pathlib import Path
    from tasks.common.memory import release_memory

    def rss_mib():
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    survivors, blocks = [], []
    for _ in range(6_000):
        blocks.append(bytearray(64 * 1024))
        survivors.append(bytearray(600))
    del blocks
    gc.collect()
    freed = rss_mib()
    release_memory()
    print(json.dumps({"freed": freed, "released": rss_mib(), "survivors": len(survivors)}))
""")


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    mib = json.loads(out.stdout)
    # gc alone keeps the 375 MiB resident; the trim gives most of it back
    assert mib["freed"] - mib["released"] > 250, mib
    assert mib["survivors"] == 6_000


def test_decorator_keeps_results_and_errors() -> None:
    calls = []

    @releases_memory
    def heavy(x: int) -> int:
        """Doc."""
        calls.append(x)
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    assert heavy(3) == 6 and heavy.__doc__ == "Doc." and heavy.__name__ == "heavy"
    with pytest.raises(ValueError, match="negative"):
        heavy(-1)
    assert calls == [3, -1]
