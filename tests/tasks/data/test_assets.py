from __future__ import annotations

from pathlib import Path

import pytest

from tasks.data import assets


def test_offline_no_cache_gives_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    # no index, no find-links: pip cannot reach anything
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(assets.AssetError) as err:
        assets.movielens_100k()
    msg = str(err.value)
    assert "\n" not in msg
    assert "MovieLens-100K is not cached" in msg and "--data-dir" in msg


def test_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / assets.RECBOLE.filename).write_bytes(b"not a wheel")
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch_wheel(assets.RECBOLE, "MovieLens-100K", "x")


def test_user_folder_accepted_and_checked(ml100k_dir: Path, tmp_path: Path) -> None:
    assert assets.movielens_100k(ml100k_dir) == ml100k_dir
    with pytest.raises(assets.AssetError, match="u.data"):
        assets.movielens_100k(tmp_path)


def test_local_model_paths(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert assets.policy_model(str(model)) == str(model.resolve())
    assert assets.encoder_model(str(model)) == str(model.resolve())
    with pytest.raises(assets.AssetError, match="not a model folder"):
        assets.policy_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE"):
        assets.policy_model("no-such-org/no-such-model")
