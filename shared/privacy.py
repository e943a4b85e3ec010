"""Privacy vocabulary shared by the client, the server and the auditor.

A ``MechanismEvent`` records *what happened*: a run of ``steps`` DP-SGD steps with
Poisson sampling at ``sample_rate``, Gaussian noise ``noise_multiplier`` and clipping norm
``max_grad_norm``. How those events are *accounted* (PRV, PLD, RDP) is a separate choice;
any accountant can recompute ε from the recorded events.

This module accounts with Google's ``dp_accounting`` (PLD and RDP): the independent
accountant the server and auditors use. The merchant's own default accountant (Opacus PRV)
lives with the trainer in ``client.dp``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

# Recorded with every private call's spend, by the merchant (``client.budget.SpendEntry.noise``)
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


def _dp_event(history: Sequence[tuple[float, float, int]]) -> Any:
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )


def epsilon_pld(events: Iterable[MechanismEvent], delta: float, *, discretization: float = 1e-4) -> float:
    """ε by Google's privacy-loss-distribution accountant (tight; the audit reference)."""
    from dp_accounting.pld import pld_privacy_accountant

    history = compose_history(events)
    if not history:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))


def epsilon_rdp(events: Iterable[MechanismEvent], delta: float) -> float:
    """ε by Rényi DP (dp_accounting); an upper bound that typically over-reports by 6-21%."""
    from dp_accounting.rdp import rdp_privacy_accountant

    history = compose_history(events)
    if not history:
        return 0.0
    # Fractional orders below 2 fail to converge in dp_accounting for q ~ 0.1 (it then drops
    # them with a warning each); from 2 up the bound loses little at the ε of interest.
    orders = [2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64)) + [128, 256, 512, 1024]
    accountant = rdp_privacy_accountant.RdpAccountant(orders)
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))
