"""How a user's demographics read in a prompt, for both pipelines: the gender words and the age
(ML-100K stores the age in years, ML-1M an age-bucket code)."""

from __future__ import annotations

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


def describe_age(age: int | None, dataset: str, buckets: dict[int, str] | None = None) -> str:
    """``age`` as a prompt says it: the bucket's words for ML-1M (``buckets``, default
    :data:`ML1M_AGE_BUCKETS`; an unknown code stays a number), the years otherwise,
    ``unknown`` for None."""
    if age is None:
        return "unknown"
    if dataset == "ml-1m":
        return (buckets or ML1M_AGE_BUCKETS).get(int(age), str(age))
    return str(age)
