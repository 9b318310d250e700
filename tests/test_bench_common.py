import math

import pytest

from apical.bench.common import markdown_table, mean_std, paired_ci, t95


def test_paired_ci_matches_a_hand_computation():
    a, b = [0.5, 0.7, 0.6, 0.9], [0.4, 0.5, 0.6, 0.6]
    diffs = [0.1, 0.2, 0.0, 0.3]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    m, lo, hi = paired_ci(a, b)
    assert m == pytest.approx(mean)
    assert hi - m == pytest.approx(3.182 * sd / 2)
    assert lo == pytest.approx(2 * m - hi)


def test_helpers():
    assert mean_std([1.0]) == (1.0, 0.0)
    assert t95(4) == 2.776 and t95(11) == 2.201 and t95(100) == 2.0
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines()[2] == "| 1 | 2 |"
    with pytest.raises(ValueError):
        paired_ci([1.0], [])
