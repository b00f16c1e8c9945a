"""Item knowledge: the text each catalogue item is encoded from (KAR's item factual knowledge).

Three sources, chosen by ``--item-knowledge``:

- ``title``: ``"<title>; genres: A, B"`` (:func:`tasks.rlrf4rec.encode.item_texts`), no LLM;
- ``llm``: the base policy's greedy answer to KAR's item prompt
  (:func:`tasks.rlrf4rec.prompts.item_prompt`, KAR's book prompt naming the brand for
  Amazon-Books built the ``kar`` way), encoded answer-only as KAR's ``lm_encoding.py`` does;
- a PATH: a parquet with ``item_id`` and ``text``, or a JSON object ``{item_id: text}`` or KAR's
  ``item.klg`` layout ``{item_id: {"prompt": ..., "ans": ...}}``.

The LLM writes knowledge only for the items of some reranking list (:func:`listed_items`):
the others are never scored, and keep their title text. Items a PATH file lacks keep their
title text too; the count is in the stats and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from tasks.data.prepare import PreparedData
from tasks.data.schema import DataError
from tasks.rlrf4rec.book_prompts import kar_book_item_prompt_table
from tasks.rlrf4rec.encode import item_texts
from tasks.rlrf4rec.prompts import PromptStyle, item_prompt_table

SOURCES = ("title", "llm")  # any other value is a PATH
KNOWLEDGE_SCHEMA = {"item_id": pl.Int64, "text": pl.Utf8}


def listed_items(lists: pl.DataFrame) -> list[int]:
    """The sorted ids of the items that appear in some reranking list (``lists.parquet``)."""
    return sorted(lists.select(pl.col("item_ids").explode().unique())["item_ids"].to_list())


def item_prompts(prepared: PreparedData, dataset: str, style: PromptStyle) -> pl.DataFrame:
    """KAR's item prompt for every listed item: ``item_id``, ``prompt`` in item-id order.

    Amazon-Books prepared the ``kar`` way (it has ``brand``) takes KAR's book prompt."""
    ids = listed_items(prepared.lists)
    if (prepared.meta.get("amazon") or {}).get("build") == "kar":
        return kar_book_item_prompt_table(prepared.items, ids)
    return item_prompt_table(prepared.items, dataset, ids, style)


def read_item_knowledge(path: str | Path) -> pl.DataFrame:
    """A user's item-knowledge file as ``item_id, text`` (see the module docstring).

    Raises :class:`DataError` naming the file and what is wrong: an unreadable file, a missing
    column, an id that is not an integer, a text that is not a string, a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"item knowledge {path}: no such file")
    if path.suffix == ".parquet":
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # polars raises several types for a bad file
            raise DataError(f"item knowledge {path}: not a readable parquet file ({exc})") from exc
        missing = [c for c in KNOWLEDGE_SCHEMA if c not in frame.columns]
        if missing:
            raise DataError(
                f"item knowledge {path}: missing column(s) {missing}; has {frame.columns}"
            )
        try:
            frame = frame.select(
                pl.col("item_id").cast(pl.Int64, strict=True), pl.col("text").cast(pl.Utf8)
            )
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"item knowledge {path}: item_id must hold integers ({exc})") from exc
    elif path.suffix == ".json":
        frame = _json_knowledge(path)
    else:
        raise DataError(
            f"item knowledge {path}: expected a .parquet or .json file, got {path.suffix!r}"
        )
    if frame.height == 0:
        raise DataError(f"item knowledge {path}: no items")
    if frame["text"].null_count():
        bad = frame.filter(pl.col("text").is_null())["item_id"].head(5).to_list()
        raise DataError(f"item knowledge {path}: no text for item_id {bad}")
    dup = frame.filter(pl.col("item_id").is_duplicated())["item_id"].unique().sort()
    if dup.len():
        raise DataError(f"item knowledge {path}: item_id repeated: {dup.head(5).to_list()}")
    return frame


def _json_knowledge(path: Path) -> pl.DataFrame:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"item knowledge {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"item knowledge {path}: expected an object of item id -> text, got "
            f"{type(data).__name__}"
        )
    ids, texts = [], []
    for key, value in data.items():
        try:
            ids.append(int(key))
        except ValueError:
            raise DataError(f"item knowledge {path}: item id {key!r} is not an integer") from None
        if isinstance(value, dict):  # KAR's item.klg: {"prompt": ..., "ans": ...}
            value = value.get("ans")
        if not isinstance(value, str):
            raise DataError(
                f"item knowledge {path}: item {key}: expected a text (or KAR's "
                f'{{"ans": text}}), got {type(value).__name__}'
            )
        texts.append(value)
    return pl.DataFrame({"item_id": ids, "text": texts}, schema=KNOWLEDGE_SCHEMA)


def item_knowledge_texts(
    items: pl.DataFrame, knowledge: pl.DataFrame | None, *, source: str = "llm"
) -> tuple[list[str], dict[str, int]]:
    """The text of every item of ``items`` (in its order) and counts of where they came from.

    ``knowledge`` (``item_id, text``) gives an item's text (stripped: the answer alone) when it
    has one; an item it lacks, or whose text is blank, keeps its title text. With no item of
    ``items`` in ``knowledge``, a :class:`DataError` (the ids of another catalogue, say).

    Returns:
        ``(texts, counts)``: counts ``items``, ``from_knowledge``, ``from_title`` and, of the
        latter, ``blank`` (items whose knowledge text was blank).
    """
    titles = item_texts(items)
    ids = [int(i) for i in items["item_id"].to_list()]
    if knowledge is None:
        return titles, {"items": len(ids), "from_knowledge": 0, "from_title": len(ids), "blank": 0}
    text_of = {int(i): t.strip() for i, t in knowledge.select("item_id", "text").iter_rows()}
    if not any(i in text_of for i in ids):
        raise DataError(
            f"item knowledge ({source}): none of its {len(text_of)} ids is an item of the "
            f"catalogue (its ids e.g. {sorted(text_of)[:5]}, the catalogue's e.g. {ids[:5]})"
        )
    texts = [text_of.get(i) or title for i, title in zip(ids, titles, strict=True)]
    found = sum(bool(text_of.get(i)) for i in ids)
    blank = sum(i in text_of and not text_of[i] for i in ids)
    counts = {"items": len(ids), "from_knowledge": found, "from_title": len(ids) - found}
    return texts, {**counts, "blank": blank}


__all__ = [
    "SOURCES",
    "item_prompts",
    "item_knowledge_texts",
    "listed_items",
    "read_item_knowledge",
]
