"""Statistics over seeds: mean, standard deviation, and the Student t interval of a paired
difference (pure Python: the lab's results are small lists of floats)."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def mean_and_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, sample standard deviation with n - 1 in the denominator; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom.

    F(t) = 1 - I_x(df/2, 1/2) / 2 for t >= 0, x = df / (df + t^2), with I the regularised
    incomplete beta function (Abramowitz & Stegun 26.7.1 and 26.5.27); symmetric for t < 0.
    """
    x = df / (df + t * t)
    tail = 0.5 * _regularized_beta(x, df / 2, 0.5)
    return 1 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on `student_t_cdf`."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"student_t_quantile: need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > p:
        low *= 2
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def paired_difference(runs: Sequence[float], baseline: Sequence[float],
                      lower_is_better: bool) -> dict:
    """The paired difference d_s = runs[s] - baseline[s] over seeds s (same seed: same initial
    weights and data order), as results.json's `paired` entries:

        mean_diff = mean_s d_s
        ci95      = mean_diff -/+ t_{0.975, n-1} * sd(d) / sqrt(n)   (Student t, n seeds;
                    None for n < 2)
        wins      = number of seeds where the run is better: d_s < 0 when lower is better,
                    else d_s > 0
    """
    if len(runs) != len(baseline) or not runs:
        raise ValueError("paired_difference: one value per seed for both, at least one seed")
    differences = [run - base for run, base in zip(runs, baseline)]
    n = len(differences)
    mean_diff, sd = mean_and_sd(differences)
    interval = None
    if sd is not None:
        half_width = student_t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        interval = [mean_diff - half_width, mean_diff + half_width]
    wins = sum(difference < 0 if lower_is_better else difference > 0
               for difference in differences)
    return {"mean_diff": mean_diff, "ci95": interval, "wins": wins, "n": n}


def resolved(paired: dict) -> bool:
    """The 95% interval of a paired difference excludes 0."""
    interval = paired["ci95"]
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (Numerical Recipes 3rd ed., sec. 6.4, eq. 6.4.5),
    evaluated with the modified Lentz method; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps
    x on the side where the fraction converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_beta(1 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a
