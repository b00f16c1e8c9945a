"""Parsing LLM answers into titles and mapping them onto the catalogue (You et al., 3.2)."""

from __future__ import annotations

import polars as pl
import pytest
from rapidfuzz import fuzz, process

from models.direct_metrics import metrics_at_k
from tasks.direct.title_mapping import (
    Catalogue,
    MappingConfig,
    format_titles,
    mapping_counts,
    normalise_title,
    parse_answer,
)

TITLES = {
    1: "Shawshank Redemption, The (1994)",
    2: "Usual Suspects, The (1995)",
    3: "Free Willy 2: The Adventure Home (1995)",
    4: "American President, The (1995)",
    5: "Star Wars (1977)",
    6: "Aliens (1986)",
    7: "Alien (1979)",
    8: "Raiders of the Lost Ark (1981)",
    9: "Devil's Advocate, The (1997)",
    10: "Devil's Own, The (1997)",
    11: "Godfather, The (1972)",
    12: "Godfather: Part II, The (1974)",
    13: "Jaws (1975)",
    14: "Jaws 2 (1978)",
    15: "Die xue shuang xiong (Killer, The) (1989)",
    16: "Chasing Amy (1997)",
    17: "Psycho (1960)",
    18: "Bridge on the River Kwai, The (1957)",
    19: "English Patient, The (1996)",
    20: "Sleeper (1973)",
    21: "Dead Poets Society (1989)",
    22: "Everyone Says I Love You (1996)",
    23: "Saint, The (1997)",
    24: "Half Baked (1998)",
    25: "Rocket Man (1997)",
    26: "For Richer or Poorer (1997)",
    27: "Horseman on the Roof, The (Hussard sur le toit, Le) (1995)",
    268: "Chasing Amy (1997)",  # ML-100K lists some titles twice under two ids
}


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    items = pl.DataFrame({"item_id": list(TITLES), "title": list(TITLES.values())})
    return Catalogue.from_items(items)


# --------------------------------------------------------------------------- parsing

# The paper's Table 2, as the model wrote them.
GROUND_TRUTH = (
    "[\"Devil's Advocate, The (1997)\", 'Jaws (1975)', 'Alien (1979)', "
    "'Raiders of the Lost Ark (1981)', 'Psycho (1960)']"
)
PRE_SFT = (
    "['For Richer or Poorer (comedy)', 'Half Baked (comedy)', 'Everyone Says I Love You "
    "(comedy, musical, romance)', 'The Saint (action, romance, thriller)', 'Rocket Man (comedy)']"
)
POST_SFT = (
    "['Sleeper (1973)', 'Bridge on the River Kwai, The (1957)', 'English Patient, The (1996)', "
    "'Raiders of the Lost Ark', \"Dead Poets Society\"]"
)
POST_DPO = (
    "['Bridge on the River Kwai, The (1957)', 'Alien (1979)', \"Devil's Advocate, The (1997)\", "
    "'Raiders of the Lost Ark (1981)', 'Jaws (1975)']"
)


def test_parse_paper_answers():
    gt = parse_answer(GROUND_TRUTH)
    assert gt.fmt == "list" and gt.titles[0] == "Devil's Advocate, The (1997)"
    assert len(gt.titles) == 5
    pre = parse_answer(PRE_SFT)
    # genre tags the prompt showed are dropped, the titles stay
    assert pre.titles == [
        "For Richer or Poorer",
        "Half Baked",
        "Everyone Says I Love You",
        "The Saint",
        "Rocket Man",
    ]
    post = parse_answer(POST_SFT)
    assert post.titles[1] == "Bridge on the River Kwai, The (1957)"
    assert post.titles[4] == "Dead Poets Society"


def test_parse_malformed_lists():
    # apostrophe inside single quotes (not valid Python) and no closing bracket
    p = parse_answer("['Devil's Advocate, The (1997)', 'Jaws (1975)', 'Alien (1979)")
    assert p.titles == ["Devil's Advocate, The (1997)", "Jaws (1975)", "Alien (1979)"]
    assert p.truncated and p.fmt == "list"
    # unquoted items, as in the paper's Figure 2: a title's ", The" is glued back
    p = parse_answer(
        "[American President, The (1995), Jaws (1975), "
        "Nightmare Before Christmas, The (1993) (childrens, comedy, musical)]"
    )
    assert p.titles == [
        "American President, The (1995)",
        "Jaws (1975)",
        "Nightmare Before Christmas, The (1993)",
    ]
    # the prompt's placeholder is echoed first, then the real list (adjacent literals)
    p = parse_answer("Format: ['movie_name', 'movie_name', ... 'movie_name']\n['Jaws' 'Alien']")
    assert p.titles == ["Jaws", "Alien"]
    # text around the list
    p = parse_answer('Sure! Here you go: ["Schindler\'s List", "It\'s a Wonderful Life"]. Enjoy!')
    assert p.titles == ["Schindler's List", "It's a Wonderful Life"]


