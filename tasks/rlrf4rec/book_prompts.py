"""KAR's Amazon-Books prompts, word for word (``preprocess/generate_data_and_prompt.py``).

KAR builds the user prompt as ``'Given user\\'s book rating history: ' + ''.join(history_texts)
+ prompt`` with one ``'"{title}", {rating} stars; '`` per history item (``int(rating)``, so
"1 stars"), and encodes ``pure_hist + '. ' + answer`` where ``pure_hist`` is the prompt up to
its last ``;`` (``knowledge_encoding/lm_encoding.py``). In this project's terms
(:func:`tasks.rlrf4rec.prompts.prompt_table`): ``prefix`` is the head and the history entries
joined by ``"; "``, the prompt is ``prefix + "; " + instruction`` (KAR's text exactly, the
instruction's unclosed parenthesis included), and the knowledge text ``prefix + ". " + answer``
(:func:`tasks.rlrf4rec.prompts.knowledge_text`) is KAR's.

The item prompt names the item's brand: ``items.parquet`` of the ``kar`` Amazon build has a
``brand`` column (:func:`tasks.data.datasets.load_amazon_books_kar`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from tasks.llm.chat import load_tokenizer
from tasks.rlrf4rec.prompts import HistoryEntry, fit_history, user_histories

KAR_BOOK_USER_HEAD = "Given user's book rating history: "
KAR_BOOK_INSTRUCTION = (
    "Analyze user's preferences on books about factors like genre, author, writing style, "
    "theme, setting, length and complexity, time period, literary quality, critical acclaim "
    "(Provide clear explanations based on relevant details from the user's book viewing "
    "history and other pertinent factors."
)
KAR_BOOK_ITEM_PROMPT = (
    "Introduce book {title}, which is from brand {brand} and describe its attributes including "
    "but not limited to genre, author, writing style, theme, setting, length and complexity, "
    "time period, literary quality, critical acclaim."
)


def kar_book_prefix(history: Sequence[HistoryEntry]) -> str:
    """The head and the history, ``"title", r stars`` joined by ``"; "`` (KAR's ``pure_hist``)."""
    return KAR_BOOK_USER_HEAD + "; ".join(f'"{h.title}", {int(h.rating)} stars' for h in history)


def kar_book_prompt(history: Sequence[HistoryEntry]) -> str:
    """KAR's book user prompt: ``prefix + "; " + instruction``."""
    if not history:
        return KAR_BOOK_USER_HEAD + KAR_BOOK_INSTRUCTION
    return kar_book_prefix(history) + "; " + KAR_BOOK_INSTRUCTION


def kar_book_item_prompt(title: str, brand: str) -> str:
    """KAR's book item prompt for one title and brand."""
    return KAR_BOOK_ITEM_PROMPT.format(title=title, brand=brand)


def kar_book_prompt_table(
    users: pl.DataFrame,
    history: pl.DataFrame,
    items: pl.DataFrame,
    dataset: str = "amazon-books",
    user_ids: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer: Any = None,
) -> pl.DataFrame:
    """:func:`tasks.rlrf4rec.prompts.prompt_table` with KAR's book prompts (same arguments and
    columns: ``user_id``, ``split``, ``prefix``, ``prompt``; ``dataset`` is unused)."""
    del dataset
    if max_prompt_tokens is not None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        tokenizer = load_tokenizer(tokenizer)
    by_user = user_histories(history, items)
    selected = users if user_ids is None else users.filter(pl.col("user_id").is_in(list(user_ids)))
    rows = []
    for user in selected.sort("user_id").iter_rows(named=True):
        entries = by_user.get(user["user_id"], [])
        if max_prompt_tokens is not None:
            entries = fit_history(entries, max_prompt_tokens, tokenizer, kar_book_prompt)
        rows.append(
            {
                "user_id": user["user_id"],
                "split": user.get("split"),
                "prefix": kar_book_prefix(entries),
                "prompt": kar_book_prompt(entries),
            }
        )
    return pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "split": pl.Utf8, "prefix": pl.Utf8, "prompt": pl.Utf8},
    )


def kar_book_item_prompt_table(
    items: pl.DataFrame, item_ids: Sequence[int] | None = None
) -> pl.DataFrame:
    """One KAR book item prompt per item (``items`` needs ``brand``): ``item_id``, ``prompt``."""
    if "brand" not in items.columns:
        raise ValueError("items has no 'brand' column (prepare amazon-books with the kar build)")
    selected = items if item_ids is None else items.filter(pl.col("item_id").is_in(list(item_ids)))
    selected = selected.sort("item_id")
    prompts = [
        kar_book_item_prompt(t, b)
        for t, b in zip(selected["title"].to_list(), selected["brand"].to_list(), strict=True)
    ]
    return pl.DataFrame(
        {"item_id": selected["item_id"], "prompt": prompts},
        schema={"item_id": pl.Int64, "prompt": pl.Utf8},
    )
