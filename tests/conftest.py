"""Shared fixtures: tiny hand-made data sets in each supported format."""

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


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory: pytest.TempPathFactory, default_policy_path: str) -> str:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer and chat template (random weights)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    tok = AutoTokenizer.from_pretrained(default_policy_path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