def test_parse_numbered_and_lines():
    p = parse_answer(
        "Here are my picks:\n1. The Shawshank Redemption\n2. **Psycho** - a classic\n3) Jaws"
    )
    assert p.fmt == "numbered"
    assert p.titles == ["The Shawshank Redemption", "Psycho", "Jaws"]
    p = parse_answer("- Alien\n* Jaws 2")
    assert p.fmt == "numbered" and p.titles == ["Alien", "Jaws 2"]
    p = parse_answer("Jaws\nAlien\n\nPsycho\n")
    assert p.fmt == "lines" and p.titles == ["Jaws", "Alien", "Psycho"]
    # one line, several titles with years: split after each year, commas in titles kept
    p = parse_answer("Jaws (1975), American President, The (1995), Alien (1979)")
    assert p.titles == ["Jaws (1975)", "American President, The (1995)", "Alien (1979)"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        "   \n ",
        "['movie_name', 'movie_name', ... 'movie_name']",
        "I'm sorry, but as an AI language model I cannot know which movies you would like to "
        "watch next, because that depends on many factors such as your mood and taste.",
        "[]",
    ],
)
def test_parse_failures(text):
    p = parse_answer(text)
    assert p.failed and p.titles == [] and p.n_found == 0


def test_parse_caps_at_k_and_counts_the_rest():
    p = parse_answer(str([f"Movie {i}" for i in range(8)]))
    assert p.titles == [f"Movie {i}" for i in range(5)] and p.n_found == 8
    assert parse_answer("['a1', 'b2', 'c3']", k=2).titles == ["a1", "b2"]
    with pytest.raises(ValueError, match="k must be"):
        parse_answer("x", k=0)


def test_format_titles_round_trip_keeps_commas():
    titles = ["American President, The (1995)", "Devil's Advocate, The (1997)", 'A "q" (1990)']
    text = format_titles(titles)
    assert text.startswith("['American President, The (1995)'")
    assert parse_answer(text).titles == titles


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("The Shawshank Redemption", 1),  # article moved (the paper's example)
        ("Shawshank Redemption, The (1994)", 1),  # exact
        ("Raiders of the Lost Ark", 8),  # missing year
        ("Shawshank", 1),  # partial title
        ("The American President", 4),  # a title with a comma
        ("Devils Advocate", 9),  # apostrophe dropped
        ("The Godfather", 11),
        ("Godfather Part II", 12),  # token order / punctuation
        ("Alien", 7),  # tie with "Aliens (1986)": the closer string wins
        ("The Horseman on the Roof", 27),
        ("Die xue shuang xiong", 15),
    ],
)
def test_map_paper_style_titles(catalogue, query, expected):
    item, title, score = catalogue.match(query)
    assert item == expected, (query, title, score)


def test_match_is_extract_one_with_wratio(catalogue):
    # Without tie-breaking the result is rapidfuzz's extractOne over the processed titles.
    for query in ("The Shawshank Redemption", "Alien", "Jaws", "Godfather Part II"):
        best = process.extractOne(normalise_title(query), catalogue.normalised, scorer=fuzz.WRatio)
        item, _, score = catalogue.match(query, tie_break=False)
        assert item == catalogue.title_item[best[2]] and score == pytest.approx(best[1])
    # and without the processor it is the paper's bare call
    best = process.extractOne("Raiders of the Lost Ark", catalogue.titles, scorer=fuzz.WRatio)
    item, _, _ = catalogue.match("Raiders of the Lost Ark", normalise=False, tie_break=False)
    assert item == catalogue.title_item[best[2]]


def test_normalise_title():
    assert normalise_title("Shawshank Redemption, The (1994)") == "the shawshank redemption 1994"
    assert normalise_title("Devil's Advocate, The (1997)") == "the devils advocate 1997"
    assert normalise_title("Die xue shuang xiong (Killer, The) (1989)") == (
        "die xue shuang xiong killer the 1989"
    )


