"""The second pipeline's prompt (You et al., Figure 2): the user's demographics, the liked and
hated movies of the window, a release-date cut-off, and an answer of k titles as a list."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

from tasks.data.demographics import GENDER_WORDS, describe_age


def _ordinal(day: int) -> str:
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def format_cutoff(when: date | datetime | int) -> str:
    """``April 22nd, 1998`` from a date, a datetime or a unix timestamp (UTC)."""
    if isinstance(when, bool):
        raise TypeError("cutoff: expected a date, a datetime or a unix timestamp, got a bool")
    if isinstance(when, int | float):
        when = datetime.fromtimestamp(int(when), tz=UTC)
    if not isinstance(when, date):
        raise TypeError(
            f"cutoff: expected a date, a datetime or a unix timestamp, got {type(when).__name__}"
        )
    return f"{when.strftime('%B')} {_ordinal(when.day)}, {when.year}"


def movie_with_genres(title: str, genres: Sequence[str] | None = None) -> str:
    """``Title (1995) (comedy, drama)`` as in You et al.'s prompt (genres lower-cased)."""
    genres = [g.lower() for g in (genres or []) if g and g.lower() != "unknown"]
    return f"{title} ({', '.join(genres)})" if genres else title


def _title_list(titles: Sequence[str]) -> str:
    # Each title is its own quoted list item: a comma inside a title never splits it.
    return "[" + ", ".join(repr(str(t)) for t in titles) + "]"


def direct_prompt(
    user: dict,
    liked: Sequence[str],
    hated: Sequence[str],
    cutoff: date | datetime | int | None = None,
    k: int = 5,
    dataset: str = "ml-100k",
) -> str:
    """The second pipeline's prompt (You et al., Figure 2): recommend ``k`` titles as a list.

    Args:
        user: ``gender``, ``age``, ``occupation`` (may be null), optionally ``location``
            (a place name; the zip code is not turned into a place).
        liked: movies of the window rated >= 3, oldest first, as display strings
            (:func:`movie_with_genres`).
        hated: movies of the window rated <= 2, same format.
        cutoff: only movies released before this date (the window's end); None leaves it out.
        k: how many titles to ask for.
        dataset: ``ml-100k`` or ``ml-1m`` (the age wording); ``amazon-books`` asks for books.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    books = dataset == "amazon-books"
    noun = "books" if books else "movies"
    parts = []
    if not books:
        gender = GENDER_WORDS.get(user.get("gender") or "", "")
        who = f"I am a {gender}" if gender else "I am a user"
        age = user.get("age")
        if age is not None:
            who += f", aged {describe_age(age, dataset)}"
        if user.get("location"):
            who += f", from {user['location']}"
        occupation = (user.get("occupation") or "").strip()
        if occupation and occupation.lower() not in ("none", "other"):
            who += f", working as {occupation}"
        parts.append(who + ".")
    verb = "read" if books else "watched"
    if liked:
        parts.append(f"I have previously {verb} and liked the {noun}: {_title_list(liked)}.")
    if hated:
        parts.append(f"I have previously {verb} and HATED the {noun}: {_title_list(hated)}.")
    if cutoff is not None:
        released = "published" if books else "released"
        parts.append(
            f"Please provide recommendations for {noun} {released} before "
            f"{format_cutoff(cutoff)}, based on my history."
        )
    item = "book" if books else "movie"
    source = "Amazon Books" if books else "MovieLens"
    parts.append(
        f"Based on my profile, recommend the top {k} {noun} I am most likely to "
        f"{'read' if books else 'watch'} next. Please provide the output in a list of strings "
        f"format, containing only the {item} titles. Make sure to strictly adhere to the output "
        f"format given below. Strictly do not generate any additional information other than "
        f"the {item} names. Format: ['{item}_name', '{item}_name', ... '{item}_name'] Make sure "
        f"to limit the recommendations to {noun} available in the {source} dataset."
    )
    return " ".join(parts)
