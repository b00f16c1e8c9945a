"""KAR's user-preference prompt and the knowledge text built from it.

The prompt is ``profile_and_history + ". " + instruction``; the knowledge text the encoder reads
is ``profile_and_history + ". " + answer`` (KAR encodes the prompt's profile-and-history part
followed by the LLM's answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

# ML-1M age-bucket codes (README of the GroupLens ML-1M release).
ML1M_AGE_BUCKETS = {
    1: "under 18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-49",
    50: "50-55",
    56: "above 56",
}
GENDER_WORDS = {"M": "male", "F": "female"}

MOVIE_INSTRUCTION = (
    "Analyze user's preferences on movies (consider factors like genre, director/actors, "
    "time period/country, character, plot/theme, mood/tone, critical acclaim/award, "
    "production quality, and soundtrack). Provide clear explanations based on relevant "
    "details from the user's movie viewing history and other pertinent factors."
)
BOOK_INSTRUCTION = (
    "Analyze user's preferences on books (consider factors like genre, author, writing "
    "style, theme, setting, length and complexity, time period, literary quality, and "
    "critical acclaim). Provide clear explanations based on relevant details from the "
    "user's book reading history and other pertinent factors."
)


@dataclass(frozen=True)
class HistoryEntry:
    """One rated item of a prompt history."""

    title: str
    rating: int


def _with_article(occupation: str) -> str:
    occupation = occupation.strip()
    if occupation.lower() in ("", "none", "other"):
        return "in an unspecified occupation"
    article = "an" if occupation[0].lower() in "aeiou" else "a"
    return f"{article} {occupation}"


def describe_age(age: int | None, dataset: str) -> str:
    """ML-1M stores an age-bucket code; ML-100K the raw age in years."""
    if age is None:
        return "unknown"
    if dataset == "ml-1m":
        return ML1M_AGE_BUCKETS.get(int(age), str(age))
    return str(age)


def history_text(history: Sequence[HistoryEntry]) -> str:
    """``"title", r stars; "title", r stars`` (one star is singular)."""
    return "; ".join(f'"{h.title}", {h.rating} star{"" if h.rating == 1 else "s"}' for h in history)


def profile_and_history(
    user: dict, history: Sequence[HistoryEntry], dataset: str = "ml-100k"
) -> str:
    """The profile-and-history part of KAR's prompt (no trailing period).

    Args:
        user: a row of ``users.parquet`` (``gender``, ``age``, ``occupation``; may be null).
        history: the prompt history, oldest first.
        dataset: ``ml-100k``, ``ml-1m`` or ``amazon-books``.
    """
    if dataset == "amazon-books":
        head = "Given a user, this user's book reading history over time is listed below. "
        return head + history_text(history)
    gender = GENDER_WORDS.get(user.get("gender") or "", "")
    who = f"{gender} user" if gender else "user"
    age = describe_age(user.get("age"), dataset)
    occupation = _with_article(user.get("occupation") or "")
    head = (
        f"Given a {who} who is aged {age} and {occupation}, this user's movie viewing "
        "history over time is listed below. "
    )
    return head + history_text(history)


def instruction(dataset: str) -> str:
    """The analysis instruction that follows the history."""
    return BOOK_INSTRUCTION if dataset == "amazon-books" else MOVIE_INSTRUCTION


def preference_prompt(user: dict, history: Sequence[HistoryEntry], dataset: str = "ml-100k") -> str:
    """KAR's full user-preference prompt (the user message; the chat template is applied later)."""
    return profile_and_history(user, history, dataset) + ". " + instruction(dataset)


def knowledge_text(prefix: str, answer: str) -> str:
    """What the knowledge encoder reads: the profile-and-history part, ``". "``, the answer."""
    return prefix + ". " + answer.strip()


def prompt_table(
    users: pl.DataFrame,
    history: pl.DataFrame,
    items: pl.DataFrame,
    dataset: str,
    user_ids: Sequence[int] | None = None,
) -> pl.DataFrame:
    """One prompt per user from the prepared frames.

    Returns a frame with ``user_id``, ``split``, ``prefix`` (profile and history) and
    ``prompt`` (prefix + instruction), in user-id order.
    """
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
    hist = (
        history.sort(["user_id", "position"])
        .group_by("user_id", maintain_order=True)
        .agg("item_id", "rating")
    )
    by_user = {
        row["user_id"]: [
            HistoryEntry(titles[i], int(r))
            for i, r in zip(row["item_id"], row["rating"], strict=True)
        ]
        for row in hist.iter_rows(named=True)
    }
    selected = users if user_ids is None else users.filter(pl.col("user_id").is_in(list(user_ids)))
    rows = []
    for user in selected.sort("user_id").iter_rows(named=True):
        entries = by_user.get(user["user_id"], [])
        prefix = profile_and_history(user, entries, dataset)
        rows.append(
            {
                "user_id": user["user_id"],
                "split": user.get("split"),
                "prefix": prefix,
                "prompt": prefix + ". " + instruction(dataset),
            }
        )
    return pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "split": pl.Utf8, "prefix": pl.Utf8, "prompt": pl.Utf8},
    )
