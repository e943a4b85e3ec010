"""What one round did (``RoundReport``: who was sampled, accepted, rejected, refused, failed,
the evaluation, the time) and what a whole run did (``FederationResult``); ``server.run_log``
writes the first, ``server.report`` sums them up."""

from __future__ import annotations

import dataclasses

import numpy as np


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


@dataclasses.dataclass(frozen=True)
class FederationResult:
    rounds_completed: int
    params: dict[str, np.ndarray]
    reports: list[RoundReport]
    stopped_because: str
