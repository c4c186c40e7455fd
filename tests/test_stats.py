"""sdeseg.stats: Student-t intervals of a mean over seeds and of seed-paired differences, against
hand-computed values."""

import math

import pytest

from sdeseg.stats import Interval, mean_interval, paired_difference


def test_mean_interval_is_the_student_t_interval():
    iv = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    half = 3.182446305 * sd / 2  # t(0.975, 3) = 3.182446305, sqrt(4) = 2
    assert (iv.n, iv.mean, iv.sd) == (4, 2.5, pytest.approx(sd))
    assert (iv.low, iv.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    wide = mean_interval([1.0, 2.0, 3.0, 4.0], confidence=0.99)  # t(0.995, 3) = 5.840909
    assert wide.high - 2.5 == pytest.approx(5.840909 * sd / 2, rel=1e-6)


def test_one_value_has_no_interval_and_resolves_nothing():
    iv = mean_interval([0.7])
    assert (iv.n, iv.mean, iv.sd, iv.low, iv.high) == (1, 0.7, None, None, None)
    assert iv.resolves() == "unresolved" and iv.format() == "+0.70 (n=1)"
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.0)


def test_paired_difference_uses_the_common_seeds_in_order():
    a = {0: 31.0, 1: 30.0, 2: 33.5, 5: 40.0}
    b = {2: 30.5, 0: 30.0, 1: 31.0, 3: 10.0}
    iv, per = paired_difference(a, b)
    assert per == {0: 1.0, 1: -1.0, 2: 3.0}  # seeds 3 and 5 are not in both
    assert iv.n == 3 and iv.mean == pytest.approx(1.0) and iv.sd == pytest.approx(2.0)
    assert iv.high == pytest.approx(1.0 + 4.302653 * 2.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.302653
    assert iv.resolves() == "unresolved"
    with pytest.raises(ValueError, match="no common seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_resolves_against_a_margin():
    iv = Interval(n=3, mean=2.0, sd=0.5, low=1.2, high=2.8)
    assert iv.resolves() == "above" and iv.resolves(1.0) == "above" and iv.resolves(1.5) == "unresolved"
    assert Interval(n=3, mean=-2.0, sd=0.5, low=-2.8, high=-1.2).resolves() == "below"
    assert iv.format() == "+2.00 [+1.20, +2.80]"
