from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.data.lists import ListsConfig
from tasks.data.prepare import load_prepared, main, prepare
from tasks.data.schema import DataError


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


# --------------------------------------------------------------------------- bad command lines


def _cli(*args: str) -> list[str]:
    return ["prepare", "--dataset", "ml-1m", *args]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-users", "-1", "--max-users must be >= 0 (0 keeps all users), got -1"),
        ("--seed", "-1", "--seed must be >= 0, got -1"),
        ("--min-interactions", "0", "--min-interactions must be >= 1, got 0"),
    ],
)
def test_cli_refuses_bad_numbers_before_any_work(
    ml1m_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str,
    message: str,
) -> None:  # fmt: skip
    out = tmp_path / "r"
    rc = main(_cli("--data-dir", str(ml1m_dir), "--out", str(out), flag, value))
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: {message}\n"
    assert not out.exists()


def test_cli_out_is_a_file(ml1m_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    out.write_text("keep me")
    rc = main(_cli("--data-dir", str(ml1m_dir), "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and f"--out {out} is a file, not a folder" in err
    assert out.read_text() == "keep me"


def test_cli_out_not_writable(
    ml1m_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only file system (simulated: tests may run as root, where chmod does not bite)."""
    import errno
    import tempfile

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "r"
    rc = main(_cli("--data-dir", str(ml1m_dir), "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"error: --out {out}: cannot write to {out} (Read-only file system)\n"


def test_cli_refuses_a_data_folder_as_out(
    ml1m_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert main(_cli("--data-dir", str(ml1m_dir), "--out", str(run), "--test-frac", "0.34")) == 0
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    capsys.readouterr()
    rc = main(_cli("--data-dir", str(ml1m_dir), "--out", str(run / "data")))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"--out {run / 'data'} is a prepared data folder itself" in err and str(run) in err
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before


# --------------------------------------------------------------------------- max_users


def test_max_users_emptying_test_split_is_refused(ml1m_dir: Path, tmp_path: Path) -> None:
    # seed 3: 2 test, 1 valid, 3 train users; the 2 drawn are a train and a valid user
    cfg = ListsConfig(seed=3, test_frac=0.34, valid_frac=0.25)
    with pytest.raises(DataError, match=r"--max-users 2 leaves the test split empty") as err:
        prepare("ml-1m", tmp_path / "run", ml1m_dir, cfg, max_users=2)
    assert "1 train, 1 valid, 0 test of 6 users" in str(err.value)
    assert not (tmp_path / "run" / "data").exists()


def test_max_users_warnings(
    ml1m_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # seed 4: the 2 drawn are a test and a train user; valid is left empty
    cfg = ListsConfig(seed=4, test_frac=0.34, valid_frac=0.25)
    counts = prepare("ml-1m", tmp_path / "a", ml1m_dir, cfg, max_users=2)
    assert counts["splits"]["valid"]["users"] == 0
    assert "--max-users 2 leaves the valid split empty" in caplog.text
    caplog.clear()
    counts = prepare("ml-1m", tmp_path / "b", ml1m_dir, cfg, max_users=100)
    assert counts["users_with_lists"] == 6
    assert "--max-users 100 is more than the 6 users with lists" in caplog.text


def test_prepare_refuses_negative_seed(ml1m_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="seed must be >= 0, got -1"):
        prepare("ml-1m", tmp_path / "run", ml1m_dir, ListsConfig(seed=-1))


# --------------------------------------------------------------------------- cleaning


def test_merged_duplicates_in_summary_and_meta(
    ml100k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with open(ml100k_dir / "u.data", "a") as fh:
        fh.write("1\t2\t5\t990000000\n1\t2\t4\t990000001\n")
    rc = main(["prepare", "--data-dir", str(ml100k_dir), "--out", str(tmp_path / "r"),
               "--test-frac", "0.34"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "cleaning          2 duplicate (user, item) ratings merged, keeping the latest" in out
    meta = load_prepared(tmp_path / "r").meta
    assert meta["counts"]["cleaning"]["duplicate_ratings_merged"] == 2


# -------------------------------------------------------------- no test users, no leftovers


def test_cli_refuses_test_frac_zero(
    ml1m_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--test-frac 0`` would prepare a run with no test user: refused in one line."""
    out = tmp_path / "r"
    rc = main(_cli("--data-dir", str(ml1m_dir), "--out", str(out), "--test-frac", "0"))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "--test-frac must be in (0, 1), got 0.0" in err
    assert not out.exists()


def test_prepare_refuses_an_empty_test_split(ml1m_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test_frac 0\.01 leaves the test split empty"):
        prepare("ml-1m", tmp_path / "run", ml1m_dir, ListsConfig(test_frac=0.01))
    assert not (tmp_path / "run" / "data").exists()


def test_failed_cli_leaves_no_new_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A prepare that fails into a folder it created removes it (no ``.lock`` left behind)."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "new-run"
    rc = main(_cli("--data-dir", str(empty), "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "file not found" in err
    assert not out.exists()
    kept = tmp_path / "old-run"  # a folder that was there before stays, with what it holds
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(_cli("--data-dir", str(empty), "--out", str(kept))) == 1
    assert (kept / "notes.txt").read_text() == "mine"
