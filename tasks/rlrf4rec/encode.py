"""Knowledge encoding: texts -> dense vectors, with a cache that never encodes a text twice.

The encoder is any sentence-transformers folder or plain Hugging Face encoder, resolved with
:func:`tasks.data.assets.encoder_model` (default all-MiniLM-L6-v2 from the offline asset cache;
``bert-base-uncased`` as in the paper works by id or path):

- a sentence-transformers folder (it has ``modules.json``): its transformer, mean pooling,
  then L2 normalisation where its pipeline normalises (all-MiniLM-L6-v2 does);
- any other folder is loaded with ``AutoModel`` and mean-pooled (no normalisation).

Texts longer than the encoder's window (256 tokens for MiniLM, 512 for BERT) are encoded in
consecutive windows and mean-pooled over all their tokens, never truncated: the LLM's answer
comes after a long profile-and-history prefix and would otherwise be cut off.

The encoder runs in bf16 (autocast; the vectors stay float32) where the CPU has native bf16
instructions (:func:`tasks.common.hardware.cpu_dtype`), in fp32 elsewhere. On a 2-core CPU
with AVX-512 BF16, round 1's 376 quick-profile texts took 11.4 s against 25.3 s in fp32
(2.2x); each vector moved by 0.006 on average (L2, unit vectors), about 1% of the mean
distance between two samples of one user (0.46), and no pair of samples was closer than that.

Cache: ``<cache_dir>/<encoder key>/part-*.parquet`` with columns ``key`` (sha256 hex of the
text, Utf8) and ``vector`` (List[Float32]). The encoder key is the encoder's name plus a hash of
its resolved folder and, in bf16, of the dtype, so two encoders (or one in two dtypes) never
share entries. Each call that encodes new texts
appends one part file (written atomically: readers never see half a file); parts are compacted
into one when there are more than :data:`MAX_PARTS`. A part that is empty, corrupt or not in
that schema (a damaged disk, a hand copy) is never read as vectors: it is removed with a
warning naming it and its texts are encoded again. The default cache folder is
``tasks.data.assets.cache_dir() / "embeddings"``.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from tasks.common.hardware import DtypeName, pinned_or_cpu_dtype
from tasks.common.hashing import text_sha256
from tasks.common.io import write_json, write_parquet
from tasks.common.memory import releases_memory
from tasks.data import assets
from tasks.data.assets import DEFAULT_ENCODER, encoder_model

log = logging.getLogger(__name__)

MAX_PARTS = 32
MAX_HF_TOKENS = 512
KNOWLEDGE_ENCODINGS = ("kar", "answer", "split")


# --------------------------------------------------------------------------- keys


def text_key(text: str) -> str:
    """sha256 hex digest of the UTF-8 text (the cache key of one text)."""
    return text_sha256(text)


ENCODER_DTYPE_ENV = "RLRF4REC_ENCODER_DTYPE"
"""``float32`` or ``bfloat16``: the encoder's dtype whatever the CPU (``bench_flow --before``
sets ``float32``, the encoder's dtype before bf16)."""


def encoder_dtype() -> DtypeName:
    """The dtype the encoder computes in: :data:`ENCODER_DTYPE_ENV` when set, else the CPU's
    (:func:`tasks.common.hardware.cpu_dtype`)."""
    return pinned_or_cpu_dtype(ENCODER_DTYPE_ENV).name


def encoder_key(encoder: str = DEFAULT_ENCODER) -> str:
    """Folder name of an encoder's cache: ``<name>-<12 hex of its resolved folder>`` (and of
    the dtype when it is not fp32: fp32 keeps the keys of caches written before bf16)."""
    resolved = encoder_model(encoder)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved.rstrip("/")).name or encoder)[:60]
    dtype = encoder_dtype()
    suffix = "" if dtype == "float32" else f"|{dtype}"
    digest = text_sha256(f"{resolved}|mean-windowed{suffix}")[:12]
    return f"{name}-{digest}"


# --------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=4)
def _load_encoder(resolved: str):
    """Load an encoder once per process: ``("st", model, None)`` or ``("hf", model, tok)``."""
    import torch

    if (Path(resolved) / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(resolved, device="cpu")
        model.eval()
        return "st", model, None
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved)
    model = AutoModel.from_pretrained(resolved, dtype=torch.float32)
    model.eval()
    return "hf", model, tok


def _hf_max_length(tok) -> int:
    limit = getattr(tok, "model_max_length", MAX_HF_TOKENS) or MAX_HF_TOKENS
    return int(min(limit, MAX_HF_TOKENS))


