"""Item knowledge: KAR's item prompts for the listed items, a user's knowledge file, the texts
the item vectors are encoded from, and the stage that generates the answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tasks.data.prepare import PreparedData, load_prepared
from tasks.data.schema import DataError
from tasks.rlrf4rec.item_knowledge import (
    item_knowledge_texts,
    item_prompts,
    listed_items,
    read_item_knowledge,
)
from tests.conftest import make_run

KAR_TEXT = (
    "Introduce movie The American President (1995) and describe its attributes (including but "
    "not limited to genre, director/cast, country, character, plot/theme, mood/tone, critical "
    "acclaim/award, production quality, and soundtrack)."
)


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [1, 2, 3],
            "title": ["American President, The (1995)", "Heat (1995)", "Unlisted (1990)"],
            "genres": [["Comedy"], ["Action", "Crime"], []],
        }
    )


def _prepared(items: pl.DataFrame, meta: dict | None = None) -> PreparedData:
    lists = pl.DataFrame({"item_ids": [[2, 1, 2], [1]]}, schema={"item_ids": pl.List(pl.Int64)})
    empty = pl.DataFrame()
    return PreparedData(empty, items, empty, empty, lists, meta or {})


def test_listed_items_are_the_items_of_some_list() -> None:
    assert listed_items(_prepared(_items()).lists) == [1, 2]


def test_item_prompts_are_kars_for_listed_items() -> None:
    prompts = item_prompts(_prepared(_items()), "ml-1m", "kar")
    assert prompts["item_id"].to_list() == [1, 2]  # item 3 is in no list
    assert prompts["prompt"][0] == KAR_TEXT  # KAR's text, its corrected title
    default = item_prompts(_prepared(_items()), "ml-100k", "default")
    assert "American President, The (1995)" in default["prompt"][0]


def test_item_prompts_name_the_brand_for_kars_books() -> None:
    books = _items().with_columns(brand=pl.Series(["Ann Author", "Bo Writer", "C"]))
    prompts = item_prompts(_prepared(books, {"amazon": {"build": "kar"}}), "amazon-books", "kar")
    assert prompts.height == 2 and "Bo Writer" in prompts["prompt"][1]


def test_read_parquet_json_and_kars_item_klg(tmp_path: Path) -> None:
    pq = tmp_path / "k.parquet"
    pl.DataFrame({"item_id": [2, 1], "text": ["b", "a"], "extra": [0, 0]}).write_parquet(pq)
    plain = tmp_path / "k.json"
    plain.write_text(json.dumps({"1": "a", "2": "b"}))
    klg = tmp_path / "item.klg.json"
    klg.write_text(json.dumps({"1": {"prompt": "Introduce ...", "ans": "a"}, "2": {"ans": "b"}}))
    for path in (pq, plain, klg):
        frame = read_item_knowledge(path).sort("item_id")
        assert frame.columns == ["item_id", "text"]
        assert frame.rows() == [(1, "a"), (2, "b")], path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("k.json", '{"1": "a", "x": "b"}', "item id 'x' is not an integer"),
        ("k.json", '["a", "b"]', "expected an object of item id -> text, got list"),
        ("k.json", '{"1": {"prompt": "p"}}', "item 1: expected a text"),
        ("k.json", "{not json", "not valid JSON"),
        ("k.json", "{}", "no items"),
        ("k.csv", "item_id,text\n1,a\n", "expected a .parquet or .json file"),
    ],
)
def test_bad_knowledge_files_are_named(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="item knowledge .*" + message.replace("(", r"\(")):
        read_item_knowledge(path)


def test_bad_parquet_columns_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "k.parquet"
    pl.DataFrame({"item": [1], "text": ["a"]}).write_parquet(path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['item_id'\]"):
        read_item_knowledge(path)
    pl.DataFrame({"item_id": [1, 1], "text": ["a", "b"]}).write_parquet(path)
    with pytest.raises(DataError, match=r"item_id repeated: \[1\]"):
        read_item_knowledge(path)
    with pytest.raises(DataError, match="no such file"):
        read_item_knowledge(tmp_path / "absent.parquet")


def test_knowledge_texts_fill_missing_and_blank_items_with_titles() -> None:
    knowledge = pl.DataFrame({"item_id": [2, 3, 99], "text": ["  A heist film.  ", " ", "x"]})
    texts, counts = item_knowledge_texts(_items(), knowledge)
    # item 2 its answer (stripped); item 3's blank answer and item 1's missing one: titles
    assert texts == [
        "American President, The (1995); genres: Comedy",
        "A heist film.",
        "Unlisted (1990)",
    ]
    assert counts == {"items": 3, "from_knowledge": 1, "from_title": 2, "blank": 1}
    titles, counts = item_knowledge_texts(_items(), None)
    assert titles[1] == "Heat (1995); genres: Action, Crime" and counts["from_title"] == 3


def test_knowledge_of_another_catalogue_is_refused() -> None:
    other = pl.DataFrame({"item_id": [101, 102], "text": ["a", "b"]})
    with pytest.raises(DataError, match="none of its 2 ids is an item of the catalogue"):
        item_knowledge_texts(_items(), other, source="kar.json")


def test_item_knowledge_stage_answers_every_listed_item(
    tmp_path: Path, tiny_llm_path: str, one_torch_thread
) -> None:
    """One greedy answer per listed item, to KAR's item prompt, with the generation stats."""
    from tasks.common.stage import Artefact, InputRef
    from tasks.llm.policy import Policy
    from tasks.llm.sampling import SamplingConfig
    from tasks.rlrf4rec import stages

    run = make_run(tmp_path)
    knowledge = stages.item_knowledge.stage_fn(
        Artefact(str(run / "data")),
        Policy(InputRef.of(tiny_llm_path)),
        dataset="ml-100k",
        style="kar",
        sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=6),
        backend="transformers",
        out=tmp_path / "item_knowledge.parquet",
    )
    answers = pl.read_parquet(knowledge.path)
    assert answers["item_id"].to_list() == listed_items(load_prepared(run).lists)
    assert answers["prompt"][0].startswith("Introduce movie Film ")
    assert (answers["n_tokens"] <= 6).all() and answers["finish_reason"].null_count() == 0
    assert knowledge.stats["items"] == answers.height and knowledge.stats["source"] == "llm"
    assert knowledge.stats["generated_tokens"] == answers["n_tokens"].sum()


