"""How spend is accounted: every ε computation and noise planning in fedshop.

The one place the accountant is called: Google's ``dp_accounting`` privacy-loss-distribution
(PLD) accountant, pessimistic (an upper bound on ε up to float error), for **replace-one**
neighbours (``shared.privacy.events.NEIGHBOURS_REPLACE_ONE``): every reply states N exactly,
so only datasets of one size are neighbours (docs/privacy.md, "N is public"). Opacus' PRV and
RDP accountants, and dp_accounting's RDP, bound add/remove neighbours only for Poisson-sampled
Gaussians, so none of them can account what fedshop releases; add/remove PLD is kept for the
empirical audit (whose canaries are added or left out) and as the reference a report shows
beside the replace-one ε (what keeping N secret would save). GDP is never used: it
under-reports by up to 40 %.

Replace-one for a Poisson-sampled Gaussian of clipping norm C (dp_accounting's REPLACE
adjacency): one unit's contribution x becomes x', both of norm ≤ C, so the compared outputs are
the mixtures (1-q)·N(0, σ²) + q·N(±C, σ²) — of the order of twice the add/remove ε at small
q. An evaluation release (q = 1) is a Gaussian of sensitivity 2C.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from shared.privacy.events import NEIGHBOURS_ADD_REMOVE, NEIGHBOURS_REPLACE_ONE, MechanismEvent

# What the merchant's state, its replies and the ledger name the accountant (``accountant``).
ACCOUNTANT = "pld"
# The PLD grid Δ. Pessimistic at any Δ (never below the true ε; ``server.audit.pld_allowance``
# bounds the excess by steps · Δ), and with connect-the-dots far tighter than that bound: on the
# default demo's histories and a 120-step q = 1/8 one, Δ = 1e-3 gave the same ε as 1e-4 to
# within 3e-5, 15x faster (0.16 s against 2.5 s on this machine; building one step's PLD is
# most of it, and the audit re-derives ε per ledger row).
DISCRETIZATION = 1e-3


def _grouped(events: Iterable[MechanismEvent]) -> list[tuple[float, float, int]]:
    """``(σ, q, steps)`` per distinct (σ, q), steps summed: composition is commutative, so the
    order of calls does not change ε, and one self-composition per group keeps a long history
    (updates interleaved with evaluations) as cheap as a short one."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps > 0:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    # Sorted: the same spend gives the same float whatever order it happened in.
    return [(sigma, q, n) for (sigma, q), n in sorted(steps.items())]


def _relation(neighbours: str) -> Any:
    import dp_accounting

    relations = {NEIGHBOURS_REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
                 NEIGHBOURS_ADD_REMOVE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE}
    if neighbours not in relations:
        raise ValueError(f"neighbours = {neighbours!r}: must be one of {sorted(relations)}")
    return relations[neighbours]


@functools.lru_cache(maxsize=256)
def _step(sigma: float, q: float, neighbours: str, discretization: float) -> Any:
    """The PLD of one Poisson-sampled Gaussian step, as dp_accounting's ``PLDAccountant`` builds it
    for a ``PoissonSampledDpEvent`` (pessimistic, connect-the-dots). Building it is most of the cost
    of an ε (~0.4 s) and a merchant's history repeats a few (σ, q) pairs; PLDs are immutable."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, neighboring_relation=_relation(neighbours),
        value_discretization_interval=discretization)


def _compose(pld: Any, sigma: float, q: float, steps: int, neighbours: str, discretization: float) -> Any:
    part = _step(sigma, q, neighbours, discretization).self_compose(steps)
    return part if pld is None else pld.compose(part)


def epsilon_pld(events: Iterable[MechanismEvent], delta: float, *, neighbours: str = NEIGHBOURS_REPLACE_ONE,
                discretization: float = DISCRETIZATION) -> float:
    """ε of the composed ``events`` at ``delta`` by dp_accounting's PLD, for ``neighbours``."""
    _relation(neighbours)
    return _epsilon_of(tuple(_grouped(events)), delta, neighbours, discretization)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, neighbours: str,
                discretization: float) -> float:
    """ε of a grouped history (a pure function of it: cached, since a merchant's check and
    commit, the ledger audit's rows and a run's report ask for the same histories again)."""
    pld = None
    for sigma, q, steps in history:
        pld = _compose(pld, sigma, q, steps, neighbours, discretization)
    return 0.0 if pld is None else float(pld.get_epsilon_for_delta(delta))


def epsilon(events: Iterable[MechanismEvent], delta: float) -> float:
    """The merchant's ε: what its budget is checked against, its replies report and the ledger keeps."""
    return epsilon_pld(events, delta)


def noise_for_budget(target_epsilon: float, delta: float, *, sample_rate: float, steps: int, calls: int,
                     max_grad_norm: float = 1.0, history: Iterable[MechanismEvent] = (),
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
        return epsilon(past + [event] * calls, delta) <= target_epsilon

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