def test_map_answer_duplicates_cutoff_and_exclusion(catalogue):
    m = catalogue.map_answer("['Jaws', 'Jaws (1975)', 'Alien', 'Inception', 'Psycho']")
    assert m.item_ids[:3] == [13, None, 7] and m.item_ids[4] == 17
    assert m.n_duplicates == 1 and m.n_unmapped == 0  # no cutoff: "Inception" maps somewhere
    cut = catalogue.map_answer(
        "['Jaws', 'Jaws (1975)', 'Alien', 'Inception', 'Psycho']", MappingConfig(score_cutoff=80)
    )
    assert cut.item_ids == [13, None, 7, None, 17]
    assert (cut.n_mapped, cut.n_duplicates, cut.n_unmapped) == (3, 1, 1)
    # context exclusion: "Alien" seen in the context maps to the best other title
    ex = catalogue.map_answer("['Alien']", MappingConfig(exclude_context=True), context=[7])
    assert ex.item_ids == [6]
    off = MappingConfig(exclude_context=False)
    plain = catalogue.map_answer("['Alien']", off, context=[7])
    assert plain.item_ids == [7] and plain.n_context == 1


def test_exclusion_of_the_window_and_earlier_ratings(catalogue):
    """By default a title of the prompt's window and one of the user's earlier ratings map to
    the best other title; with the switch off they map onto themselves. Repeats of the prompt
    are counted before exclusion either way."""
    answer = "['Alien (1979)', 'Jaws (1975)', 'Psycho (1960)']"
    window, earlier = [7, 20], [13, 1]  # Alien is in the prompt; Jaws was rated before it
    history = earlier + window
    on = catalogue.map_answer(answer, context=window, history=history)
    assert MappingConfig().exclude_context is True
    assert on.item_ids == [6, 14, 17]  # Aliens (1986), Jaws 2 (1978), Psycho untouched
    assert on.n_repeats == 1 and on.n_context == 0
    off = catalogue.map_answer(
        answer, MappingConfig(exclude_context=False), context=window, history=history
    )
    assert off.item_ids == [7, 13, 17]
    assert off.n_repeats == 1 and off.n_context == 1
    counts = mapping_counts([on, catalogue.map_answer("['Psycho']", context=window)])
    assert counts["repeat_share"] == 0.5 and counts["titles_repeating_prompt"] == 1


def test_twin_titles_are_one_item(catalogue):
    assert catalogue.canonical([268, 16, 13]) == [16, 13]
    m = catalogue.map_answer("['Chasing Amy (1997)']")
    assert m.item_ids == [16]


def test_paper_table2_metrics(catalogue):
    gt = catalogue.canonical([9, 13, 7, 8, 17])
    post_sft = catalogue.map_answer(POST_SFT)
    assert post_sft.item_ids == [20, 18, 19, 8, 21]
    out = metrics_at_k(post_sft.item_ids, gt)
    assert out["precision@5"] == pytest.approx(0.2)  # only Raiders, at rank 4
    post_dpo = catalogue.map_answer(POST_DPO)
    assert metrics_at_k(post_dpo.item_ids, gt)["precision@5"] == pytest.approx(0.8)
    assert metrics_at_k(catalogue.map_answer(GROUND_TRUTH).item_ids, gt)["ndcg@5"] == 1.0


def test_mapping_counts(catalogue):
    answers = [
        catalogue.map_answer(POST_SFT),
        catalogue.map_answer(
            "no titles here at all, sorry, I really cannot help with this one "
            "because I do not know the user well enough to say anything."
        ),
        catalogue.map_answer("['Jaws', 'Jaws']"),
    ]
    c = mapping_counts(answers)
    assert c["answers"] == 3 and c["parse_failures"] == 1
    assert c["parse_failure_rate"] == pytest.approx(1 / 3)
    assert c["titles_parsed"] == 7 and c["titles_mapped"] == 6 and c["duplicates"] == 1
    assert c["mapped_title_rate"] == pytest.approx(6 / 7)
    assert c["slot_fill_rate"] == pytest.approx(6 / 15)
    assert c["format_list"] == 2 and c["format_failed"] == 1


def test_catalogue_validates_columns():
    with pytest.raises(ValueError, match="item_id and title"):
        Catalogue.from_items(pl.DataFrame({"id": [1]}))
    with pytest.raises(ValueError, match="score_cutoff"):
        MappingConfig(score_cutoff=120)
