"""Reference values the budget tests compare the merchant's accountant with."""

from __future__ import annotations

from opacus.accountants import PRVAccountant

from shared.privacy.events import MechanismEvent


def reference_epsilon(calls: list[MechanismEvent], delta: float = 1e-5) -> float:
    """One live Opacus accountant that saw every single step of every call."""
    accountant = PRVAccountant()
    for call in calls:
        for _ in range(call.steps):
            accountant.step(noise_multiplier=call.noise_multiplier, sample_rate=call.sample_rate)
    return float(accountant.get_epsilon(delta))
