"""The shared intervals of :mod:`models.stats`, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.stats import mean_ci, paired_bootstrap_ci, seed_summary, t_quantile


def test_t_quantile_closed_forms() -> None:
    # df = 1 (Cauchy): P(|T| <= t) = 2 atan(t) / pi, so t = tan(pi * conf / 2).
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    # df = 2: P(|T| <= t) = t / sqrt(2 + t^2), so t = conf * sqrt(2 / (1 - conf^2)).
    assert t_quantile(0.95, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-12)
    assert t_quantile(0.90, 2) == pytest.approx(0.90 * math.sqrt(2 / (1 - 0.90**2)), rel=1e-12)
    # Printed tables: t(0.975, 4) = 2.776, t(0.975, 30) = 2.042, t(0.995, 9) = 3.250.
    assert t_quantile(0.95, 4) == pytest.approx(2.776, abs=5e-4)
    assert t_quantile(0.95, 30) == pytest.approx(2.042, abs=5e-4)
    assert t_quantile(0.99, 9) == pytest.approx(3.250, abs=5e-4)
    # Large df tends to the normal quantile 1.95996.
    assert t_quantile(0.95, 100_000) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.95, 0)


def test_mean_ci_hand_worked() -> None:
    # [1, 2, 3]: mean 2, s = 1, half = t(0.975, 2) / sqrt(3) = 4.30265 / 1.73205 = 2.48414.
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(2.48414, abs=1e-5)
    # [2, 4]: mean 3, s = sqrt(2), half = 12.7062 * sqrt(2) / sqrt(2) = 12.7062.
    assert mean_ci([2.0, 4.0]) == pytest.approx((3.0, 12.7062), abs=1e-4)
    # None and non-finite values are left out.
    assert mean_ci([1.0, None, float("nan"), 2.0, 3.0]) == (mean, half)
    assert mean_ci([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_seed_summary_hand_worked() -> None:
    s = seed_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["ci_low"] == pytest.approx(2.0 - 2.48414, abs=1e-5)
    assert s["ci_high"] == pytest.approx(2.0 + 2.48414, abs=1e-5)
    one = seed_summary([0.5])
    assert one == {"mean": 0.5, "std": 0.0, "ci_low": 0.5, "ci_high": 0.5, "n": 1}
    with pytest.raises(ValueError, match="empty"):
        seed_summary([])


def test_paired_bootstrap_ci_constant_difference() -> None:
    # Every list differs by exactly 0.1: every resampled mean is 0.1, so is the interval.
    b = np.array([0.2, 0.5, 0.7, 0.1])
    res = paired_bootstrap_ci(b + 0.1, b, n_boot=50)
    assert res["mean_diff"] == pytest.approx(0.1)
    assert res["ci_low"] == pytest.approx(0.1) and res["ci_high"] == pytest.approx(0.1)
    assert res["p_value"] == 0.0 and res["n"] == 4
    same = paired_bootstrap_ci(b, b, n_boot=20)
    assert same["mean_diff"] == 0.0 and same["p_value"] == 1.0


def test_paired_bootstrap_ci_two_lists() -> None:
    # Differences [0, 1]: a resample holds k ones out of 2 draws, mean k / 2 with k ~ Bin(2, 1/2),
    # so the resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 and the 95 %
    # percentile interval is [0, 1]; p = 2 * P(mean <= 0) = 0.5.
    res = paired_bootstrap_ci([1.0, 1.0], [1.0, 0.0], n_boot=20_000, seed=3)
    assert res["mean_diff"] == 0.5
    assert res["ci_low"] == 0.0 and res["ci_high"] == 1.0
    assert res["p_value"] == pytest.approx(0.5, abs=0.03)


def test_paired_bootstrap_ci_seeded_and_checked() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(500)
    a = b + 0.05 + rng.normal(0, 0.01, 500)
    res = paired_bootstrap_ci(a, b, n_boot=500, seed=1)
    assert res["ci_low"] < res["mean_diff"] < res["ci_high"]
    assert 0.04 < res["ci_low"] and res["ci_high"] < 0.06
    assert paired_bootstrap_ci(a, b, n_boot=500, seed=1) == res
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap_ci(a, b[:10])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap_ci([], [])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap_ci(a, b, n_boot=0)