def _encoder_parts(kind: str, model, tok):
    """(transformer, tokenizer, max tokens per window, L2-normalise?) of a loaded encoder."""
    if kind == "st":
        first = model[0]
        normalize = any(type(m).__name__ == "Normalize" for m in model)
        max_len = int(getattr(first, "max_seq_length", None) or MAX_HF_TOKENS)
        return first.auto_model, first.tokenizer, max_len, normalize
    return model, tok, _hf_max_length(tok), False


def _encode_uncached(
    texts: list[str], resolved: str, batch_size: int, show_progress: bool
) -> np.ndarray:
    """Run the encoder on ``texts``: ``[len(texts), dim]`` float32 (no cache).

    Mean pooling over *all* tokens of a text: a text longer than the encoder's window (256
    tokens for all-MiniLM-L6-v2, 512 for BERT) is cut into consecutive windows, each encoded
    with its own special tokens, and the token embeddings of all windows are averaged. Plain
    truncation would drop the LLM's answer, which comes after a long profile-and-history
    prefix, and make every sample of a user encode the same. A text that fits one window
    gives exactly the encoder's usual output (then L2-normalised where the
    sentence-transformers pipeline normalises). Computed under bf16 autocast when
    :func:`encoder_dtype` is bf16.
    """
    import torch
    from tqdm.auto import tqdm

    kind, model, tok = _load_encoder(resolved)
    net, tok, max_len, normalize = _encoder_parts(kind, model, tok)
    enc = tok(
        list(texts),
        truncation=True,
        max_length=max_len,
        return_overflowing_tokens=True,
        stride=0,
        padding=False,
    )
    windows = enc["input_ids"]
    owner = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)  # [windows]
    sums = np.zeros((len(texts), net.config.hidden_size), dtype=np.float64)
    counts = np.zeros(len(texts), dtype=np.float64)
    order = np.argsort([-len(w) for w in windows], kind="stable")  # similar lengths together
    starts = range(0, len(windows), batch_size)
    bf16 = encoder_dtype() == "bfloat16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in tqdm(starts, desc="encode", disable=not show_progress):
            idx = order[start : start + batch_size]
            batch = tok.pad({"input_ids": [windows[i] for i in idx]}, return_tensors="pt")
            hidden = net(**batch).last_hidden_state  # [b, T, H]
            hidden = hidden.float()  # bf16 under autocast: pooled in fp32
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
            np.add.at(sums, owner[idx], (hidden * mask).sum(1).double().numpy())
            np.add.at(counts, owner[idx], mask.sum((1, 2)).double().numpy())
    out = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def encoder_dim(encoder: str = DEFAULT_ENCODER) -> int:
    """Output width of an encoder (loads it)."""
    kind, model, _ = _load_encoder(encoder_model(encoder))
    if kind == "st":
        return int(model.get_sentence_embedding_dimension())
    return int(model.config.hidden_size)


# --------------------------------------------------------------------------- cache


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def _drop_part(part: Path, reason: str) -> None:
    """Remove a cache part that cannot be read as vectors (parts are written atomically, so a
    bad one is damaged for good); its texts are then encoded again."""
    log.warning(
        "ignoring embeddings cache part %s (%s): removed, its texts will be encoded again",
        part,
        reason,
    )
    part.unlink(missing_ok=True)


def _part_problem(frame: pl.DataFrame) -> str | None:
    """Why a part's rows are not cache vectors (None: they are)."""
    if frame.schema.get("key") != pl.Utf8:
        return f"no Utf8 'key' column: {dict(frame.schema)}"
    vector = frame.schema.get("vector")
    if not isinstance(vector, pl.List | pl.Array) or not vector.inner.is_float():
        return f"no List[Float] 'vector' column: {dict(frame.schema)}"
    lengths = frame["vector"].cast(pl.List(pl.Float32)).list.len()
    if frame["key"].null_count() or lengths.null_count():
        return "null keys or vectors"
    if frame.height and lengths.min() != lengths.max():
        return "vectors of different lengths"
    return None


