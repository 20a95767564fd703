"""Confidence intervals for the accuracies verify measures, in plain Python (no scipy).

An accuracy measured on a few pictures is not a point: 1 right answer out of 20 is compatible with
a true rate anywhere from 0.1% to 25% at 95% confidence. verify reports every accuracy with its
Clopper-Pearson interval and can gate on the interval's bound instead of the point.

Why Clopper-Pearson rather than Wilson: an auditor signs a bound ("the forgotten people are named
at most 5% of the time"), so the interval must keep its promised coverage for every true rate,
also near 0 and 1 where verify's forget accuracies sit. Clopper-Pearson is exact (inverts the
binomial test; coverage is never below the nominal level), Wilson is shorter but covers less than
the nominal level for some rates at small n. Wilson is here too, for comparison.

Why this interval for a drop of two accuracies on the same items: the drop before - after is
(lost - gained) / n, where `lost` items were right before and wrong after and `gained` the
reverse. Its upper end is the exact upper bound of the lost rate, its lower end minus that of the
gained rate (each at one-sided level (1 - confidence) / 2, so both together miss at most
1 - confidence). It is paired (it uses which items changed, not only the two totals), exact and
conservative. Newcombe's paired square-and-add interval (his method 10) is shorter but collapses
to [0, 0] when no item changed and the accuracy is neither 0 nor 1: 20 unchanged items would
"prove" a drop of exactly zero.
"""
from __future__ import annotations

import math
from statistics import NormalDist

CONFIDENCE = 0.95
METHOD = "Clopper-Pearson"


def check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
    return float(confidence)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (stable for large n)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    return min(1.0, sum(math.exp(lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                        for i in range(k + 1)))


def _bisect_decreasing(f, target: float, iterations: int = 100) -> float:
    """The p in (0, 1) where the decreasing function f(p) crosses `target`."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if f(mid) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval for a binomial rate, k successes out of n: the rates a two-sided
    binomial test at level 1 - confidence does not reject."""
    _check_counts(k, n)
    tail = (1 - check_confidence(confidence)) / 2
    low = 0.0 if k == 0 else _bisect_decreasing(lambda p: binomial_cdf(k - 1, n, p), 1 - tail)
    high = 1.0 if k == n else _bisect_decreasing(lambda p: binomial_cdf(k, n, p), tail)
    return low, high


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval: shorter than Clopper-Pearson, not guaranteed to cover at small n."""
    _check_counts(k, n)
    z = NormalDist().inv_cdf(1 - (1 - check_confidence(confidence)) / 2)
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(k: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """The interval verify reports for an accuracy, rounded for the report."""
    return [round(x, 6) for x in clopper_pearson(k, n, confidence)]


def drop_interval(lost: int, gained: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval for the drop of an accuracy measured twice on the same n items, (lost - gained) / n
    (see the module's note on why)."""
    _check_counts(lost + gained, n)
    return -clopper_pearson(gained, n, confidence)[1], clopper_pearson(lost, n, confidence)[1]


def items_needed(limit: float, confidence: float = CONFIDENCE) -> int | None:
    """The fewest items on which an upper bound can be at or under `limit` at all: with 0 errors
    (0 right on forgotten pictures, 0 kept items lost) the upper end is 1 - ((1 - confidence) / 2)^(1/n),
    which shrinks as n grows. None when no number of items can show it (limit <= 0)."""
    if limit <= 0:
        return None
    if limit >= 1:
        return 1

    def fits(n):
        return clopper_pearson(0, n, confidence)[1] <= limit

    high = 1
    while not fits(high):
        high *= 2
    low = high // 2  # fits(low) is false, or low == 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def _check_counts(k: int, n: int) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
