from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.common.hardware import DTYPE_ENV
from tasks.data.assets import MANIFEST
from tasks.rlrf4rec import encode
from tasks.rlrf4rec.encode import (
    ENCODER_DTYPE_ENV,
    encode_texts,
    encoder_dtype,
    encoder_key,
    frame_vectors,
    item_texts,
    text_key,
    vectors_frame,
)

TEXTS = ["A user who loves film noir.", "Space operas and robots.", "A user who loves film noir."]


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the texts that reach the encoder model."""
    calls: list[int] = []
    real = encode._encode_uncached

    def spy(texts, *args, **kwargs):
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(encode, "_encode_uncached", spy)
    return calls


def test_encode_shapes_and_duplicates(encoder_path: str, tmp_path: Path, counting) -> None:
    vecs = encode_texts(TEXTS, encoder_path, cache_dir=tmp_path)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # MiniLM normalises
    assert np.array_equal(vecs[0], vecs[2])
    assert counting == [2]  # the duplicate is encoded once


def test_cache_hit_encodes_nothing(encoder_path: str, tmp_path: Path, counting) -> None:
    first = encode_texts(TEXTS, encoder_path, cache_dir=tmp_path)
    again = encode_texts(list(reversed(TEXTS)), encoder_path, cache_dir=tmp_path)
    assert counting == [2]  # second call: all hits
    assert np.array_equal(again, first[::-1])
    more = encode_texts(["Space operas and robots.", "Westerns only."], encoder_path, tmp_path)
    assert counting == [2, 1]  # only the new text
    assert np.array_equal(more[0], first[1])
    folder = tmp_path / encoder_key(encoder_path)
    assert len(list(folder.glob("part-*.parquet"))) == 2
    stored = pl.read_parquet(list(folder.glob("part-*.parquet")))
    assert set(stored["key"]) == {text_key(t) for t in [*TEXTS, "Westerns only."]}
    # the default encoder id resolves to the same folder, hence the same cache
    assert encoder_key("all-MiniLM-L6-v2") == encoder_key(encoder_path)


def test_compaction_keeps_everything(
    encoder_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode, "MAX_PARTS", 2)
    texts = [f"text number {i}" for i in range(4)]
    for t in texts:
        encode_texts([t], encoder_path, cache_dir=tmp_path)
    folder = tmp_path / encoder_key(encoder_path)
    assert len(list(folder.glob("part-*.parquet"))) <= 2
    assert pl.read_parquet(list(folder.glob("part-*.parquet"))).height == 4


# the sentence-transformers files, and the asset cache's manifest that lists them
PLAIN_HF_LEAVES_OUT = ("modules.json", "sentence_bert_config.json", MANIFEST)


def test_plain_hf_encoder_mean_pooling(encoder_path: str, tmp_path: Path) -> None:
    # the same weights without the sentence-transformers files: a plain HF encoder
    plain = tmp_path / "plain-bert"
    plain.mkdir()
    for f in Path(encoder_path).iterdir():
        if f.is_file() and f.name not in PLAIN_HF_LEAVES_OUT:
            shutil.copy(f, plain / f.name)
    assert encoder_key(str(plain)) != encoder_key(encoder_path)
    raw = encode_texts(TEXTS[:2], str(plain), cache_dir=tmp_path)
    st = encode_texts(TEXTS[:2], encoder_path, cache_dir=tmp_path)
    assert raw.shape == (2, 384)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # no normalisation
    normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert np.allclose(normed, st, atol=1e-4)  # MiniLM = mean pooling + L2 norm


def test_item_texts_and_vector_frames() -> None:
    items = pl.DataFrame(
        {
            "item_id": [1, 2],
            "title": ["American President, The (1995)", "Heat (1995)"],
            "genres": [["Comedy", "Drama"], []],
        }
    )
    assert item_texts(items) == [
        "American President, The (1995); genres: Comedy, Drama",
        "Heat (1995)",
    ]
    mat = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = vectors_frame([7, 9], mat)
    assert frame.schema == pl.Schema({"user_id": pl.Int64, "vector": pl.List(pl.Float32)})
    assert np.array_equal(frame_vectors(frame), mat)
    with pytest.raises(ValueError, match="same length"):
        frame_vectors(pl.DataFrame({"vector": [[1.0], [1.0, 2.0]]}))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encode_texts(["ok", 3], cache_dir=tmp_path)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        encode_texts(["ok"], batch_size=0, cache_dir=tmp_path)


def test_long_text_keeps_its_tail(encoder_path: str, tmp_path, monkeypatch) -> None:
    """Texts past the encoder's 256-token window differ by their ends (no truncation), and a
    short text encodes exactly as sentence-transformers does (in fp32)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from tasks.rlrf4rec.encode import encode_texts

    monkeypatch.setenv(DTYPE_ENV, "float32")
    prefix = "Given a male user who is aged 24, this user's history is listed below. " * 40
    texts = [prefix + "He loves slapstick comedy.", prefix + "He hates horror films.", "short"]
    vecs = encode_texts(texts, encoder_path, cache_dir=tmp_path)
    assert not np.allclose(vecs[0], vecs[1], atol=1e-4)
    reference = SentenceTransformer(encoder_path, device="cpu").encode(["short"])
    np.testing.assert_allclose(vecs[2], reference[0], atol=1e-5)


