"""JSON for records that may hold NaN or infinity (no DP → ε = inf; undefined metrics)."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """A copy with non-finite floats as ``None``: strict JSON has no NaN or Infinity, and every
    reader (jq, JavaScript, pandas) should be able to parse what fedshop writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
