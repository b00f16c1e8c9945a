from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.data.datasets import DataError
from tasks.data.prepare import load_prepared, main, prepare
from tasks.rlrf4rec.lists import ListsConfig


def test_prepare_writes_parquet_and_meta(ml1m_dir: Path, tmp_path: Path) -> None:
    counts = prepare(
        "ml-1m", tmp_path / "run", ml1m_dir, ListsConfig(seed=1, test_frac=0.34, valid_frac=0.25)
    )
    data = load_prepared(tmp_path / "run")
    assert data.lists.height == counts["lists"] > 0
    assert set(data.users["split"]) == {"train", "valid", "test"}
    assert data.meta["dataset"] == "ml-1m" and data.meta["task"]["seed"] == 1
    assert data.lists.schema["item_ids"] == pl.List(pl.Int64)
    # no temporary folder is left beside the result
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]


def test_failed_prepare_keeps_previous_output(ml100k_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare("ml-1m", run, _ml1m_from(ml100k_dir, tmp_path), ListsConfig(test_frac=0.34))
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    bad = _ml1m_from(ml100k_dir, tmp_path, corrupt=True)
    with pytest.raises(DataError, match=r"ratings\.dat:3:"):
        prepare("ml-1m", run, bad, ListsConfig(test_frac=0.34))
    after = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    assert before == after
    assert sorted(p.name for p in run.iterdir()) == ["data"]


def _ml1m_from(ml100k_dir: Path, tmp_path: Path, corrupt: bool = False) -> Path:
    """Rewrite the tiny GroupLens fixture in ML-1M format (optionally with a bad line 3)."""
    d = tmp_path / ("bad" if corrupt else "good")
    d.mkdir()
    users = [line.split("|") for line in (ml100k_dir / "u.user").read_text().splitlines()]
    (d / "users.dat").write_text("".join(f"{u[0]}::{u[2]}::25::4::{u[4]}\n" for u in users))
    items = [line.split("|") for line in (ml100k_dir / "u.item").read_text("latin-1").splitlines()]
    (d / "movies.dat").write_text("".join(f"{i[0]}::{i[1]}::Drama\n" for i in items))
    rows = [line.split("\t") for line in (ml100k_dir / "u.data").read_text().splitlines()]
    lines = [f"{r[0]}::{r[1]}::{r[2]}::{r[3]}" for r in rows]
    if corrupt:
        lines[2] = "1::x::4::1"
    (d / "ratings.dat").write_text("\n".join(lines) + "\n")
    return d


def test_cli_prints_counts(ml100k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["prepare", "--dataset", "ml-100k", "--data-dir", str(ml100k_dir),
               "--out", str(tmp_path / "r"), "--test-frac", "0.34"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "users             6" in out and "no positive" in out and "test" in out


def test_cli_reports_bad_input(
    ml100k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (ml100k_dir / "u.item").write_text("")
    rc = main(["prepare", "--data-dir", str(ml100k_dir), "--out", str(tmp_path / "r")])
    assert rc == 1
    assert "u.item: file is empty" in capsys.readouterr().err
    assert not (tmp_path / "r" / "data").exists()


def test_real_movielens_100k(tmp_path: Path) -> None:
    """The real data set, read out of the recbole wheel (downloaded once, then cached)."""
    counts = prepare("ml-100k", tmp_path / "run")
    assert (counts["users"], counts["items"], counts["ratings"]) == (943, 1682, 100_000)
    data = load_prepared(tmp_path / "run")
    assert "American President, The (1995)" in data.items["title"].to_list()
    test_users = counts["splits"]["test"]["users"]
    assert test_users == 94
    # every list has exactly 10 distinct items
    assert (data.lists["item_ids"].list.n_unique() == 10).all()
