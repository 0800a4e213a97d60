"""The replica rule, the distances' units and the bootstrap interval against closed forms."""

from fractions import Fraction

import numpy as np
import pytest

from sdmem.audit.replicas import (bootstrap_interval, distance_ratio, parse_threshold, replica_flags,
                                  rms_distance)
from sdmem.errors import InputError


@pytest.mark.parametrize("text,expected", [("1/3", Fraction(1, 3)), ("0.25", Fraction(1, 4)), ("1", Fraction(1)),
                                           (0.5, Fraction(1, 2))])
def test_parse_threshold(text, expected):
    assert parse_threshold(text) == expected


@pytest.mark.parametrize("bad", ["0", "-0.1", "1.5", "abc", "1/0", ""])
def test_parse_threshold_rejects(bad):
    with pytest.raises(InputError, match="--threshold"):
        parse_threshold(bad)


def test_replica_rule_is_strict_and_exact():
    # d1/d2 == 1/3 exactly is NOT a replica; a hair below is.
    sq = np.array([[1.0, 9.0], [1.0, 10.0], [0.0, 5.0], [4.0, 36.0], [4.0, 37.0], [0.0, 0.0]])
    assert replica_flags(sq).tolist() == [False, True, True, False, True, False]
    # Large integer squared distances, near the top of float64's exact integer range:
    d2 = 9 * (10**15 + 1)
    sq = np.array([[10.0**15 + 1, float(d2)], [10.0**15, float(d2)]])
    assert replica_flags(sq).tolist() == [False, True]


def test_replica_rule_other_thresholds_and_float_input():
    sq = np.array([[0.25, 1.0], [0.2499, 1.0], [0.5, 2.0000001]])  # d1/d2 = 0.5, <0.5, <0.5
    assert replica_flags(sq, Fraction(1, 2)).tolist() == [False, True, True]


def test_distance_units_and_ratio():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 32, 32, 3))
    sq = float(np.sum((a.astype(np.int64) - b) ** 2))
    assert rms_distance(np.array([sq]), a.size)[0] == pytest.approx(np.linalg.norm(a - b) / np.sqrt(3 * 32 * 32))
    assert distance_ratio(np.array([[4.0, 16.0], [0.0, 0.0]])).tolist() == [0.5, 1.0]


def test_bootstrap_matches_resampling_and_normal_approximation():
    flags = np.zeros(2000, bool)
    flags[:600] = True  # p = 0.3
    lo, hi = bootstrap_interval(flags)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 2000)
    assert lo < 0.3 < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    # Explicit resampling with replacement gives the same interval within Monte-Carlo error.
    rng = np.random.default_rng(1)
    explicit = flags[rng.integers(0, 2000, (2000, 2000))].mean(axis=1)
    elo, ehi = np.quantile(explicit, [0.025, 0.975])
    assert lo == pytest.approx(elo, abs=0.006) and hi == pytest.approx(ehi, abs=0.006)
    assert bootstrap_interval(np.ones(50, bool)) == (1.0, 1.0)
