"""Shared fixtures: tiny hand-made data sets in each supported format, and the tiny reranker
set-up (:func:`make_run`, :func:`random_vectors`, ``DIM``, ``FAST``) that the reranker, reward
and model tests import from here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENRES19 = ["0"] * 19

N_USERS, N_ITEMS, PER_USER = 6, 40, 20


def _ratings(
    n_users: int = N_USERS, per_user: int = PER_USER, n_items: int = N_ITEMS
) -> list[tuple[int, int, int, int]]:
    """Deterministic (user, item, rating, timestamp) rows; user u rates items u, u+3, ..."""
    rows = []
    for u in range(1, n_users + 1):
        for k in range(per_user):
            item = (u + 3 * k) % n_items + 1
            rows.append((u, item, 1 + (u + k) % 5, 880000000 + 1000 * u + 10 * (per_user - k)))
    return rows


def write_grouplens(
    d: Path, n_users: int = N_USERS, n_items: int = N_ITEMS, per_user: int = PER_USER
) -> Path:
    """Write a tiny MovieLens-100K folder in the GroupLens layout into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.user").write_text(
        "".join(
            f"{u}|{20 + u % 40}|{'MF'[u % 2]}|student|0213{u % 10}\n" for u in range(1, n_users + 1)
        )
    )
    items = []
    for i in range(1, n_items + 1):
        flags = list(GENRES19)
        flags[1 + i % 18] = "1"
        title = "American President, The (1995)" if i == 7 else f"Movie {i} (19{50 + i % 50})"
        items.append(f"{i}|{title}|01-Jan-1995||http://x|{'|'.join(flags)}\n")
    (d / "u.item").write_text("".join(items), encoding="latin-1")
    rows = _ratings(n_users, per_user, n_items)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return d


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    """A tiny MovieLens-100K folder in the GroupLens layout (6 users, 40 items)."""
    return write_grouplens(tmp_path / "ml-100k")


@pytest.fixture
def ml1m_dir(tmp_path: Path) -> Path:
    """A tiny MovieLens-1M folder (``::``-separated, latin-1)."""
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "users.dat").write_text(
        "".join(f"{u}::{'MF'[u % 2]}::25::{u % 21}::0213{u}\n" for u in range(1, N_USERS + 1))
    )
    movies = []
    for i in range(1, N_ITEMS + 1):
        title = "Amélie, Le fabuleux destin d' (2001)" if i == 3 else f"Film {i} (19{50 + i})"
        movies.append(f"{i}::{title}::Comedy|Romance\n")
    (d / "movies.dat").write_text("".join(movies), encoding="latin-1")
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _ratings()))
    return d


