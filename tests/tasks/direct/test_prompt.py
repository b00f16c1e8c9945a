"""The second pipeline's prompt (You et al., Figure 2), word for word."""

from __future__ import annotations

from datetime import date

import pytest

from tasks.direct.prompt import direct_prompt, format_cutoff, movie_with_genres

USER = {"gender": "F", "age": 25, "occupation": "engineer"}


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