def _load_parts(folder: Path, keys: set[str] | None = None) -> pl.DataFrame:
    """The rows (only ``keys`` when given) of every cache part, the first of each key kept.

    A part that is empty, corrupt or not in the cache schema is never read as vectors: it is
    removed with a warning naming it (:func:`_drop_part`). A part that vanished while being
    read (a concurrent compaction) makes the listing be taken again, once.
    """
    for attempt in range(2):
        frames: list[pl.DataFrame] = []
        vanished = False
        for part in _parts(folder):
            try:
                scan = pl.scan_parquet(part)
                if keys is not None:
                    scan = scan.filter(pl.col("key").is_in(list(keys)))
                frame = scan.collect()
            except (OSError, pl.exceptions.PolarsError) as exc:
                if not part.exists():
                    vanished = True
                else:
                    _drop_part(part, (str(exc).strip().splitlines() or [type(exc).__name__])[0])
                continue
            problem = _part_problem(frame)
            if problem is None and frames and frame.height and frames[0].height:
                if frame["vector"].list.len()[0] != frames[0]["vector"].list.len()[0]:
                    problem = "vectors of another length than the other parts'"
            if problem is not None:
                _drop_part(part, problem)
                continue
            frames.append(frame.select(pl.col("key"), pl.col("vector").cast(pl.List(pl.Float32))))
        if not vanished or attempt:
            break
        time.sleep(0.1)  # a concurrent compaction removed a part: list again
    if not frames:
        return pl.DataFrame(schema={"key": pl.Utf8, "vector": pl.List(pl.Float32)})
    return pl.concat(frames).unique("key", keep="first", maintain_order=True)


def _read_cache(folder: Path, keys: set[str]) -> dict[str, np.ndarray]:
    """Cached vectors for ``keys`` found in ``folder`` (bad parts are skipped and removed)."""
    frame = _load_parts(folder, keys)
    if frame.height == 0:
        return {}
    mat = _matrix(frame["vector"])
    return dict(zip(frame["key"].to_list(), mat, strict=True))


def _append_cache(folder: Path, keys: list[str], vectors: np.ndarray) -> None:
    part = folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    write_parquet(vectors_frame(keys, vectors, id_col="key", id_dtype=pl.Utf8), part)
    parts = _parts(folder)
    if len(parts) > MAX_PARTS:
        merged = _load_parts(folder)
        target = folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-compact.parquet"
        write_parquet(merged, target)
        for p in parts:
            p.unlink(missing_ok=True)
        log.info("compacted %d cache parts into %s (%d vectors)", len(parts), target, len(merged))


