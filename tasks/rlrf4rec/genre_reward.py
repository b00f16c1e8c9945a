"""A diagnostic reward that reads the text by construction: the share of the user's most liked
genres that a sample names.

This is not the paper's reward. It exists to separate two questions the paper's reward mixes:
"do sampling, pairing, LoRA-DPO and the rounds move a policy towards a reward?" and "does the
reranker's reward carry a signal about the text?". A reward that is a plain function of the
text answers the first one: if the loop cannot raise it, the machinery is at fault; if it can,
a flat curve under the reranker's reward points at the reward.

A user's liked genres come from the positives (label 1) of their reward lists, the same lists
the reranker's reward is computed on (items the policy never sees: its prompt holds the older
history), counted per genre; the ``k`` most frequent (ties: alphabetical) are the user's top
genres. A sample's reward is the share of those that it names (:func:`named_genres`: each
MovieLens genre with its usual word forms, "comedies", "romantic", "science fiction"; any other
genre by its own name). Naming every genre games it; the report's text figures (length,
distinct-2) show whether a policy did.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

TOP_GENRES = 3
# MovieLens genres and the word forms a text uses for them (lower case, word boundaries).
GENRE_FORMS: dict[str, str] = {
    "Action": r"action",
    "Adventure": r"adventures?|adventurous",
    "Animation": r"animations?|animated|cartoons?|anime",
    "Children's": r"children'?s?|kids?|family",
    "Comedy": r"comed(?:y|ies)|comedic|comic|funny|humou?r(?:ous)?",
    "Crime": r"crimes?|criminal|gangsters?|heists?",
    "Documentary": r"documentar(?:y|ies)",
    "Drama": r"dramas?|dramatic",
    "Fantasy": r"fantas(?:y|ies)|fantastical",
    "Film-Noir": r"film[- ]noir|noir",
    "Horror": r"horror|scary|slashers?",
    "Musical": r"musicals?",
    "Mystery": r"myster(?:y|ies)|mysterious|whodunits?",
    "Romance": r"romances?|romantic|rom-?coms?|love stor(?:y|ies)",
    "Sci-Fi": r"sci-?fi|science[- ]fiction|scifi",
    "Thriller": r"thrillers?|suspense(?:ful)?",
    "War": r"war|wartime|military",
    "Western": r"westerns?|cowboys?",
}
IGNORED_GENRES = frozenset({"unknown", "(no genres listed)"})


def _pattern(genre: str) -> re.Pattern[str]:
    form = GENRE_FORMS.get(genre, re.escape(genre.lower()))
    return re.compile(rf"(?<![\w-])(?:{form})(?![\w-])", re.IGNORECASE)


def named_genres(text: str, genres: Sequence[str]) -> set[str]:
    """The genres of ``genres`` that ``text`` names (case-insensitive, whole words)."""
    return {g for g in genres if _pattern(g).search(text)}


def top_genres(
    lists: pl.DataFrame, items: pl.DataFrame, k: int = TOP_GENRES
) -> dict[int, tuple[str, ...]]:
    """Each user's ``k`` most frequent genres among the positives of their lists.

    Args:
        lists: ``user_id``, ``item_ids`` List[Int64], ``labels`` List[Int] (the reward lists).
        items: ``item_id``, ``genres`` List[Utf8].
        k: genres kept per user (fewer when the positives have fewer).

    Returns:
        ``{user_id: (genre, ...)}``, most frequent first, ties alphabetical; users with no
        positive (or no genre on them) are absent.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    genre_of = dict(zip(items["item_id"].to_list(), items["genres"].to_list(), strict=True))
    liked = (
        lists.select("user_id", "item_ids", "labels")
        .explode("item_ids", "labels")
        .filter(pl.col("labels") > 0)
    )
    counts: dict[int, Counter[str]] = {}
    for user, item in liked.select("user_id", "item_ids").iter_rows():
        for genre in genre_of.get(item) or ():
            if genre not in IGNORED_GENRES:
                counts.setdefault(int(user), Counter())[genre] += 1
    return {
        user: tuple(g for g, _ in sorted(c.items(), key=lambda gc: (-gc[1], gc[0]))[:k])
        for user, c in counts.items()
    }


def genre_share(
    users: Sequence[int], texts: Sequence[str], top: Mapping[int, Sequence[str]]
) -> np.ndarray:
    """The share of each sample's user's top genres that the sample names.

    Args:
        users: ``[n]`` the sample's user.
        texts: ``[n]`` the sample's text.
        top: :func:`top_genres`.

    Returns:
        ``[n]`` float64 in [0, 1]; NaN for a user with no top genre.
    """
    if len(users) != len(texts):
        raise ValueError(f"{len(users)} users for {len(texts)} texts")
    out = np.full(len(users), np.nan)
    for i, (user, text) in enumerate(zip(users, texts, strict=True)):
        genres = top.get(int(user))
        if genres:
            out[i] = len(named_genres(text or "", genres)) / len(genres)
    return out


__all__ = ["GENRE_FORMS", "TOP_GENRES", "genre_share", "named_genres", "top_genres"]
