from __future__ import annotations

import math

import polars as pl
import pytest

from tasks.rlrf4rec.genre_reward import genre_share, named_genres, top_genres

ALL = ["Action", "Comedy", "Romance", "Sci-Fi", "War", "Children's", "Film-Noir", "Drama"]


def test_named_genres_reads_word_forms() -> None:
    text = "They love romantic comedies, science fiction and a good film noir."
    assert named_genres(text, ALL) == {"Romance", "Comedy", "Sci-Fi", "Film-Noir"}
    assert named_genres("Kids' films and family dramas; ACTION!", ALL) == {
        "Children's",
        "Drama",
        "Action",
    }


def test_named_genres_needs_whole_words() -> None:
    # "Star Wars" is a title, "warm" and "reaction" are not genres, "dramatically" no drama.
    assert named_genres("Star Wars, a warm reaction, dramatically told", ALL) == set()
    assert named_genres("", ALL) == set()


def test_unknown_genre_matches_its_own_name() -> None:
    assert named_genres("Readers of Literary Fiction and poetry", ["Literary Fiction"]) == {
        "Literary Fiction"
    }


def _lists() -> tuple[pl.DataFrame, pl.DataFrame]:
    items = pl.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5],
            "genres": [["Comedy"], ["Comedy", "Romance"], ["Drama"], ["War"], ["unknown"]],
        }
    )
    lists = pl.DataFrame(
        {
            "user_id": [10, 10, 20],
            "item_ids": [[1, 2, 3], [4, 2, 5], [1, 3, 4]],
            "labels": [[1, 1, 0], [1, 1, 1], [0, 0, 0]],
        }
    )
    return lists, items


def test_top_genres_from_positives() -> None:
    lists, items = _lists()
    # user 10 liked items 1, 2, 4, 2, 5: Comedy 3, Romance 2, War 1 (unknown left out);
    # user 20 liked nothing.
    assert top_genres(lists, items, k=2) == {10: ("Comedy", "Romance")}
    assert top_genres(lists, items, k=3) == {10: ("Comedy", "Romance", "War")}
    with pytest.raises(ValueError, match="k must be"):
        top_genres(lists, items, k=0)


def test_genre_share_is_the_named_fraction() -> None:
    top = {10: ("Comedy", "Romance", "War")}
    shares = genre_share(
        [10, 10, 10, 20],
        ["Funny romcoms", "war films and comedies and romances", "Nature documentaries", "x"],
        top,
    )
    assert shares[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert math.isnan(shares[3])  # no top genre: no reward
    with pytest.raises(ValueError, match="users for"):
        genre_share([10], ["a", "b"], top)
