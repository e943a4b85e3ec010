"""How spend is accounted: every ε computation and noise planning in fedshop.

The one place the accountants are called: Opacus' PRV (the merchant's default; it agrees with
Google's PLD to ~0.01 ε) and RDP, and Google's ``dp_accounting`` PLD (the independent
reference the audits use) and RDP. Each takes ``MechanismEvent``s, so any of them can
recompute ε from what was recorded. GDP is never used: it under-reports by up to 40 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from shared.privacy.events import MechanismEvent, compose_history


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


def _opacus_epsilon(accountant_class: Any, events: Iterable[MechanismEvent], delta: float) -> float:
    history = compose_history(events)
    if not history:
        return 0.0
    accountant = accountant_class()
    accountant.history = list(history)
    # An unsampled release (q = 1: an accounted evaluation) makes Opacus' PRV take log(1 - q) =
    # log(0) inside an np.where that then discards it; the result is right, the warning is noise.
    with np.errstate(divide="ignore"):
        return float(accountant.get_epsilon(delta))


def epsilon_prv(events: Iterable[MechanismEvent], delta: float) -> float:
    """ε by Opacus' PRV accountant (the default; agrees with PLD to ~0.01 ε)."""
    from opacus.accountants import PRVAccountant

    return _opacus_epsilon(PRVAccountant, events, delta)


def epsilon_opacus_rdp(events: Iterable[MechanismEvent], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    return _opacus_epsilon(RDPAccountant, events, delta)


def epsilon(events: Iterable[MechanismEvent], delta: float, accountant: str = "prv") -> float:
    if accountant == "prv":
        return epsilon_prv(events, delta)
    if accountant == "rdp":
        return epsilon_opacus_rdp(events, delta)
    raise ValueError(f"accountant = {accountant!r}: must be 'prv' or 'rdp'")


def noise_for_budget(target_epsilon: float, delta: float, *, sample_rate: float, steps: int, calls: int,
                     max_grad_norm: float = 1.0, accountant: str = "prv", history: Iterable[MechanismEvent] = (),
                     floor: float = 0.3, tolerance: float = 0.01, hint: float | None = None) -> float:
    """The smallest noise multiplier, at least ``floor`` (within ``tolerance``, relative), at
    which ``calls`` more training calls of ``steps`` steps at ``sample_rate``, after the events
    already in ``history``, stay within ``target_epsilon``; never above it.

    Bisection on log σ: ε falls as σ grows. When even σ = 100 does not fit, 100 is returned
    and the budget check that follows refuses the call.

    ``hint``: a σ likely to be the answer (the one the previous call of a run planned: that
    plan, followed, leaves exactly its own σ for the calls after). It only narrows the search
    — two ε evaluations instead of about a dozen when it is right — and the answer keeps the
    same guarantee either way.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and calls >= 1 and steps >= 1 and floor > 0):
        raise ValueError(f"need target_epsilon > 0, 0 < delta < 1, calls >= 1, steps >= 1, floor > 0; got "
                         f"{target_epsilon}, {delta}, {calls}, {steps}, {floor}")
    past = list(history)

    def fits(sigma: float) -> bool:
        event = MechanismEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                               max_grad_norm=max_grad_norm)
        return epsilon(past + [event] * calls, delta, accountant) <= target_epsilon

    ceiling = max(100.0, floor)
    low, high = floor, ceiling
    if hint is not None and low < hint < high:
        if not fits(hint):
            low = hint  # too little noise: the answer lies above it
        else:
            below = max(low, hint / (1.0 + tolerance))
            if not fits(below):
                return hint
            if below == low:
                return low
            high = below  # more noise than needed: search beneath it
    if low == floor and fits(low):
        return low
    if high == ceiling and not fits(high):
        return high
    while high / low > 1.0 + tolerance:
        mid = (low * high) ** 0.5
        if fits(mid):
            high = mid
        else:
            low = mid
    return high
