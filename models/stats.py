"""Confidence intervals shared by every report: over seeds (Student t) and over lists (bootstrap).

Plain numpy and :mod:`math`, no scipy. Three intervals:

- :func:`t_quantile` / :func:`mean_ci` / :func:`seed_summary`: the two-sided Student-t interval
  of a mean, ``mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`` with ``s`` the sample
  standard deviation (``ddof=1``). It assumes the values are independent draws of a normal
  variable; with one value the interval collapses to the mean.
- :func:`paired_bootstrap_ci`: the percentile interval of ``mean(a - b)`` over lists, from
  resampling the lists with replacement (pairs kept together).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def _t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4).

    With ``theta = atan(t / sqrt(df))`` and ``c = cos(theta)^2``:

    - odd ``df``: ``2/pi * (theta + sin(theta) cos(theta) * (1 + 2/3 c + 2*4/(3*5) c^2 + ...))``,
      the series ending at the term in ``c^((df-3)/2)`` (no series for ``df = 1``);
    - even ``df``: ``sin(theta) * (1 + 1/2 c + 1*3/(2*4) c^2 + ...)``, ending at
      ``c^((df-2)/2)``.
    """
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta) ** 2
    if df % 2:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = 1.0, 1.0
        for j in range(1, (df - 1) // 2):
            term *= c * (2 * j) / (2 * j + 1)
            total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for j in range(1, df // 2):
        term *= c * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` for Student's t with ``df`` degrees of freedom.

    That is the ``(1 + confidence) / 2`` quantile: 12.706 for 95 % and ``df = 1``, 4.303 for
    ``df = 2``. Found by bisection on ``theta = atan(t / sqrt(df))`` to double precision.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    df = int(df)
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided_mass(math.sqrt(df) * math.tan(mid), df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width ``t * s / sqrt(n)`` of its Student-t interval.

    ``None`` and non-finite values are left out. Returns ``(nan, nan)`` when nothing is left and
    a half-width of 0 for a single value.
    """
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), 0.0
    half = t_quantile(confidence, arr.size - 1) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return float(arr.mean()), half


def seed_summary(values: Any, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and the Student-t interval of a metric over seeds.

    Args:
        values: one value per seed.
        confidence: level of the two-sided interval ``mean +- t * std / sqrt(n)``.

    Returns:
        ``mean``, ``std`` (ddof=1; 0 with one seed), ``ci_low``, ``ci_high`` (equal to the mean
        with one seed) and ``n``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values is empty: need at least one seed")
    mean, half = mean_ci(v.tolist(), confidence)
    n = int(v.size)
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_bootstrap_ci(
    a: Any, b: Any, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Paired bootstrap CI of ``mean(a - b)`` over lists.

    Args:
        a, b: per-list metric values ``[lists]`` of two systems on the same lists, same order.
        n_boot: bootstrap resamples of the lists (with replacement).
        seed: seed of the resampling.
        alpha: 1 - confidence level (0.05 gives a 95 % percentile interval).

    Returns:
        ``mean_diff``, ``ci_low``, ``ci_high`` (the ``alpha/2`` and ``1 - alpha/2`` quantiles of
        the resampled mean differences), ``p_value`` (two-sided bootstrap p-value: twice the
        share of resampled mean differences on the far side of 0, capped at 1; a rough guide,
        not an exact test) and ``n`` (lists).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a {x.shape} and b {y.shape} must have the same number of lists")
    if x.size == 0:
        raise ValueError("a and b are empty: nothing to compare")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diff = x - y
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bound the index matrix to ~32 MB
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        means[start : start + m] = diff[idx].mean(axis=1)
    mean_diff = float(diff.mean())
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if mean_diff >= 0:
        tail = float((means <= 0).mean())
    else:
        tail = float((means >= 0).mean())
    return {
        "mean_diff": mean_diff,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": min(1.0, 2.0 * tail),
        "n": int(n),
    }
