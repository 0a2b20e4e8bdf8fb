"""Text for results: how a mean and its confidence interval are printed (application layer)."""

from __future__ import annotations

import math

__all__ = ["fmt_ci"]


def fmt_ci(mean_half, *, signed: bool = False, digits: int = 4) -> str:
    """``"0.9512 ± 0.0113"``; a single value (``mean_ci`` gives no half-width) says so
    instead of printing a ``± 0`` that looks like certainty."""
    m, h = mean_half
    text = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    if h is None or not math.isfinite(h):
        return f"{text} (n = 1, no interval)"
    return f"{text} ± {h:.{digits}f}"
