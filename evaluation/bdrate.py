"""Bjontegaard delta rate (VCEG-M33) with piecewise cubic interpolation on log-rate.

BD-rate is the average horizontal gap, in log10(rate), between two rate-quality curves over the
quality range both cover, as a percentage: -30 % means the test codec needs 30 % fewer bits than
the anchor for the same quality. The curves are interpolated with piecewise cubic Hermite
interpolation (PCHIP), as in the JCT-VC / JVET common-test-condition spreadsheets (JCTVC-L1100,
JVET-T2010), through the maintained ``bjontegaard`` package (FAU-LMS; its PCHIP matches the
JVET spreadsheet to 10 decimals), rather than VCEG-M33's single cubic polynomial, which can
oscillate.

A measured curve need not be monotonic (a codec's quality can dip at a higher rate): before
interpolating, each curve keeps only its rate-quality frontier, the points that no cheaper point
beats on quality. The result carries the quality range it was integrated over and how much of the
two curves' union that range covers; with no overlap there is no BD-rate (NaN).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import bjontegaard
import numpy as np


@dataclass(frozen=True)
class BDRate:
    percent: float  # NaN when the curves' quality ranges do not overlap
    low: float  # the quality range integrated over
    high: float
    overlap: float  # (high - low) / the union of both curves' quality ranges, 0..1
    anchor_points: int  # frontier points used
    test_points: int


def frontier(rates: np.ndarray, quality: np.ndarray, higher_is_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The points no cheaper point beats: sorted by rate, quality strictly improving."""
    rates, quality = np.asarray(rates, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    keep = np.isfinite(rates) & np.isfinite(quality) & (rates > 0)
    rates, quality = rates[keep], quality[keep]
    sign = 1.0 if higher_is_better else -1.0
    order = np.lexsort((-sign * quality, rates))  # by rate, the better quality first at equal rate
    best, r_out, q_out = -math.inf, [], []
    for i in order:
        if sign * quality[i] > best:
            best = sign * quality[i]
            r_out.append(rates[i])
            q_out.append(quality[i])
    return np.array(r_out), np.array(q_out)


def bd_rate(anchor_rates, anchor_quality, test_rates, test_quality, higher_is_better: bool = True) -> BDRate:
    """BD-rate of the test curve against the anchor curve, in percent (negative: test saves bits)."""
    ra, qa = frontier(anchor_rates, anchor_quality, higher_is_better)
    rt, qt = frontier(test_rates, test_quality, higher_is_better)
    nan = BDRate(math.nan, math.nan, math.nan, 0.0, len(ra), len(rt))
    if len(ra) < 2 or len(rt) < 2:
        return nan
    low, high = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    union = max(qa.max(), qt.max()) - min(qa.min(), qt.min())
    if high <= low:
        return nan
    if not higher_is_better:  # the package integrates over increasing quality
        qa, qt = -qa, -qt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small overlap is reported through ``overlap``, not a warning
        percent = bjontegaard.bd_rate(ra, qa, rt, qt, method="pchip", require_matching_points=False, min_overlap=0)
    return BDRate(float(percent), float(low), float(high), float((high - low) / union), len(ra), len(rt))
