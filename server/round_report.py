"""What one round did (``RoundReport``: who was sampled, accepted, rejected, refused, failed,
the evaluation, the time) and what a whole run did (``FederationResult``); ``server.run_log``
writes the first, ``server.report`` sums them up."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from shared.metrics import BASELINES, THRESHOLD_KEY, baseline_key

# The metrics ctr's threshold applies to: shown "at p ≥ threshold" rather than on a line of its own.
_AT_THRESHOLD = ("ctr_precision", "ctr_recall", "ctr_f1")


@dataclasses.dataclass
class RoundReport:
    round: int
    sampled: list[str] = dataclasses.field(default_factory=list)
    accepted: list[str] = dataclasses.field(default_factory=list)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    bytes_received: int = 0
    slowest_train_s: float = 0.0  # the slowest accepted merchant's DP training loop
    slowest_client_s: float = 0.0  # ... and its whole train handler (loading data and model too)
    total_client_s: float = 0.0  # all accepted merchants' handler time (clients run one by one by default)
    wall_s: float = 0.0
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    epsilon: dict[str, float] = dataclasses.field(default_factory=dict)
    aggregated: bool = False  # False when every sampled merchant refused (budgets spent, or pins)

    def outcome_text(self) -> str:
        parts = [f"{m}: accepted" for m in self.accepted]
        parts += [f"{m}: rejected ({r})" for m, r in self.rejected.items()]
        parts += [f"{m}: refused ({r})" for m, r in self.refused.items()]
        parts += [f"{m}: failed ({r})" for m, r in self.failed.items()]
        return "; ".join(parts) or "no replies"

    def eval_text(self) -> str:
        """The round's evaluation on one line, each baseline beside its metric (``shown_metrics``)."""
        shown = shown_metrics(self.eval_metrics)
        return ", ".join(f"{k} {v:.4f}" + (f" {note}" if note else "") for k, v, note in shown)


def shown_metrics(metrics: Mapping[str, float | None]) -> list[tuple[str, float, str]]:
    """(metric, value, note) in name order, for a person to read: each baseline goes into its
    metric's note (``ctr_logloss 0.36 (constant base rate 0.47)``), ctr's threshold into the
    notes of the metrics taken at it, rather than on lines of their own. A baseline or threshold
    whose metric is missing keeps its own entry; undefined values (None, NaN) are left out."""
    values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    folded: set[str] = set()
    shown = []
    for key, value in sorted(values.items()):
        notes = []
        if key in BASELINES and baseline_key(key) in values:
            notes.append(f"{BASELINES[key]} {values[baseline_key(key)]:.4f}")
            folded.add(baseline_key(key))
        if key in _AT_THRESHOLD and THRESHOLD_KEY in values:
            notes.append(f"at p ≥ {values[THRESHOLD_KEY]:.4f}")
            folded.add(THRESHOLD_KEY)
        shown.append((key, value, f"({'; '.join(notes)})" if notes else ""))
    return [entry for entry in shown if entry[0] not in folded]


@dataclasses.dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    params: dict[str, np.ndarray]
    reports: list[RoundReport]
    stopped_because: str
