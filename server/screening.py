"""Screening of incoming updates before they may enter the average.

An update is rejected (logged with its merchant and reason, left out of the aggregate)
when its parameter names or shapes differ from the global model's, when any value is not
finite, or when its distance from the global parameters exceeds ``max_update_norm``. The
privacy spend of a rejected update is still recorded: the merchant did train.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str = ""
    update_norm: float = float("nan")


def screen_update(
    update: dict[str, np.ndarray], global_params: dict[str, np.ndarray], *, max_update_norm: float
) -> Verdict:
    missing = sorted(set(global_params) - set(update))
    extra = sorted(set(update) - set(global_params))
    if missing or extra:
        return Verdict(False, f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    squared = 0.0
    for name, reference in global_params.items():
        value = update[name]
        if value.shape != reference.shape:
            return Verdict(False, f"parameter {name!r} has shape {value.shape}, expected {reference.shape}")
        if not np.all(np.isfinite(value)):
            return Verdict(False, f"parameter {name!r} holds non-finite values (NaN or inf)")
        squared += float(np.sum((value.astype(np.float64) - reference.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if norm > max_update_norm:
        return Verdict(False, f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:.4g}", norm)
    return Verdict(True, "", norm)
