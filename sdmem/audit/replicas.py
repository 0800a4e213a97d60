"""The paper's replica rule (d1/d2 < 1/3), memorization ratio, KNN distance and bootstrap intervals."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..errors import InputError

DEFAULT_THRESHOLD = Fraction(1, 3)


def parse_threshold(value: str | float | Fraction) -> Fraction:
    """'1/3', '0.25' or a number -> an exact Fraction in (0, 1]; anything else is an InputError."""
    try:
        t = Fraction(str(value).strip()) if not isinstance(value, Fraction) else value
    except (ValueError, ZeroDivisionError):
        raise InputError("--threshold", f"expected a number in (0, 1] such as 1/3 or 0.3, got {value!r}") from None
    if not 0 < t <= 1:
        raise InputError("--threshold", f"must lie in (0, 1] (the paper uses 1/3), got {value}")
    return t


def replica_flags(sqdist: np.ndarray, threshold: Fraction = DEFAULT_THRESHOLD) -> np.ndarray:
    """Replica iff d1/d2 < threshold, strict (paper Eq. 62), decided exactly.

    ``sqdist`` is [Q, 2] squared distances. With integer squared distances (the uint8 path) the test
    q²·d1² < p²·d2² runs in Python integers, so no rounding can flip a borderline flag.
    """
    d1, d2 = sqdist[:, 0], sqdist[:, 1]
    p, q = threshold.numerator, threshold.denominator
    if np.all(np.floor(sqdist) == sqdist) and np.all(sqdist < 2.0**53):
        d1o = d1.astype(np.int64).astype(object)
        d2o = d2.astype(np.int64).astype(object)
        return np.asarray(d1o * (q * q) < d2o * (p * p), dtype=bool)
    return d1 * (q * q) < d2 * (p * p)


def distance_ratio(sqdist: np.ndarray) -> np.ndarray:
    """d1/d2 per query (1.0 where both distances are 0)."""
    d1, d2 = np.sqrt(sqdist[:, 0]), np.sqrt(sqdist[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1), 1.0)
    return r


def rms_distance(sqdist: np.ndarray, dim: int) -> np.ndarray:
    """The paper's distance in 0–255 units: ||a − b||₂ / sqrt(C·H·W)."""
    return np.sqrt(sqdist / dim)


def bootstrap_interval(flags: np.ndarray, *, level: float = 0.95, num_resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the memorization ratio.

    Resampling Q flags with replacement and counting replicas is exactly a Binomial(Q, p̂) draw, so the
    bootstrap distribution is sampled directly instead of materialising Q×B resamples.
    """
    n = len(flags)
    if n == 0:
        return (float("nan"), float("nan"))
    p_hat = float(np.mean(flags))
    rng = np.random.default_rng(seed)
    ratios = rng.binomial(n, p_hat, size=num_resamples) / n
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