def test_bf16_encoding_is_close_to_fp32_and_cached_apart(
    encoder_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["A user who loves film noir.", "He hates horror films. " * 30]
    monkeypatch.setenv(DTYPE_ENV, "float32")
    fp32, fp32_key = encode_texts(texts, encoder_path, tmp_path), encoder_key(encoder_path)
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert encoder_dtype() == "bfloat16" and encoder_key(encoder_path) != fp32_key
    bf16 = encode_texts(texts, encoder_path, tmp_path)  # not served from the fp32 entries
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # computed in bf16
    # unit vectors: bf16 moves each by about 0.006 (the distance between two samples of one
    # user is about 0.46 on the quick profile)
    assert np.linalg.norm(bf16 - fp32, axis=1).max() < 0.03
    assert np.array_equal(encode_texts(texts, encoder_path, tmp_path), bf16)  # cached
    monkeypatch.setenv(ENCODER_DTYPE_ENV, "float32")  # the encoder alone back in fp32
    assert encoder_dtype() == "float32" and encoder_key(encoder_path) == fp32_key
    monkeypatch.setenv(ENCODER_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="RLRF4REC_ENCODER_DTYPE='fp16'"):
        encoder_dtype()


def test_knowledge_encodings(encoder_path: str, tmp_path: Path, monkeypatch) -> None:
    from tasks.data import assets
    from tasks.rlrf4rec.encode import encode_knowledge
    from tasks.rlrf4rec.prompts import knowledge_text

    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    prefix = "User 7 is 34, an engineer, and rated: " + "; ".join(
        f"Film {i} (199{i % 10}), {i % 5 + 1} stars" for i in range(30)
    )
    answers = ["Loves fast action and car chases.", "Prefers slow romantic dramas."]
    prefixes = [prefix, prefix]
    kar = encode_knowledge(prefixes, answers, encoder_path, "kar")
    assert np.allclose(
        kar, encode_texts([knowledge_text(prefix, a) for a in answers], encoder_path)
    )
    alone = encode_knowledge(prefixes, answers, encoder_path, "answer")
    assert np.allclose(alone, encode_texts(answers, encoder_path))
    split = encode_knowledge(prefixes, answers, encoder_path, "split")
    p_vec = encode_texts([prefix], encoder_path)[0]
    expected = p_vec / np.linalg.norm(p_vec) + alone[0] / np.linalg.norm(alone[0])
    assert np.allclose(split[0], expected / np.linalg.norm(expected), atol=1e-6)
    assert split.shape == kar.shape == (2, 384)

    def cos(v: np.ndarray) -> float:
        return float(v[0] @ v[1] / np.linalg.norm(v[0]) / np.linalg.norm(v[1]))

    # the long prefix drowns the answers in KAR's text; apart, they stay apart
    assert cos(alone) < cos(split) < cos(kar)
    with pytest.raises(ValueError, match="encoding must be one of"):
        encode_knowledge(prefixes, answers, encoder_path, "concat")
    with pytest.raises(ValueError, match="differ in length"):
        encode_knowledge(prefixes[:1], answers, encoder_path)


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A stand-in encoder (no model): a text's vector is [len(text), 1, 0]; records calls."""
    calls: list[list[str]] = []

    def fake(texts, *args, **kwargs):
        calls.append(list(texts))
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)

    monkeypatch.setattr(encode, "encoder_model", lambda spec=None: "/fake/encoder")
    monkeypatch.setattr(encode, "_encode_uncached", fake)
    return calls


@pytest.mark.parametrize(
    "damage",
    [
        b"",  # empty
        b"PAR1 this is not a parquet file",  # corrupt
        "other-schema",  # readable parquet, but not cache vectors
    ],
    ids=["empty", "corrupt", "other-schema"],
)
def test_bad_cache_part_is_ignored_and_rebuilt(
    tmp_path: Path, fake_encoder, caplog: pytest.LogCaptureFixture, damage
) -> None:
    first = encode_texts(TEXTS, cache_dir=tmp_path)
    folder = tmp_path / encoder_key()
    (part,) = folder.glob("part-*.parquet")
    if damage == "other-schema":
        pl.DataFrame({"key": [1, 2], "vector": ["a", "b"]}).write_parquet(part)
    else:
        part.write_bytes(damage)
    again = encode_texts(TEXTS, cache_dir=tmp_path)
    assert np.array_equal(again, first)
    assert fake_encoder == [TEXTS[:2], TEXTS[:2]]  # encoded again, never read from the bad part
    assert f"ignoring embeddings cache part {part}" in caplog.text
    assert not part.exists()
    # the rebuilt part serves the next call
    encode_texts(TEXTS, cache_dir=tmp_path)
    assert len(fake_encoder) == 2


def test_compaction_skips_a_bad_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "MAX_PARTS", 2)
    vec = np.ones((1, 3), dtype=np.float32)
    encode._append_cache(tmp_path, ["k1"], vec)
    (tmp_path / "part-00000000000000000001-bad.parquet").write_bytes(b"")
    encode._append_cache(tmp_path, ["k2"], vec * 2)  # three parts: compaction
    (part,) = tmp_path.glob("part-*.parquet")
    assert part.name.endswith("-compact.parquet")
    assert sorted(pl.read_parquet(part)["key"]) == ["k1", "k2"]
