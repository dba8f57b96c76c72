"""The lab's statistics over seeds (megatron_gbl_lab/stats.py) against tabulated values."""

import math

import pytest

from megatron_gbl_lab import stats
from megatron_gbl_lab.runs import parse_seeds

# Two-sided 95% critical values of Student's t (Abramowitz & Stegun, Table 26.10).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 30: 2.042,
         120: 1.980}


@pytest.mark.parametrize("df", list(T_975))
def test_t_quantile_matches_the_table(df):
    assert stats.student_t_quantile(0.975, df) == pytest.approx(T_975[df], abs=5e-4)
    assert stats.student_t_quantile(0.025, df) == pytest.approx(-T_975[df], abs=5e-4)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert stats.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.student_t_cdf(t, 2) == pytest.approx(
            0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_difference_and_resolution():
    baseline = [1.0, 2.0, 3.0, 4.0]
    run = [0.5, 1.4, 2.6, 3.3]  # lower in every seed by 0.5, 0.6, 0.4, 0.7
    paired = stats.paired_difference(run, baseline, lower_is_better=True)
    differences = [-0.5, -0.6, -0.4, -0.7]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = T_975[3] * sd / 2
    assert paired["mean_diff"] == pytest.approx(mean)
    assert paired["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-3)
    assert (paired["wins"], paired["n"]) == (4, 4) and stats.resolved(paired)
    noisy = stats.paired_difference([1.1, 1.9, 3.2, 3.8], baseline, lower_is_better=True)
    assert noisy["wins"] == 2 and not stats.resolved(noisy)
    higher = stats.paired_difference(run, baseline, lower_is_better=False)
    assert higher["wins"] == 0
    single = stats.paired_difference([1.0], [2.0], lower_is_better=True)
    assert single["ci95"] is None and not stats.resolved(single)
    assert stats.mean_and_sd([2.0]) == (2.0, None)


@pytest.mark.parametrize("text, message", [("0,x", "integers >= 0"), ("1,1", "twice"),
                                           ("-1", "integers >= 0"), ("", "integers >= 0")])
def test_bad_seeds(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)
    assert parse_seeds("4, 0,2") == [4, 0, 2]
