"""Parse an LLM's answer into titles and map each title onto the catalogue (You et al., 3.2).

Parsing (:func:`parse_answer`) accepts, in this order of preference:

1. a Python-style list (``['Jaws (1975)', "Devil's Advocate, The (1997)"]``), also when it is
   malformed (mixed quotes, apostrophes inside single quotes, no closing bracket, unquoted
   items: an unquoted item is split on top-level commas and a fragment that is only an article
   such as ``The (1995)`` is glued back onto its title, so "American President, The (1995)"
   survives);
2. a numbered or bulleted list (``1. Jaws``, ``2) Alien``, ``- Psycho``);
3. plain lines (one title a line; one line holding several ``Title (year), ...`` is split after
   each year).

Genre tags the prompt itself shows (``Jaws (1975) (action, horror)``), markdown emphasis and
`` - description`` tails are removed. At most ``k`` titles are kept; the rest are counted.
An answer with no title at all is a parse failure.

Mapping (:class:`Catalogue`): each title goes through ``rapidfuzz.process`` with
``scorer=fuzz.WRatio`` over the catalogue titles, exactly as the paper's ``extractOne``, with two
documented refinements that can be switched off:

- a processor applied to both sides (:func:`normalise_title`): lower case, a trailing article
  moved to the front ("Shawshank Redemption, The (1994)" -> "the shawshank redemption 1994"),
  apostrophes dropped, other punctuation turned into spaces. Without it WRatio maps "The
  Godfather" to "Usual Suspects, The (1995)";
- ties on the best score are broken by the plain ``fuzz.ratio`` (extractOne keeps the first
  choice in catalogue order, so "Alien" would become "Aliens (1986)").

An optional ``score_cutoff`` marks a title below it as unmapped. Exclusion (on by default, a
departure from You et al., whose mapping lets an answer score with a movie the user has already
rated): a title maps onto the best catalogue title outside the user's prompt window and every
movie the user rated before the window's end (``history``); ``exclude_context=False`` restores the
paper. Whether an answer repeats one of the prompt's own movies is decided before exclusion
(``n_repeats``), so the report can say how often the model copies its prompt. Titles
that map to an item already recommended earlier in the same answer are duplicates: the item
counts once (the later position scores nothing). Catalogue entries that share a title (ML-100K
has 18 such pairs) are one canonical item (the smallest id); ground truth is canonicalised the
same way (:meth:`Catalogue.canonical`).
"""

from __future__ import annotations

import ast
import io
import logging
import re
import tokenize
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import polars as pl
from rapidfuzz import fuzz, process

log = logging.getLogger(__name__)

K_DEFAULT = 5

ARTICLES = (
    "The", "A", "An", "Il", "La", "Le", "Les", "L'", "El", "Das", "Der", "Die", "Los", "Las",
    "Lo", "Det", "Den",
)  # fmt: skip
_ART = "(?:" + "|".join(re.escape(a) for a in ARTICLES) + ")"
_TRAILING_ARTICLE = re.compile(
    rf"^(?P<main>.+?),\s+(?P<art>{_ART})(?P<rest>(?:\s+\([^()]*\))*)\s*$", re.IGNORECASE
)
# A fragment of an unquoted list that is only an article (and maybe a year or alt title).
_ARTICLE_FRAGMENT = re.compile(rf"^{_ART}(?:\s+\([^()]*\))*\s*$", re.IGNORECASE)
_YEAR_ONLY = re.compile(r"^\(?\d{4}\)?$")
_NUMBERED = re.compile(r"^\s*(?:\(?\d{1,2}\s*[.):\]-]|[-*\u2022+])\s*(?P<title>.+?)\s*$")
_YEAR_SPLIT = re.compile(r"(?<=\(\d{4}\))\s*[,;]\s*")
_QUOTED_SEP = re.compile(
    r"""(?<=['"\u2019\u201d])(?:(?:\s*(?:[,;]|\.{3}|\u2026)\s*)+|\s+)(?=['"\u2018\u201c])"""
)
_PLACEHOLDER = re.compile(
    r"^(?:movie[_ ]?name(?:[_ ]?\d+)?|title[_ ]?\d*|\.{2,}|\u2026|etc\.?)$", re.I
)
_DESCRIPTION_TAIL = re.compile(r"\s+[-\u2013\u2014]\s+.*$")
_QUOTES = "'\"`\u2018\u2019\u201c\u201d"
_ENDS_WITH_YEAR = re.compile(r"\(\d{4}\)$")
MAX_TITLE_WORDS = 16