@pytest.fixture
def amazon_dir(tmp_path: Path) -> Path:
    """A tiny Amazon-Books 2018 folder (reviews + metadata JSON lines)."""
    d = tmp_path / "amazon"
    d.mkdir()
    meta = [
        {"asin": f"B{i:04d}", "title": f"Book, Number {i}", "category": ["Books", "Fiction"]}
        for i in range(1, N_ITEMS + 1)
    ]
    (d / "meta_Books.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    reviews = [
        {"reviewerID": f"U{u}", "asin": f"B{i:04d}", "overall": float(r), "unixReviewTime": t}
        for u, i, r, t in _ratings()
    ]
    # One user with a single review: removed by the 5-core filter.
    reviews.append({"reviewerID": "ULONE", "asin": "B0001", "overall": 5.0, "unixReviewTime": 1})
    (d / "Books.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    return d


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def default_policy_path() -> str:
    """The real default policy LLM (SmolLM2-135M-Instruct), built once into the asset cache."""
    from tasks.data.assets import policy_model

    return policy_model()


@pytest.fixture(scope="session")
def encoder_path() -> str:
    """The real default knowledge encoder (all-MiniLM-L6-v2) from the asset cache."""
    from tasks.data.assets import encoder_model

    return encoder_model()


# NO_TOP_P: the flow tests on the tiny LLM sample with top_p 1.0. Its random weights give a
# nearly flat distribution over the 49,152-token vocabulary, and transformers' top-p sorts all
# of it at every step: two thirds of a tiny flow's sampling time (torch profiler: aten::sort
# 66% of the CPU time of `generate` for 8 prompts x 3 samples). No test reads the nucleus.


def tiny_lm_config(config_cls: type, *, vocab_size: int, layers: int = 2, hidden: int = 64,
                   heads: int = 4, kv_heads: int = 2, **extra):  # fmt: skip
    """A tiny decoder config of ``config_cls`` (LlamaConfig, Qwen2Config): ``layers`` x
    ``hidden`` wide (MLP 2x), ``heads`` query and ``kv_heads`` key/value heads; ``extra`` set
    as given (token ids, head_dim, context length, tied embeddings, dtype)."""
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **extra,
    )


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory, default_policy_path: str) -> str:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer and chat template (random weights)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    tok = AutoTokenizer.from_pretrained(default_policy_path)
    cfg = tiny_lm_config(
        LlamaConfig,
        vocab_size=len(tok),
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def broken_config_llm(tmp_path: Path, tiny_llm_path: str) -> Path:
    """The tiny model's files, linked, with its ``config.json`` cut in the middle."""
    model = tmp_path / "broken-model"
    model.mkdir()
    for f in Path(tiny_llm_path).iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    text = (Path(tiny_llm_path) / "config.json").read_text()
    (model / "config.json").write_text(text[: len(text) // 2])
    return model


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API on SQLite for the whole session (about 6 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: the tiny models gain nothing from two, and on a
    CPU shared with other jobs two threads thrash (several-fold slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- tiny reranker runs

RERANK_USERS, RERANK_ITEMS, RERANK_PER_USER = 16, 60, 34
DIM = 8  # width of the user and item vectors of :func:`random_vectors`
# A TrainConfig that trains the tiny rerankers in seconds (``TrainConfig(**FAST, ...)``).
FAST = {
    "epochs": 3,
    "batch_size": 8,
    "patience": 2,
    "expert_hidden": 16,
    "lr": 5e-3,
    "num_threads": 1,
}


def make_run(root: Path) -> Path:
    """A prepared run: 16 users x 34 ratings, 60 items; 4 lists per user; 9/3/4 users in
    train/valid/test. Users like items of their own parity (a learnable signal)."""
    from tasks.data.lists import ListsConfig
    from tasks.data.prepare import prepare

    src = root / "ml-100k"
    src.mkdir(parents=True)
    (src / "u.user").write_text(
        "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|writer|0{u:04d}\n" for u in range(1, RERANK_USERS + 1))
    )
    lines = []
    for i in range(1, RERANK_ITEMS + 1):
        f = ["0"] * 19
        f[1 + i % 5] = "1"
        lines.append(f"{i}|Film {i} (19{40 + i})|01-Jan-1990||http://x|{'|'.join(f)}\n")
    (src / "u.item").write_text("".join(lines), encoding="latin-1")
    rows = []
    for u in range(1, RERANK_USERS + 1):
        for k in range(RERANK_PER_USER):
            item = (u * 7 + k * 13) % RERANK_ITEMS + 1
            rating = 5 if item % 2 == u % 2 else 2
            rows.append(f"{u}\t{item}\t{rating}\t{880000000 + 1000 * u + k}\n")
    (src / "u.data").write_text("".join(rows))
    run = root / "run"
    prepare("ml-100k", run, src, ListsConfig(seed=3, test_frac=0.25, valid_frac=0.25))
    return run


def random_vectors(run: Path, seed: int = 0):
    """User vectors (``DIM`` wide) that carry the user's parity, and random item vectors:
    ``(users, items)`` frames of :func:`tasks.rlrf4rec.encode.vectors_frame`."""
    import numpy as np

    from tasks.data.prepare import load_prepared
    from tasks.rlrf4rec.encode import vectors_frame

    data = load_prepared(run)
    rng = np.random.default_rng(seed)
    uids = data.users["user_id"].to_numpy()
    user = rng.normal(size=(len(uids), DIM)).astype(np.float32)
    user[:, 0] = np.where(uids % 2 == 0, 2.0, -2.0)
    iids = data.items["item_id"].to_numpy()
    item = rng.normal(size=(len(iids), DIM)).astype(np.float32)
    return vectors_frame(uids, user), vectors_frame(iids, item, id_col="item_id")
