"""The one error measure used wherever two arrays are compared (export validation, engine checks, tests).

``relative_error(a, ref) = max|a - ref| / max(1, max|ref|)``: an absolute error for outputs of magnitude up to 1,
a relative one above that, computed in float64 so the measure itself adds no rounding.
"""

from __future__ import annotations

import numpy as np

RELATIVE_ERROR_METRIC = "max|x - ref| / max(1, max|ref|)"


def relative_error(x, ref) -> float:
    """``max|x - ref| / max(1, max|ref|)`` in float64; ``x`` and ``ref`` are array-likes of one shape."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))
