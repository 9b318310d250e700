"""apical.stats: paired confidence intervals against scipy's paired t-test."""

import numpy as np
import pytest

from apical.stats import mean_std, paired_ci, t95

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("n", [2, 3, 5, 12, 20, 31])
def test_paired_ci_is_scipys_paired_t_interval(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.8, 0.05, n), rng.normal(0.78, 0.05, n)
    diff, lo, hi = paired_ci(list(a), list(b))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert diff == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    half = (ci.high - ci.low) / 2
    assert lo == pytest.approx(ci.low, abs=1e-3 * half) and hi == pytest.approx(ci.high, abs=1e-3 * half)


@pytest.mark.parametrize("dof", [*range(1, 31), 35, 45, 70, 119, 500])
def test_t95_is_exact_to_30_dof_and_never_below_the_quantile_beyond(dof):
    exact = stats.t.ppf(0.975, dof)
    if dof <= 30:
        assert t95(dof) == pytest.approx(exact, abs=5e-4)
    else:
        assert exact - 5e-4 <= t95(dof) <= stats.t.ppf(0.975, 30) + 5e-4  # conservative, by less than 0.03


def test_mean_std_is_numpys_sample_statistics():
    x = [0.3, 0.9, 0.4, 0.75]
    assert mean_std(x) == pytest.approx((np.mean(x), np.std(x, ddof=1)), abs=1e-15)
    assert mean_std([2.0]) == (2.0, 0.0)