@releases_memory
def encode_texts(
    texts: Sequence[str],
    encoder: str = DEFAULT_ENCODER,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    show_progress: bool = False,
    use_cache: bool = True,
) -> np.ndarray:
    """Encode texts with mean pooling, through the cache.

    Args:
        texts: the texts; duplicates are encoded once.
        encoder: ``"all-MiniLM-L6-v2"`` (default), a local model folder or a Hugging Face id.
        cache_dir: root of the embedding cache (default
        ``tasks.data.assets.cache_dir()/embeddings``).
        batch_size: texts per encoder forward pass.
        show_progress: show a progress bar while encoding.
        use_cache: False skips reading and writing the cache.

    Returns:
        ``[len(texts), dim]`` float32, row ``i`` the vector of ``texts[i]``.
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolved = encoder_model(encoder)
    keys = [text_key(t) for t in texts]
    unique: dict[str, str] = dict(zip(keys, texts, strict=True))
    found: dict[str, np.ndarray] = {}
    folder: Path | None = None
    if use_cache:
        root = Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "embeddings"
        folder = root / encoder_key(encoder)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "encoder.json").is_file():
            write_json({"encoder": encoder, "resolved": resolved}, folder / "encoder.json")
        found = _read_cache(folder, set(unique))
    missing = [k for k in unique if k not in found]
    log.info(
        "encode_texts: %d texts, %d distinct, %d cached, %d to encode (%s)",
        len(texts),
        len(unique),
        len(unique) - len(missing),
        len(missing),
        Path(resolved).name,
    )
    if missing:
        vecs = _encode_uncached([unique[k] for k in missing], resolved, batch_size, show_progress)
        found.update(zip(missing, vecs, strict=True))
        if folder is not None:
            _append_cache(folder, missing, vecs)
    if not texts:
        return np.zeros((0, encoder_dim(encoder)), dtype=np.float32)
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)


def encode_knowledge(
    prefixes: Sequence[str],
    answers: Sequence[str],
    encoder: str = DEFAULT_ENCODER,
    encoding: str = "kar",
) -> np.ndarray:
    """Knowledge vectors of (profile-and-history prefix, LLM answer) pairs: ``[n, dim]`` float32.

    ``encoding`` says what the encoder reads:

    - ``kar`` (KAR and the paper): one text, ``prefix + ". " + answer``, mean-pooled over all
      its tokens; the answer is a small share of them (a 96-token answer after a ~315-token
      prefix), so different answers of one user give nearly the same vector;
    - ``answer``: the answer alone (the history reaches the reranker only through its items);
    - ``split``: the prefix and the answer encoded apart, L2-normalised, averaged and
      normalised again: the answer weighs as much as the whole history.
    """
    from tasks.rlrf4rec.prompts import knowledge_text

    if encoding not in KNOWLEDGE_ENCODINGS:
        raise ValueError(
            f"encoding must be one of {', '.join(KNOWLEDGE_ENCODINGS)}, got {encoding!r}"
        )
    if len(prefixes) != len(answers):
        raise ValueError(
            f"prefixes ({len(prefixes)}) and answers ({len(answers)}) differ in length"
        )
    if encoding == "kar":
        return encode_texts(
            [knowledge_text(p, a) for p, a in zip(prefixes, answers, strict=True)], encoder
        )
    answer_vecs = encode_texts([a.strip() for a in answers], encoder)
    if encoding == "answer":
        return answer_vecs
    both = _unit(encode_texts(list(prefixes), encoder)) + _unit(answer_vecs)
    return _unit(both).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# --------------------------------------------------------------------------- frames


def item_texts(items: pl.DataFrame) -> list[str]:
    """Item text for items without generated knowledge: ``"<title>; genres: A, B"``.

    Args:
        items: ``items.parquet`` rows (``title`` Utf8, ``genres`` List[Utf8]), in their order.
    """
    for col in ("title", "genres"):
        if col not in items.columns:
            raise ValueError(f"items has no {col!r} column (expected items.parquet)")
    out = []
    for title, genres in zip(items["title"].to_list(), items["genres"].to_list(), strict=True):
        genres = [g for g in (genres or []) if g]
        out.append(f"{title}; genres: {', '.join(genres)}" if genres else str(title))
    return out


def vectors_frame(
    ids: Sequence, vectors: np.ndarray, id_col: str = "user_id", id_dtype=pl.Int64
) -> pl.DataFrame:
    """``{id_col, vector: List[Float32]}`` from ids and a ``[n, dim]`` matrix."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"vectors must be [{len(ids)}, dim], got shape {vectors.shape}")
    return pl.DataFrame(
        {
            id_col: pl.Series(id_col, list(ids), dtype=id_dtype),
            "vector": pl.Series(
                "vector", vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])
            ).cast(pl.List(pl.Float32)),
        }
    )


def _matrix(col: pl.Series) -> np.ndarray:
    """A List/Array[Float] column of equal-length rows -> ``[n, dim]`` float32."""
    n = col.len()
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(col.dtype, pl.Array):
        col = col.cast(pl.List(pl.Float32))
    if not isinstance(col.dtype, pl.List):
        raise ValueError(f"column {col.name!r} must be a List or Array of floats, got {col.dtype}")
    lengths = col.list.len()
    if lengths.null_count() or lengths.min() != lengths.max():
        raise ValueError(f"column {col.name!r}: vectors must all have the same length")
    dim = int(lengths[0])
    flat = col.explode().to_numpy()
    return np.array(flat, dtype=np.float32).reshape(n, dim)  # a writable copy


def frame_vectors(frame: pl.DataFrame, col: str = "vector") -> np.ndarray:
    """The ``[rows, dim]`` float32 matrix of a vector column (List or Array of floats)."""
    if col not in frame.columns:
        raise ValueError(f"frame has no {col!r} column (columns: {frame.columns})")
    return _matrix(frame[col])


def encode_frame(
    frame: pl.DataFrame,
    id_col: str = "user_id",
    text_col: str = "text",
    encoder: str = DEFAULT_ENCODER,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> pl.DataFrame:
    """Encode ``frame[text_col]``: returns ``{id_col, vector}`` in the frame's order."""
    for col in (id_col, text_col):
        if col not in frame.columns:
            raise ValueError(f"frame has no {col!r} column (columns: {frame.columns})")
    vecs = encode_texts(
        frame[text_col].to_list(), encoder, cache_dir, batch_size, show_progress=show_progress
    )
    return vectors_frame(frame[id_col].to_list(), vecs, id_col, frame.schema[id_col])


__all__ = [
    "KNOWLEDGE_ENCODINGS",
    "encode_frame",
    "encode_knowledge",
    "encode_texts",
    "encoder_dim",
    "ENCODER_DTYPE_ENV",
    "encoder_dtype",
    "encoder_key",
    "frame_vectors",
    "item_texts",
    "text_key",
    "vectors_frame",
]