# Genre words as the prompt shows them (lower case, apostrophes dropped) and common variants.
GENRE_WORDS = {
    "unknown", "action", "adventure", "animation", "childrens", "children", "comedy", "crime",
    "documentary", "drama", "fantasy", "film-noir", "film noir", "noir", "horror", "musical",
    "mystery", "romance", "sci-fi", "sci fi", "sci. fi", "scifi", "science fiction", "thriller",
    "war", "western", "family", "biography", "history", "music", "sport", "animated",
}  # fmt: skip


# --------------------------------------------------------------------------- parsing


@dataclass
class ParsedAnswer:
    """The titles found in one answer.

    ``fmt`` is ``list``, ``numbered``, ``lines`` or ``failed``; ``n_found`` counts titles before
    the cap of ``k``; ``truncated`` marks a list whose closing bracket never came.
    """

    titles: list[str]
    fmt: str
    n_found: int
    truncated: bool = False

    @property
    def failed(self) -> bool:
        return self.fmt == "failed"


def _strip_genre_tags(title: str) -> str:
    """Drop trailing ``(genre, genre)`` groups; keep years and alternative titles."""
    while True:
        m = re.search(r"\s*\(([^()]*)\)\s*$", title)
        if not m:
            return title
        words = [w.strip().lower().replace("'", "") for w in re.split(r"[,/|]", m.group(1))]
        if words and all(w in GENRE_WORDS for w in words if w) and any(words):
            title = title[: m.start()]
        else:
            return title


def clean_title(raw: str, literal: bool = False) -> str:
    """Tidy one extracted title: quotes, markdown, genre tags, description tails.

    ``literal``: the title is a string of a Python list literal, so its quotes are already gone
    and a leading or trailing quote is part of the title ("'Til There Was You (1997)"). A
    `` - ...`` tail that ends in a year is part of the title ("Pink Floyd - The Wall (1982)").
    """
    quotes = " " if literal else _QUOTES + " "
    t = raw.strip()
    bold = re.search(r"\*\*(.+?)\*\*|__(.+?)__", t)
    if bold:
        t = bold.group(1) or bold.group(2)
    t = t.replace("\\'", "'").replace('\\"', '"')
    t = t.strip().strip("[]").strip()
    t = t.strip(quotes).strip()
    t = re.sub(r"^(?:title|movie|film)\s*#?\s*\d*\s*[:.)-]\s*", "", t, flags=re.I)
    t = t.strip(quotes).strip()
    if not _ENDS_WITH_YEAR.search(t):
        t = _DESCRIPTION_TAIL.sub("", t)
    while t.count("(") > t.count(")"):  # an answer cut mid-parenthesis
        t = t[: t.rindex("(")].rstrip()
    t = _strip_genre_tags(t)
    t = t.strip(quotes + ",;*").strip()
    if not t.endswith("..."):
        t = t.rstrip(".").strip()
    return " ".join(t.split())


def _split_top_level(body: str) -> list[str]:
    """Split on commas/semicolons outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch in ",;" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _glue_articles(parts: list[str]) -> list[str]:
    """Re-attach ``The (1995)``-style fragments to the title before them."""
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and (_ARTICLE_FRAGMENT.match(part) or _YEAR_ONLY.match(part)):
            out[-1] = f"{out[-1]}, {part}" if not _YEAR_ONLY.match(part) else f"{out[-1]} {part}"
        else:
            out.append(part)
    return out


def _list_items(text: str, start: int) -> tuple[list[str], bool, bool]:
    """Items of the bracketed list opening at ``text[start]``, whether it is unclosed, and
    whether it parsed as a Python literal (its strings are then exact)."""
    # Whole literal first: the cleanest case.
    for end in [m.start() for m in re.finditer(r"\]", text[start:])]:
        chunk = text[start : start + end + 1]
        try:
            value = ast.literal_eval(chunk)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            if _string_tokens(chunk) != len(value):
                break  # adjacent literals were concatenated by Python: split them below
            return [str(v) for v in value], False, True
    close = _closing_bracket(text, start)
    truncated = close < 0
    body = text[start + 1 :] if truncated else text[start + 1 : close]
    body = body.strip()
    if not body:
        return [], truncated, False
    if body[0] in _QUOTES:
        items = _QUOTED_SEP.split(body)
    else:
        items = _glue_articles(_split_top_level(body))
    return items, truncated, False


def _string_tokens(chunk: str) -> int:
    """How many string literals ``chunk`` holds (Python joins adjacent ones into one)."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(chunk).readline)
        return sum(tok.type == tokenize.STRING for tok in tokens)
    except (tokenize.TokenError, SyntaxError):
        return -1


