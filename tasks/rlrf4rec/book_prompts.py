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
``brand`` column (:func:`tasks.data.amazon_books.load_amazon_books_kar`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from tasks.rlrf4rec.prompts import HistoryEntry, user_prompt_table

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
    return user_prompt_table(
        users, history, items, lambda _, e: (kar_book_prefix(e), kar_book_prompt(e)),
        user_ids=user_ids, max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer,
    )  # fmt: skip


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
