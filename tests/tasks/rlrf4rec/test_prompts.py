"""Prompts: KAR's preference prompt, chat template, history cut, item prompts."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tasks.llm.chat import chat_prompt
from tasks.rlrf4rec.prompts import (
    HistoryEntry,
    correct_title,
    count_prompt_tokens,
    fit_history,
    item_prompt,
    item_prompt_table,
    knowledge_text,
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
    kar = prompt_table(data.users, data.history, data.items, "ml-100k", style="kar")
    row = kar.row(0, named=True)
    assert row["prompt"] == row["prefix"] + "; " + INSTRUCTION
    assert kar["user_id"].to_list() == table["user_id"].to_list()


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


# --------------------------------------------------------------------------- style="kar"


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("American President, The (1995)", "The American President (1995)"),
        ("Man for All Seasons, A (1966)", "A Man for All Seasons (1966)"),
        ("Good, the Bad and the Ugly, The (1966)", "The Good, the Bad and the Ugly (1966)"),
        ("Toy Story (1995)", "Toy Story (1995)"),
        ("Misérables, Les (1995)", "Misérables, Les (1995)"),  # only "the" and "a" move
        ("Amityville 1992: It's About Time (1992)", "Amityville 1992: It's About Time (1992)"),
        # two "(" : KAR's split("(") fails and the title is kept as it is
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
        ),
    ],
)
def test_correct_title(title: str, expected: str) -> None:
    assert correct_title(title) == expected


def test_kar_preference_prompt_exact_text() -> None:
    """KAR: every entry '"{}", {} stars; ' (plural for 1 star too), then the question."""
    user = {"gender": "M", "age": 56, "occupation": "clerical/admin"}
    expected = (
        "Given a male user who is aged 56+ and in clerical/admin department, this user's movie "
        'viewing history over time is listed below. "Toy Story (1995)", 5 stars; "The American '
        'President (1995)", 1 stars; ' + INSTRUCTION
    )
    assert preference_prompt(user, HISTORY, "ml-1m", style="kar") == expected
    prefix = profile_and_history(user, HISTORY, "ml-1m", style="kar")
    # what KAR encodes: the prompt cut at its last ";" (lm_encoding.get_history_text)
    assert prefix == expected.rsplit(";", 1)[0]
    assert knowledge_text(prefix, "Likes comedies.") == prefix + ". Likes comedies."


@pytest.mark.parametrize(
    ("age", "occupation", "phrase"),
    [
        (1, "other", "aged under 18 and in an unknown occupation"),
        (18, "customer service", "aged 18-24 and a customer service staff"),
        (35, "sales/marketing", "aged 35-44 and in sales/marketing department"),
        (50, "retired", "aged 50-55 and retired"),
        (25, "executive/managerial", "aged 25-34 and an executive/managerial"),
    ],
)
def test_kar_age_and_occupation_phrases(age: int, occupation: str, phrase: str) -> None:
    user = {"gender": "F", "age": age, "occupation": occupation}
    text = profile_and_history(user, [], "ml-1m", style="kar")
    assert text == (
        f"Given a female user who is {phrase}, this user's movie viewing history over time is "
        "listed below. "
    )
    # an empty history: KAR's head (ending ". ") then the question, nothing between
    assert preference_prompt(user, [], "ml-1m", style="kar") == text + INSTRUCTION


def test_kar_books_and_item_prompt() -> None:
    books = preference_prompt({}, HISTORY[:1], "amazon-books", style="kar")
    assert books == (
        "Given user's book rating history: \"Toy Story (1995)\", 5 stars; Analyze user's "
        "preferences on books about factors like genre, author, writing style, theme, setting, "
        "length and complexity, time period, literary quality, critical acclaim (Provide clear "
        "explanations based on relevant details from the user's book viewing history and other "
        "pertinent factors."
    )
    assert item_prompt("American President, The (1995)", "ml-1m", style="kar") == (
        "Introduce movie The American President (1995) and describe its attributes (including "
        "but not limited to genre, director/cast, country, character, plot/theme, mood/tone, "
        "critical acclaim/award, production quality, and soundtrack)."
    )
    with pytest.raises(ValueError, match="prompt style"):
        preference_prompt({}, [], "ml-1m", style="llama")  # type: ignore[arg-type]


def test_default_style_is_unchanged() -> None:
    user = {"gender": "M", "age": 56, "occupation": "other"}
    assert preference_prompt(user, HISTORY, "ml-1m") == preference_prompt(
        user, HISTORY, "ml-1m", style="default"
    )
    assert "above 56" in preference_prompt(user, HISTORY, "ml-1m")
    assert '"American President, The (1995)", 1 star. ' in preference_prompt(user, HISTORY)