def _closing_bracket(text: str, start: int) -> int:
    """Index of the ``]`` closing the list at ``start``, ignoring brackets inside quotes.

    An apostrophe between two letters (``Devil's``) is not a quote.
    """
    quote = None
    for i in range(start + 1, len(text)):
        ch = text[i]
        prev = text[i - 1] if i else ""
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if quote:
            if ch == quote and not (ch == "'" and prev.isalpha() and nxt.isalpha()):
                quote = None
        elif ch in "'\"" and not (ch == "'" and prev.isalpha() and nxt.isalpha()):
            quote = ch
        elif ch == "]":
            return i
    return -1


def _plausible(title: str) -> bool:
    return (
        bool(title)
        and any(c.isalnum() for c in title)
        and not _PLACEHOLDER.match(title)
        and "movie_name" not in title.lower()
        and "[" not in title
        and "]" not in title
        and not _ARTICLE_FRAGMENT.match(title)
        and len(title.split()) <= MAX_TITLE_WORDS
    )


def parse_answer(text: str | None, k: int = K_DEFAULT) -> ParsedAnswer:
    """Parse an answer into at most ``k`` titles (see the module docstring for the formats)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    text = (text or "").strip()
    text = re.sub(r"```[a-zA-Z]*", "", text).strip()
    if not text:
        return ParsedAnswer([], "failed", 0)
    candidates: list[str] = []
    fmt = "failed"
    truncated = False
    for m in re.finditer(r"\[", text):
        items, truncated, literal = _list_items(text, m.start())
        candidates = [t for t in (clean_title(i, literal) for i in items) if _plausible(t)]
        if candidates:
            fmt = "list"
            break
    else:
        truncated = False
    if not candidates:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        numbered = [m.group("title") for ln in lines if (m := _NUMBERED.match(ln))]
        if numbered:
            candidates = [t for t in (clean_title(i) for i in numbered) if _plausible(t)]
            fmt = "numbered" if candidates else "failed"
        if not candidates:
            pieces: list[str] = []
            for ln in lines:
                if ln.rstrip().endswith(":"):
                    continue
                pieces.extend(
                    _YEAR_SPLIT.split(ln) if len(re.findall(r"\(\d{4}\)", ln)) > 1 else [ln]
                )
            candidates = [t for t in (clean_title(p) for p in pieces) if _plausible(t)]
            fmt = "lines" if candidates else "failed"
    return ParsedAnswer(candidates[:k], fmt, len(candidates), truncated)


def format_titles(titles: Sequence[str]) -> str:
    """The answer format the prompt asks for: a Python list of strings (``str(list)``).

    Used for SFT targets. Titles stay whole; the list is never comma-joined.
    """
    return str([str(t) for t in titles])


# --------------------------------------------------------------------------- mapping


def normalise_title(title: str) -> str:
    """The processor used on both sides of the match (see the module docstring)."""
    s = " ".join(str(title).split())
    m = _TRAILING_ARTICLE.match(s)
    if m:
        art = m.group("art")
        sep = "" if art.endswith("'") else " "
        s = f"{art}{sep}{m.group('main')}{m.group('rest')}"
    s = s.lower().replace("'", "").replace("`", "").replace("\u2019", "")
    s = re.sub(r"[^0-9a-z]+", " ", s)
    return " ".join(s.split())


@dataclass
class MappedAnswer:
    """One answer after parsing and mapping.

    ``item_ids`` has one entry per parsed title, in answer order: the canonical catalogue id,
    or None for a title that is unmapped (below the cutoff) or a duplicate of an earlier one.
    """

    fmt: str
    titles: list[str]
    item_ids: list[int | None]
    matched: list[str | None]
    scores: list[float]
    n_found: int
    n_mapped: int
    n_unmapped: int
    n_duplicates: int
    n_context: int
    truncated: bool = False
    n_repeats: int = 0

    @property
    def failed(self) -> bool:
        return self.fmt == "failed"

    @property
    def recommended(self) -> list[int | None]:
        return list(self.item_ids)


@dataclass(frozen=True)
class MappingConfig:
    """How titles are mapped (``score_cutoff`` None = the paper: every title maps).

    ``exclude_context`` (default True, a departure from You et al.): titles map only onto movies
    outside the prompt's window and the user's earlier ratings (everything rated before the
    window's end); False maps onto the whole catalogue, as the paper does.
    """

    k: int = K_DEFAULT
    score_cutoff: float | None = None
    exclude_context: bool = True
    normalise: bool = True
    tie_break: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.score_cutoff is not None and not 0 <= self.score_cutoff <= 100:
            raise ValueError(f"score_cutoff must be in [0, 100], got {self.score_cutoff}")


@dataclass
class Catalogue:
    """The catalogue's titles, prepared once for fuzzy matching.

    Build with :meth:`from_items` from a frame with ``item_id`` and ``title``.
    """

    titles: list[str]
    title_item: list[int]
    canonical_of: dict[int, int]
    normalised: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_items(cls, items: pl.DataFrame) -> Catalogue:
        if not {"item_id", "title"} <= set(items.columns):
            raise ValueError("items need the columns item_id and title")
        first: dict[str, int] = {}
        canonical: dict[int, int] = {}
        for item_id, title in sorted(
            zip(items["item_id"].to_list(), items["title"].to_list(), strict=True)
        ):
            title = " ".join(str(title).split())
            first.setdefault(title, int(item_id))
            canonical[int(item_id)] = first[title]
        titles = list(first)
        return cls(
            titles=titles,
            title_item=[first[t] for t in titles],
            canonical_of=canonical,
            normalised=[normalise_title(t) for t in titles],
        )

    def __len__(self) -> int:
        return len(self.titles)

    def canonical(self, item_ids: Iterable[int]) -> list[int]:
        """Canonical ids (one per distinct title), order kept, duplicates dropped."""
        out: list[int] = []
        for i in item_ids:
            c = self.canonical_of.get(int(i), int(i))
            if c not in out:
                out.append(c)
        return out

    def title_of(self, item_id: int) -> str:
        return self.titles[self.title_item.index(self.canonical_of.get(item_id, item_id))]

    def _ranked(self, query: str, normalise: bool, limit: int) -> list[tuple[float, int]]:
        key = (query, normalise, limit)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        choices = self.normalised if normalise else self.titles
        q = normalise_title(query) if normalise else query
        res = process.extract(q, choices, scorer=fuzz.WRatio, limit=limit, processor=None)
        ranked = [(float(score), int(idx)) for _, score, idx in res]
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[key] = ranked
        return ranked

    def match(
        self,
        title: str,
        exclude: Collection[int] = (),
        normalise: bool = True,
        tie_break: bool = True,
    ) -> tuple[int, str, float] | None:
        """Best catalogue entry for ``title``: (canonical item id, catalogue title, WRatio score).

        ``exclude`` holds canonical ids that may not be returned. None when nothing is left.
        """
        limit = min(len(self.titles), 16 + len(exclude))
        ranked = self._ranked(title, normalise, limit)
        allowed = [(s, i) for s, i in ranked if self.title_item[i] not in exclude]
        if not allowed and limit < len(self.titles):
            ranked = self._ranked(title, normalise, len(self.titles))
            allowed = [(s, i) for s, i in ranked if self.title_item[i] not in exclude]
        if not allowed:
            return None
        best_score = allowed[0][0]
        best = allowed[0][1]
        if tie_break:
            tied = [i for s, i in allowed if s == best_score]
            if len(tied) > 1:
                q = normalise_title(title) if normalise else title
                choices = self.normalised if normalise else self.titles
                best = max(tied, key=lambda i: (fuzz.ratio(q, choices[i]), -i))
        return self.title_item[best], self.titles[best], best_score

    def map_answer(
        self,
        text: str | None,
        cfg: MappingConfig | None = None,
        context: Collection[int] = (),
        history: Collection[int] = (),
    ) -> MappedAnswer:
        """Parse ``text`` and map its titles (see the module docstring).

        ``context``: the prompt's own movies (a title matching one of them, before exclusion,
        is a repeat); ``history``: every movie the user rated before the window's end. With
        ``cfg.exclude_context`` neither can be returned.
        """
        cfg = cfg or MappingConfig()
        parsed = parse_answer(text, cfg.k)
        context_ids = set(self.canonical(context))
        exclude = (context_ids | set(self.canonical(history))) if cfg.exclude_context else set()
        ids: list[int | None] = []
        matched: list[str | None] = []
        scores: list[float] = []
        seen: set[int] = set()
        n_unmapped = n_dup = n_ctx = n_rep = 0
        for title in parsed.titles:
            hit = self.match(title, (), cfg.normalise, cfg.tie_break)
            if hit is not None and hit[0] in context_ids:
                n_rep += 1  # decided before exclusion
            if hit is not None and hit[0] in exclude:
                hit = self.match(title, exclude, cfg.normalise, cfg.tie_break)
            if hit is None or (cfg.score_cutoff is not None and hit[2] < cfg.score_cutoff):
                n_unmapped += 1
                ids.append(None)
                matched.append(hit[1] if hit else None)
                scores.append(hit[2] if hit else 0.0)
                continue
            item, name, score = hit
            matched.append(name)
            scores.append(score)
            if item in seen:
                n_dup += 1
                ids.append(None)
                continue
            seen.add(item)
            ids.append(item)
            if item in context_ids:
                n_ctx += 1
        return MappedAnswer(
            fmt=parsed.fmt,
            titles=parsed.titles,
            item_ids=ids,
            matched=matched,
            scores=scores,
            n_found=parsed.n_found,
            n_mapped=len(seen),
            n_unmapped=n_unmapped,
            n_duplicates=n_dup,
            n_context=n_ctx,
            truncated=parsed.truncated,
            n_repeats=n_rep,
        )


def mapping_counts(answers: Sequence[MappedAnswer], k: int = K_DEFAULT) -> dict[str, float]:
    """Totals and rates over many answers (nothing dropped silently).

    - ``parse_failure_rate``: answers with no title / answers;
    - ``mapped_title_rate``: distinct mapped titles / parsed titles (0 with no title);
    - ``slot_fill_rate``: distinct mapped titles / (k * answers);
    - ``repeat_share``: answers with at least one title that matches (before exclusion) a
      movie of their own prompt / answers;
    - counts of answers, parse failures, parsed titles, titles beyond ``k``, mapped,
      unmapped, duplicates, context hits, titles repeating the prompt and truncated lists, and
      answers per format.
    """
    n = len(answers)
    parsed = sum(len(a.titles) for a in answers)
    mapped = sum(a.n_mapped for a in answers)
    failures = sum(a.failed for a in answers)
    out: dict[str, float] = {
        "answers": n,
        "parse_failures": failures,
        "parse_failure_rate": failures / n if n else 0.0,
        "titles_parsed": parsed,
        "titles_beyond_k": sum(max(0, a.n_found - k) for a in answers),
        "titles_mapped": mapped,
        "titles_unmapped": sum(a.n_unmapped for a in answers),
        "duplicates": sum(a.n_duplicates for a in answers),
        "context_hits": sum(a.n_context for a in answers),
        "titles_repeating_prompt": sum(a.n_repeats for a in answers),
        "answers_repeating_prompt": sum(a.n_repeats > 0 for a in answers),
        "repeat_share": sum(a.n_repeats > 0 for a in answers) / n if n else 0.0,
        "truncated_lists": sum(a.truncated for a in answers),
        "mapped_title_rate": mapped / parsed if parsed else 0.0,
        "slot_fill_rate": mapped / (k * n) if n else 0.0,
    }
    for fmt in ("list", "numbered", "lines", "failed"):
        out[f"format_{fmt}"] = sum(a.fmt == fmt for a in answers)
    return out