def test_item_vectors_encode_the_answer_alone(tmp_path: Path, encoder_path: str) -> None:
    """An item with a knowledge text gets the encoder's vector of that text alone (KAR's
    ``lm_encoding.py``); the others their title text's."""
    from tasks.common.stage import Artefact, InputRef
    from tasks.rlrf4rec import stages
    from tasks.rlrf4rec.encode import encode_texts, frame_vectors, item_texts

    run = make_run(tmp_path)
    answer = "  A tense heist thriller set in Los Angeles.  "
    path = tmp_path / "item_knowledge.parquet"
    pl.DataFrame({"item_id": [2], "text": [answer]}).write_parquet(path)
    vectors = stages.encode_items.stage_fn(
        Artefact(str(run / "data")),
        Artefact(str(path), stats={"source": "llm"}),
        encoder=InputRef.of(encoder_path),
        out=tmp_path / "items.parquet",
    )
    frame = pl.read_parquet(vectors.path)
    items = load_prepared(run).items
    assert frame["item_id"].to_list() == items["item_id"].to_list()
    got = frame_vectors(frame.filter(pl.col("item_id").is_in([1, 2])))
    title_1 = item_texts(items.filter(pl.col("item_id") == 1))[0]
    want = encode_texts([title_1, answer.strip()], encoder_path)
    assert np.allclose(got, want, atol=1e-5)
    assert vectors.stats == {
        "source": "llm", "items": items.height, "from_knowledge": 1,
        "from_title": items.height - 1, "blank": 0,
    }  # fmt: skip
