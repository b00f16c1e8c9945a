"""Prompts: KAR's preference prompt, chat template, history cut, item and direct prompts."""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path

import pytest

from tasks.llm.chat import chat_prompt
from tasks.rlrf4rec.prompts import (
    HistoryEntry,
    count_prompt_tokens,
    direct_prompt,
    fit_history,
    format_cutoff,
    item_prompt,
    item_prompt_table,
    knowledge_text,
    movie_with_genres,
    preference_prompt,
    profile_and_history,
    prompt_table,
)

USER = {"gender": "F", "age": 25, "occupation": "engineer"}
HISTORY = [HistoryEntry("Toy Story (1995)", 5), HistoryEntry("American President, The (1995)", 1)]
INSTRUCTION = (
    "Analyze user's preferences on movies (consider factors like genre, director/actors, "
    "time period/country, character, plot/theme, mood/tone, critical acclaim/award, "
    "production quality, and soundtrack). Provide clear explanations based on relevant "
    "details from the user's movie viewing history and other pertinent factors."
)


def test_preference_prompt_exact_text() -> None:
    expected = (
        "Given a female user who is aged 25 and an engineer, this user's movie viewing history "
        'over time is listed below. "Toy Story (1995)", 5 stars; "American President, The '
        '(1995)", 1 star. ' + INSTRUCTION
    )
    assert preference_prompt(USER, HISTORY, "ml-100k") == expected
    prefix = profile_and_history(USER, HISTORY, "ml-100k")
    assert knowledge_text(prefix, "  Likes comedies. ") == prefix + ". Likes comedies."


def test_demographic_wording_per_dataset() -> None:
    ml1m = profile_and_history({"gender": "M", "age": 56, "occupation": "other"}, [], "ml-1m")
    assert ml1m.startswith(
        "Given a male user who is aged above 56 and in an unspecified occupation"
    )
    books = preference_prompt({}, HISTORY[:1], "amazon-books")
    assert books.startswith(
        "Given a user, this user's book reading history over time is listed below. "
        '"Toy Story (1995)", 5 stars. Analyze user\'s preferences on books'
    )


def test_chat_prompt_uses_the_models_template(default_policy_path: str) -> None:
    assert chat_prompt(default_policy_path, "Hi") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = chat_prompt(default_policy_path, "Hi", system="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_fit_history_cuts_whole_entries_from_the_oldest_side(default_policy_path: str) -> None:
    history = [HistoryEntry(f"Movie number {i}, The ({1950 + i})", 1 + i % 5) for i in range(30)]
    build = functools.partial(preference_prompt, USER, dataset="ml-100k")
    full = count_prompt_tokens(default_policy_path, build(history))
    budget = full - 60
    kept = fit_history(history, budget, default_policy_path, build)
    assert 0 < len(kept) < len(history)
    assert kept == history[len(history) - len(kept) :]  # the newest entries, in order
    assert count_prompt_tokens(default_policy_path, build(kept)) <= budget
    one_more = history[len(history) - len(kept) - 1 :]
    assert count_prompt_tokens(default_policy_path, build(one_more)) > budget
    text = build(kept)
    for entry in kept:  # every kept title is whole
        assert f'"{entry.title}", {entry.rating} star' in text
    # A budget the prompt already meets keeps everything; one below the bare prompt keeps none.
    assert fit_history(history, full, default_policy_path, build) == history
    assert fit_history(history, 10, default_policy_path, build) == []
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        fit_history(history, 0, default_policy_path, build)


def test_prompt_table_with_token_budget(
    ml100k_dir: Path, tmp_path: Path, default_policy_path: str
) -> None:
    from tasks.data.prepare import load_prepared, prepare

    prepare("ml-100k", tmp_path / "run", ml100k_dir)
    data = load_prepared(tmp_path / "run")
    table = prompt_table(data.users, data.history, data.items, "ml-100k")
    assert table.columns == ["user_id", "split", "prefix", "prompt"]
    assert table.height == data.users.height
    row = table.row(0, named=True)
    assert row["prompt"] == row["prefix"] + ". " + INSTRUCTION
    longest = max(count_prompt_tokens(default_policy_path, p) for p in table["prompt"])
    cut = prompt_table(
        data.users,
        data.history,
        data.items,
        "ml-100k",
        max_prompt_tokens=longest - 20,
        tokenizer=default_policy_path,
    )
    assert cut["user_id"].to_list() == table["user_id"].to_list()
    for p in cut["prompt"]:
        assert count_prompt_tokens(default_policy_path, p) <= longest - 20
    assert (cut["prompt"].str.len_chars() <= table["prompt"].str.len_chars()).all()
    assert (cut["prompt"] != table["prompt"]).any()


def test_item_prompt() -> None:
    assert item_prompt("Toy Story (1995)") == (
        "Introduce movie Toy Story (1995) and describe its attributes precisely (including but "
        "not limited to genre, director/actors, time period/country, character, plot/theme, "
        "mood/tone, critical acclaim/award, production quality, and soundtrack)."
    )
    assert item_prompt("Dune", "amazon-books").startswith("Introduce book Dune and describe")
    import polars as pl

    items = pl.DataFrame({"item_id": [2, 1], "title": ["B (1990)", "A (1980)"]})
    table = item_prompt_table(items, "ml-100k")
    assert table["item_id"].to_list() == [1, 2]
    assert table["prompt"][0] == item_prompt("A (1980)")


def test_direct_prompt_exact_text() -> None:
    liked = [
        movie_with_genres("American President, The (1995)", ["Comedy", "Drama", "Romance"]),
        "Schindler's List (1993)",
    ]
    text = direct_prompt(USER, liked, ["Mother (1996)"], date(1998, 4, 22), k=5)
    assert text == (
        "I am a female, aged 25, working as engineer. I have previously watched and liked the "
        "movies: ['American President, The (1995) (comedy, drama, romance)', \"Schindler's "
        "List (1993)\"]. I have previously watched and HATED the movies: ['Mother (1996)']. "
        "Please provide recommendations for movies released before April 22nd, 1998, based on "
        "my history. Based on my profile, recommend the top 5 movies I am most likely to watch "
        "next. Please provide the output in a list of strings format, containing only the movie "
        "titles. Make sure to strictly adhere to the output format given below. Strictly do not "
        "generate any additional information other than the movie names. Format: ['movie_name', "
        "'movie_name', ... 'movie_name'] Make sure to limit the recommendations to movies "
        "available in the MovieLens dataset."
    )
    # ML-1M age buckets; no hated list and no cut-off leave their sentences out.
    short = direct_prompt({"gender": "M", "age": 18}, ["A (1990)"], [], None, k=3, dataset="ml-1m")
    assert short.startswith("I am a male, aged 18-24. I have previously watched and liked")
    assert "HATED" not in short and "released before" not in short and "top 3 movies" in short
    with pytest.raises(ValueError, match="k must be"):
        direct_prompt(USER, [], [], None, k=0)


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (date(1998, 4, 22), "April 22nd, 1998"),
        (date(1997, 9, 1), "September 1st, 1997"),
        (date(1997, 9, 11), "September 11th, 1997"),
        (date(1997, 9, 23), "September 23rd, 1997"),
        (date(1997, 9, 12), "September 12th, 1997"),
        (893203200, "April 22nd, 1998"),  # unix seconds, UTC
    ],
)
def test_format_cutoff(when: date | int, text: str) -> None:
    assert format_cutoff(when) == text
