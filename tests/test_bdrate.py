"""BD-rate against reference values: exact cases, VCEG-M33's cubic formula, and PCHIP worked by hand."""

import math

import bjontegaard
import numpy as np
import pytest
from scipy.interpolate import PchipInterpolator

from evaluation.bdrate import bd_rate, frontier

# libx265 at two preset settings, the worked example of the FAU-LMS bjontegaard package (README)
RATE_A = [9487.76, 4593.60, 2486.44, 1358.24]
PSNR_A = [40.037, 38.615, 36.845, 34.851]
RATE_T = [9787.80, 4469.00, 2451.52, 1356.24]
PSNR_T = [40.121, 38.651, 36.970, 34.987]

# the sample curves circulated with the common Python port of VCEG-M33 (Anserw/Bjontegaard_metric)
R1, P1 = [686.76, 309.58, 157.11, 85.95], [40.28, 37.18, 34.24, 31.42]
R2, P2 = [893.34, 407.8, 204.93, 112.75], [40.39, 37.21, 34.17, 31.24]


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0, 1.25, 3.0])
def test_uniform_rate_scale_is_exact(factor):
    """A test curve that is the anchor with every rate times k has a BD-rate of exactly (k - 1)."""
    b = bd_rate(RATE_A, PSNR_A, np.array(RATE_A) * factor, PSNR_A)
    assert b.percent == pytest.approx(100 * (factor - 1), abs=1e-9)
    assert (b.low, b.high, b.overlap) == (min(PSNR_A), max(PSNR_A), 1.0)


def test_vcegm33_cubic_reference():
    """VCEG-M33 (third-order polynomial fit of log-rate over PSNR), evaluated here from its
    definition, gives 31.3974 % on the sample curves (the value the port prints); the package's
    'cubic' method agrees, and PCHIP stays within a few tenths on these smooth curves."""
    lr1, lr2 = np.log(R1), np.log(R2)
    p1, p2 = np.polyint(np.polyfit(P1, lr1, 3)), np.polyint(np.polyfit(P2, lr2, 3))
    lo, hi = max(min(P1), min(P2)), min(max(P1), max(P2))
    avg = ((np.polyval(p2, hi) - np.polyval(p2, lo)) - (np.polyval(p1, hi) - np.polyval(p1, lo))) / (hi - lo)
    reference = (math.exp(avg) - 1) * 100
    assert reference == pytest.approx(31.3974, abs=1e-4)
    assert bjontegaard.bd_rate(R1, P1, R2, P2, method="cubic") == pytest.approx(reference, abs=1e-9)
    assert bd_rate(R1, P1, R2, P2).percent == pytest.approx(reference, abs=0.1)


def test_pchip_matches_hand_integration():
    """PCHIP BD-rate integrated independently (scipy's monotone Hermite spline, log10 rate over
    PSNR, mean gap over the overlap) equals the module's value, -4.4175 % on the x265 example."""
    fa = PchipInterpolator(PSNR_A[::-1], np.log10(RATE_A[::-1]))
    ft = PchipInterpolator(PSNR_T[::-1], np.log10(RATE_T[::-1]))
    lo, hi = max(min(PSNR_A), min(PSNR_T)), min(max(PSNR_A), max(PSNR_T))
    gap = (ft.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo)
    b = bd_rate(RATE_A, PSNR_A, RATE_T, PSNR_T)
    assert b.percent == pytest.approx((10 ** gap - 1) * 100, abs=1e-9)
    assert b.percent == pytest.approx(-4.4175, abs=1e-4)
    assert (b.low, b.high) == (34.987, 40.037)


def test_order_and_non_monotonic_points():
    """Points in any order give the same result; a point beaten by a cheaper one is dropped."""
    shuffled = bd_rate(RATE_A[::-1], PSNR_A[::-1], RATE_T[1::-1] + RATE_T[2:], PSNR_T[1::-1] + PSNR_T[2:])
    assert shuffled.percent == pytest.approx(bd_rate(RATE_A, PSNR_A, RATE_T, PSNR_T).percent, abs=1e-12)
    r, q = frontier([10, 20, 30, 40], [30, 29, 33, 33])
    assert list(r) == [10, 30] and list(q) == [30, 33]


def test_lower_is_better_metric():
    """For a distortion (e.g. GMSD) the same geometry gives the same BD-rate."""
    b = bd_rate(RATE_A, -np.array(PSNR_A), np.array(RATE_A) * 0.8, -np.array(PSNR_A), higher_is_better=False)
    assert b.percent == pytest.approx(-20.0, abs=1e-9)


def test_no_overlap_is_nan():
    b = bd_rate(RATE_A, PSNR_A, RATE_T, np.array(PSNR_T) - 10)
    assert math.isnan(b.percent) and b.overlap == 0.0
    assert math.isnan(bd_rate([1, 2], [30, 31], [5], [30.5]).percent)  # one point is no curve
