"""Prompts of the RLRF4Rec pipeline: KAR's user-preference prompt, its knowledge text, and
KAR's item prompt.

The prompt is ``profile_and_history + ". " + instruction``; the knowledge text the encoder reads
is ``profile_and_history + ". " + answer`` (KAR encodes the prompt's profile-and-history part
followed by the LLM's answer).

Also here:

- :func:`fit_history`: the history cut from the oldest side, whole entries only, so that the
  chat-formatted prompt fits a token budget (``max_prompt_tokens`` of :func:`prompt_table`).
- :func:`item_prompt` / :func:`item_prompt_table`: KAR's item factual-knowledge prompt.

Two styles (``style``): ``"default"``, this project's first texts, and ``"kar"``, KAR's code
word for word (``preprocess/generate_data_and_prompt.py``, ``preprocess/pre_utils.py``): titles
rewritten by :func:`correct_title` ("American President, The (1995)" -> "The American
President (1995)"), KAR's ML-1M age and occupation phrases ("56+", "in clerical/admin
department", ...), every entry ``"title", r stars`` (plural always) followed by ``"; "``, the
instruction straight after the last entry's ``"; "``, and KAR's item prompt. In both styles
``prefix`` is the profile and the entries joined by ``"; "``, which is what KAR's
``knowledge_encoding/lm_encoding.py`` keeps of the prompt (cut at its last ``;``) before
``". " + answer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from tasks.data import demographics
from tasks.data.demographics import GENDER_WORDS
from tasks.llm.chat import chat_prompt, load_tokenizer

log = logging.getLogger(__name__)


PromptStyle = Literal["default", "kar"]
PROMPT_STYLES: tuple[str, ...] = ("default", "kar")

# KAR's AGE_MAPPING and OCCUPATION_MAPPING (preprocess/pre_utils.py), word for word; the
# occupations keyed by the ML-1M names of tasks.data.ml1m.ML1M_OCCUPATIONS (codes 0..20).
KAR_AGE_BUCKETS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49"}
KAR_AGE_BUCKETS |= {50: "50-55", 56: "56+"}
KAR_OCCUPATIONS = {
    "other": "in an unknown occupation",
    "academic/educator": "an academic/educator",
    "artist": "an artist",
    "clerical/admin": "in clerical/admin department",
    "college/grad student": "a college/grad student",
    "customer service": "a customer service staff",
    "doctor/health care": "a doctor/health care",
    "executive/managerial": "an executive/managerial",
    "farmer": "a farmer",
    "homemaker": "a homemaker",
    "K-12 student": "a K-12 student",
    "lawyer": "a lawyer",
    "programmer": "a programmer",
    "retired": "retired",
    "sales/marketing": "in sales/marketing department",
    "scientist": "a scientist",
    "self-employed": "self-employed",
    "technician/engineer": "a technician/engineer",
    "tradesman/craftsman": "a tradesman/craftsman",
    "unemployed": "unemployed",
    "writer": "a writer",
}
KAR_BOOK_HEAD = "Given user's book rating history: "
KAR_BOOK_INSTRUCTION = (  # sic: KAR's text opens a parenthesis it never closes
    "Analyze user's preferences on books about factors like genre, author, writing style, "
    "theme, setting, length and complexity, time period, literary quality, critical acclaim "
    "(Provide clear explanations based on relevant details from the user's book viewing "
    "history and other pertinent factors."
)
KAR_MOVIE_ITEM_PROMPT = (
    "Introduce movie {title} and describe its attributes (including but not limited to genre, "
    "director/cast, country, character, plot/theme, mood/tone, critical acclaim/award, "
    "production quality, and soundtrack)."
)


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")


def correct_title(title: str) -> str:
    """KAR's ``correct_title`` (``preprocess/pre_utils.py``): a trailing ", The" or ", A"
    before the year moves to the front. "American President, The (1995)" -> "The American
    President (1995)". A title without exactly one "(" is returned unchanged, as in KAR
    ("City of Lost Children, The (Cité des enfants perdus, La) (1995)" stays), and only
    "the" and "a" move ("Misérables, Les (1995)" stays)."""
    parts = title.strip().split("(")
    if len(parts) != 2:
        return title
    pure_title, year = parts
    spl = pure_title.strip().split(",")
    if spl[-1].strip().lower() in ("the", "a"):
        return spl[-1].strip() + " " + ",".join(spl[:-1]) + " (" + year
    return title


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


def _with_article(occupation: str, style: PromptStyle = "default") -> str:
    occupation = occupation.strip()
    if style == "kar" and occupation in KAR_OCCUPATIONS:
        return KAR_OCCUPATIONS[occupation]
    if occupation.lower() in ("", "none", "other"):
        return "in an unspecified occupation"
    article = "an" if occupation[0].lower() in "aeiou" else "a"
    return f"{article} {occupation}"


def describe_age(age: int | None, dataset: str, style: PromptStyle = "default") -> str:
    """ML-1M stores an age-bucket code (KAR's words with ``style="kar"``); ML-100K the raw age
    in years (:func:`tasks.data.demographics.describe_age`)."""
    return demographics.describe_age(age, dataset, KAR_AGE_BUCKETS if style == "kar" else None)


def history_text(history: Sequence[HistoryEntry], style: PromptStyle = "default") -> str:
    """``"title", r stars; "title", r stars`` (default: one star is singular; ``"kar"``:
    KAR's ``'"{}", {} stars'`` always, its titles through :func:`correct_title`)."""
    _check_style(style)
    if style == "kar":
        return "; ".join(f'"{correct_title(h.title)}", {h.rating} stars' for h in history)
    return "; ".join(f'"{h.title}", {h.rating} star{"" if h.rating == 1 else "s"}' for h in history)


def profile_and_history(
    user: dict,
    history: Sequence[HistoryEntry],
    dataset: str = "ml-100k",
    style: PromptStyle = "default",
) -> str:
    """The profile-and-history part of KAR's prompt (no trailing period or separator).

    Args:
        user: a row of ``users.parquet`` (``gender``, ``age``, ``occupation``; may be null).
        history: the prompt history, oldest first.
        dataset: ``ml-100k``, ``ml-1m`` or ``amazon-books``.
        style: ``"default"`` or ``"kar"`` (module docstring).
    """
    _check_style(style)
    if dataset == "amazon-books":
        head = (
            KAR_BOOK_HEAD
            if style == "kar"
            else "Given a user, this user's book reading history over time is listed below. "
        )
        return head + history_text(history, style)
    gender = GENDER_WORDS.get(user.get("gender") or "", "")
    who = f"{gender} user" if gender else "user"
    age = describe_age(user.get("age"), dataset, style)
    occupation = _with_article(user.get("occupation") or "", style)
    head = (
        f"Given a {who} who is aged {age} and {occupation}, this user's movie viewing "
        "history over time is listed below. "
    )
    return head + history_text(history, style)


def instruction(dataset: str, style: PromptStyle = "default") -> str:
    """The analysis instruction that follows the history."""
    if dataset == "amazon-books":
        return KAR_BOOK_INSTRUCTION if style == "kar" else BOOK_INSTRUCTION
    return MOVIE_INSTRUCTION


def join_prompt(prefix: str, n_entries: int, dataset: str, style: PromptStyle = "default") -> str:
    """``prefix`` and the instruction: default ``prefix + ". " + instruction``; ``"kar"``
    ``prefix + "; " + instruction`` (KAR ends every entry with ``"; "``), or the bare
    concatenation when the history is empty (KAR's head already ends with ``". "``)."""
    if style == "kar":
        return prefix + ("; " if n_entries else "") + instruction(dataset, style)
    return prefix + ". " + instruction(dataset, style)


def preference_prompt(
    user: dict,
    history: Sequence[HistoryEntry],
    dataset: str = "ml-100k",
    style: PromptStyle = "default",
) -> str:
    """KAR's full user-preference prompt (the user message; the chat template is applied later)."""
    prefix = profile_and_history(user, history, dataset, style)
    return join_prompt(prefix, len(history), dataset, style)


def knowledge_text(prefix: str, answer: str) -> str:
    """What the knowledge encoder reads: the profile-and-history part, ``". "``, the answer."""
    return prefix + ". " + answer.strip()


def user_histories(history: pl.DataFrame, items: pl.DataFrame) -> dict[int, list[HistoryEntry]]:
    """Each user's prompt history in time order, as (title, rating) entries."""
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
    hist = (
        history.sort(["user_id", "position"])
        .group_by("user_id", maintain_order=True)
        .agg("item_id", "rating")
    )
    return {
        row["user_id"]: [
            HistoryEntry(titles[i], int(r))
            for i, r in zip(row["item_id"], row["rating"], strict=True)
        ]
        for row in hist.iter_rows(named=True)
    }


def prompt_table(
    users: pl.DataFrame,
    history: pl.DataFrame,
    items: pl.DataFrame,
    dataset: str,
    user_ids: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer: Any = None,
    style: PromptStyle = "default",
) -> pl.DataFrame:
    """One prompt per user from the prepared frames.

    Args:
        users, history, items: the prepared frames (:func:`tasks.data.prepare.load_prepared`).
        dataset: ``ml-100k``, ``ml-1m`` or ``amazon-books``.
        user_ids: restrict to these users (default: all).
        max_prompt_tokens: when set, each user's history is cut from the oldest side (whole
            entries) so that the chat-formatted prompt has at most this many tokens
            (:func:`fit_history`); ``prefix`` then holds the kept history only.
        tokenizer: the policy's tokenizer (an object or a path / model id) used to count tokens;
            default the default policy model (:func:`tasks.data.assets.policy_model`).
        style: ``"default"`` or ``"kar"`` (module docstring).

    Returns a frame with ``user_id``, ``split``, ``prefix`` (profile and history) and
    ``prompt`` (prefix + instruction), in user-id order.
    """
    _check_style(style)

    def texts(user: dict, entries: list[HistoryEntry]) -> tuple[str, str]:
        prefix = profile_and_history(user, entries, dataset, style)
        return prefix, join_prompt(prefix, len(entries), dataset, style)

    return user_prompt_table(
        users, history, items, texts, user_ids=user_ids, max_prompt_tokens=max_prompt_tokens,
        tokenizer=tokenizer,
    )  # fmt: skip


def user_prompt_table(
    users: pl.DataFrame,
    history: pl.DataFrame,
    items: pl.DataFrame,
    texts: Callable[[dict, list[HistoryEntry]], tuple[str, str]],
    *,
    user_ids: Sequence[int] | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer: Any = None,
) -> pl.DataFrame:
    """One prompt per user: ``texts(user, history)`` gives the ``(prefix, prompt)`` of a user
    row and its history entries; with ``max_prompt_tokens`` the history is first cut from the
    oldest side until the prompt fits (:func:`fit_history`). Columns ``user_id``, ``split``,
    ``prefix``, ``prompt``, in user-id order."""
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
            entries = fit_history(
                entries, max_prompt_tokens, tokenizer, lambda e, u=user: texts(u, e)[1]
            )
        prefix, prompt = texts(user, entries)
        rows.append(
            {"user_id": user["user_id"], "split": user.get("split"), "prefix": prefix,
             "prompt": prompt}
        )  # fmt: skip
    return pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "split": pl.Utf8, "prefix": pl.Utf8, "prompt": pl.Utf8},
    )


# --------------------------------------------------------------------------- token budget


def count_prompt_tokens(tokenizer: Any, prompt: str, chat: bool = True) -> int:
    """Tokens of ``prompt`` as the model sees it (in the chat template when ``chat``)."""
    tok = load_tokenizer(tokenizer)
    text = chat_prompt(tok, prompt) if chat else prompt
    return len(tok(text, add_special_tokens=not chat)["input_ids"])


def fit_history(
    history: Sequence[HistoryEntry],
    max_prompt_tokens: int,
    tokenizer: Any,
    build: Callable[[Sequence[HistoryEntry]], str],
    chat: bool = True,
) -> list[HistoryEntry]:
    """The newest entries of ``history`` whose prompt fits ``max_prompt_tokens``.

    Entries are dropped from the oldest side, whole entries only (never mid-title), until
    ``build(kept)`` (the full user message) takes at most ``max_prompt_tokens`` tokens in the
    chat template (or as plain text when ``chat`` is false). When even an empty history does
    not fit, the empty history is returned and a warning logged.

    Args:
        history: the prompt history, oldest first.
        max_prompt_tokens: the token budget of the whole prompt.
        tokenizer: a tokenizer, or a path / model id.
        build: makes the user message from a history, e.g.
            ``functools.partial(preference_prompt, user, dataset="ml-100k")``.
        chat: count tokens of the chat-formatted prompt (what the generator feeds the model).
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    tok = load_tokenizer(tokenizer)
    entries = list(history)

    def fits(keep: int) -> bool:
        kept = entries[len(entries) - keep :] if keep else []
        return count_prompt_tokens(tok, build(kept), chat) <= max_prompt_tokens

    if fits(len(entries)):
        return entries
    # Token counts grow with the number of kept entries: binary search the largest that fits.
    lo, hi = 0, len(entries)  # fits(lo) unknown for lo = 0; fits(hi) is False
    if not fits(0):
        log.warning(
            "prompt does not fit max_prompt_tokens=%d even with an empty history", max_prompt_tokens
        )
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return entries[len(entries) - lo :] if lo else []


# --------------------------------------------------------------------------- item knowledge

MOVIE_ITEM_PROMPT = (
    "Introduce movie {title} and describe its attributes precisely (including but not limited "
    "to genre, director/actors, time period/country, character, plot/theme, mood/tone, critical "
    "acclaim/award, production quality, and soundtrack)."
)
BOOK_ITEM_PROMPT = (
    "Introduce book {title} and describe its attributes precisely (including but not limited to "
    "genre, author, writing style, theme, setting, length and complexity, time period, literary "
    "quality, and critical acclaim)."
)


def item_prompt(title: str, dataset: str = "ml-100k", style: PromptStyle = "default") -> str:
    """KAR's item factual-knowledge prompt (a user message) for one item title.

    ``"kar"``: KAR's code's ML-1M text (:data:`KAR_MOVIE_ITEM_PROMPT`) on the corrected title;
    for books KAR's text names the brand, which the data here lacks, so books keep the
    default text."""
    _check_style(style)
    if dataset == "amazon-books":
        return BOOK_ITEM_PROMPT.format(title=title)
    if style == "kar":
        return KAR_MOVIE_ITEM_PROMPT.format(title=correct_title(title))
    return MOVIE_ITEM_PROMPT.format(title=title)


def item_prompt_table(
    items: pl.DataFrame,
    dataset: str,
    item_ids: Sequence[int] | None = None,
    style: PromptStyle = "default",
) -> pl.DataFrame:
    """One factual-knowledge prompt per item: ``item_id``, ``prompt``, in item-id order.

    Feed it to :func:`tasks.llm.generate.generate` with ``key="item_id"``.
    """
    selected = items if item_ids is None else items.filter(pl.col("item_id").is_in(list(item_ids)))
    selected = selected.sort("item_id")
    return pl.DataFrame(
        {
            "item_id": selected["item_id"],
            "prompt": [item_prompt(t, dataset, style) for t in selected["title"].to_list()],
        },
        schema={"item_id": pl.Int64, "prompt": pl.Utf8},
    )
