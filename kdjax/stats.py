"""Statistics for results over seeds: the mean and its 95% Student-t confidence interval."""

from __future__ import annotations

import math

import numpy as np

from kdjax.errors import InputError

__all__ = ["mean_ci", "t975"]

# Student-t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (95% two-sided).

    Args:
      df: degrees of freedom, at least 1.

    Returns:
      The quantile (a table to 30, then a Cornish-Fisher expansion; error < 1e-4).

    Raises:
      InputError: ``df`` below 1.
    """
    if df < 1:
        raise InputError(f"df: expected >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile; error < 1e-4 here
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval.

    Args:
      values: numbers (any shape; flattened).

    Returns:
      ``(mean, half-width)``; the half-width is NaN for one value (one sample has no interval,
      and 0 would read as certainty).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
