"""What happened: the mechanism events of DP-SGD calls, in Opacus / dp_accounting vocabulary.

A ``MechanismEvent`` records a run of ``steps`` DP-SGD steps with Poisson sampling at
``sample_rate``, Gaussian noise ``noise_multiplier`` and clipping norm ``max_grad_norm``. How
those events are *accounted* (PRV, PLD, RDP) is ``shared.privacy.accounting``'s concern; any
accountant can recompute ε from the recorded events.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

# Recorded with every private call's spend, by the merchant (``shared.privacy.budget.SpendEntry.noise``)
# and on the wire (``shared.wire.PrivacyFacts.noise``, so the server's ledger keeps it): private
# calls draw their noise and batches from fresh generators (``client.dp.private_generators``).
# Spend recorded without it was made by an earlier version whose noise repeated across calls
# (its reported ε does not hold); both audits say so.
NOISE_SOURCE = "fresh-per-call"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MechanismEvent:
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def validate(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier = {self.noise_multiplier!r}: must be a finite number > 0")
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate = {self.sample_rate!r}: must lie in (0, 1]")
        if self.steps < 0:
            raise ValueError(f"steps = {self.steps!r}: must be >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm = {self.max_grad_norm!r}: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MechanismEvent:
        event = cls(
            noise_multiplier=float(raw["noise_multiplier"]),
            sample_rate=float(raw["sample_rate"]),
            steps=int(raw["steps"]),
            max_grad_norm=float(raw["max_grad_norm"]),
        )
        event.validate()
        return event


def compose_history(events: Iterable[MechanismEvent]) -> list[tuple[float, float, int]]:
    """Events as Opacus-style ``(noise_multiplier, sample_rate, steps)`` history.

    Consecutive events with the same (σ, q) are merged, exactly as an Opacus accountant
    merges its own steps; so ε from a persisted history equals ε of one live accountant
    that took all the steps.
    """
    history: list[tuple[float, float, int]] = []
    for event in events:
        if event.steps == 0:
            continue
        if history and history[-1][0] == event.noise_multiplier and history[-1][1] == event.sample_rate:
            sigma, q, steps = history[-1]
            history[-1] = (sigma, q, steps + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))
    return history
