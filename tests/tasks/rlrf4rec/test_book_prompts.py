"""KAR's Amazon-Books prompts, word for word."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.rlrf4rec.book_prompts import (
    kar_book_item_prompt,
    kar_book_item_prompt_table,
    kar_book_prefix,
    kar_book_prompt,
    kar_book_prompt_table,
)
from tasks.rlrf4rec.prompts import HistoryEntry, knowledge_text

# KAR's generate_data_and_prompt.py for two history items, written out.
KAR_USER_PROMPT = (
    'Given user\'s book rating history: "Dune", 5 stars; "Emma; A Novel", 1 stars; Analyze '
    "user's preferences on books about factors like genre, author, writing style, theme, "
    "setting, length and complexity, time period, literary quality, critical acclaim (Provide "
    "clear explanations based on relevant details from the user's book viewing history and "
    "other pertinent factors."
)
KAR_ITEM_PROMPT = (
    "Introduce book Dune, which is from brand Frank Herbert and describe its attributes "
    "including but not limited to genre, author, writing style, theme, setting, length and "
    "complexity, time period, literary quality, critical acclaim."
)
HISTORY = [HistoryEntry("Dune", 5), HistoryEntry("Emma; A Novel", 1)]


def test_user_prompt_is_kars_word_for_word() -> None:
    assert kar_book_prompt(HISTORY) == KAR_USER_PROMPT


def test_prefix_is_kars_pure_hist() -> None:
    # lm_encoding.py: the prompt up to its last ';', then '. ' + answer
    pure_hist = KAR_USER_PROMPT[::-1].split(";", 1)[-1][::-1]
    assert kar_book_prefix(HISTORY) == pure_hist
    assert knowledge_text(kar_book_prefix(HISTORY), " An answer ") == pure_hist + ". An answer"


def test_item_prompt_is_kars_word_for_word() -> None:
    assert kar_book_item_prompt("Dune", "Frank Herbert") == KAR_ITEM_PROMPT


def test_tables() -> None:
    users = pl.DataFrame({"user_id": [2, 1], "split": ["test", "train"]})
    history = pl.DataFrame(
        {"user_id": [1, 1, 2], "position": [1, 0, 0], "item_id": [20, 10, 10], "rating": [1, 5, 4]}
    )
    items = pl.DataFrame(
        {"item_id": [10, 20], "title": ["Dune", "Emma; A Novel"], "brand": ["Frank Herbert", "Q"]}
    )
    table = kar_book_prompt_table(users, history, items)
    assert table["user_id"].to_list() == [1, 2]
    assert table["prompt"][0] == KAR_USER_PROMPT
    assert table["prefix"][1] == 'Given user\'s book rating history: "Dune", 4 stars'
    item_table = kar_book_item_prompt_table(items)
    assert item_table["prompt"][0] == KAR_ITEM_PROMPT
    with pytest.raises(ValueError, match="no 'brand' column"):
        kar_book_item_prompt_table(items.drop("brand"))
