"""The accountant: PLD for replace-one neighbours, checked against independent values.

Known values used here:

* The Gaussian mechanism with sample rate 1 and one step has an exact (ε, δ) curve
  (Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy", Thm. 8):
  δ(ε) = Φ(Δ/(2σ) - εσ/Δ) - e^ε Φ(-Δ/(2σ) - εσ/Δ) for sensitivity Δ. Add/remove one unit moves a
  clipped sum by Δ = C; replacing it, by Δ = 2C. PLD must reproduce both.
* TensorFlow Privacy's MNIST DP-SGD tutorial (tensorflow/privacy, tutorials/README.md,
  "Select Parameters" table; the same MNIST setting as Opacus' mnist example): 60,000
  examples, batch 256, noise multiplier 1.12, 60 epochs, δ = 1e-5 -> "Privacy eps 2.92".
  That figure is add/remove RDP with the classic conversion ε = min_α RDP(α) + log(1/δ)/(α - 1)
  over the orders 1.1..10.9, 12..63; tight accountants (PLD, Opacus' PRV) give ≈2.3.
* Opacus' PRV accountant (an independent implementation, add/remove only) agrees with
  add/remove PLD to ~1 %: the dp_accounting calls are wired right.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from shared.privacy.accounting import ACCOUNTANT, epsilon, epsilon_pld
from shared.privacy.events import (
    NEIGHBOURS_ADD_REMOVE,
    NEIGHBOURS_REPLACE_ONE,
    NOISE_SOURCE,
    RELEASE_UPDATE,
    SPEND_KEYS,
    UNIT_RECORD,
    MechanismEvent,
    SpendEvent,
)

DELTA = 1e-5


def pld_eps(events: list[MechanismEvent], delta: float = DELTA, neighbours: str = NEIGHBOURS_REPLACE_ONE) -> float:
    # 1e-3 discretization: ~10x faster than the default and within 0.001 ε of it here.
    return epsilon_pld(events, delta, neighbours=neighbours, discretization=1e-3)


def event(sigma: float, q: float, steps: int) -> MechanismEvent:
    return MechanismEvent(noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0)


def prv(events: list[MechanismEvent], delta: float = DELTA) -> float:
    """Opacus' PRV (add/remove): the independent reference."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events if e.steps]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (2.0, 0.1, 50), (1.0, 1 / 3, 30)])
def test_add_remove_pld_agrees_with_opacus_prv_and_replace_one_costs_more(sigma: float, q: float, steps: int) -> None:
    events = [event(sigma, q, steps)]
    add_remove = pld_eps(events, neighbours=NEIGHBOURS_ADD_REMOVE)
    assert add_remove > 0
    assert prv(events) == pytest.approx(add_remove, rel=0.02)
    replace = pld_eps(events)
    # Replacing a unit is removing it and adding another: dearer than either, and within
    # what two such steps in a row (group privacy of 2, composed) would cost.
    assert add_remove * 1.1 < replace < pld_eps([event(sigma, q, 2 * steps)], neighbours=NEIGHBOURS_ADD_REMOVE) * 2
    # The merchant's ε is this replace-one PLD, on the default (finer) grid.
    assert epsilon(events, DELTA) == pytest.approx(replace, abs=2e-3 * steps / 10)
    assert ACCOUNTANT == "pld"


def test_heterogeneous_history_composes_in_any_order() -> None:
    events = [event(1.0, 0.02, 200), event(10.0, 1.0, 1), event(1.5, 0.05, 100), event(1.0, 0.02, 100)]
    pld = pld_eps(events)
    assert prv(events) < pld  # add/remove (Opacus) below replace-one
    # Composition costs: more than any part alone.
    assert pld > pld_eps(events[:3]) > pld_eps(events[:1])
    # An interleaved history (updates, an evaluation between them) costs what it costs sorted.
    assert pld_eps(events[::-1]) == pld
    assert pld_eps([events[0], events[3], events[1], events[2]]) == pld


def test_more_noise_and_fewer_steps_cost_less() -> None:
    base = pld_eps([event(1.0, 0.01, 1000)])
    assert pld_eps([event(2.0, 0.01, 1000)]) < base
    assert pld_eps([event(1.0, 0.01, 100)]) < base
    assert pld_eps([event(1.0, 0.01, 1000)], 1e-3) < base  # a looser δ buys a smaller ε


def test_unknown_neighbouring_relation_is_refused() -> None:
    with pytest.raises(ValueError, match="neighbours = 'swap'"):
        epsilon_pld([event(1.0, 0.1, 1)], DELTA, neighbours="swap")


# ----------------------------------------------------------------------------- known values


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Exact ε of one Gaussian mechanism (noise σ, the given sensitivity) at δ, by bisection on δ(ε)."""
    s = sigma / sensitivity  # only the ratio matters

    def delta_of(eps: float) -> float:
        return _phi(0.5 / s - eps * s) - math.exp(eps) * _phi(-0.5 / s - eps * s)

    lo, hi = 0.0, 50.0
    for _ in range(200):  # δ(ε) decreases in ε
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma", [1.0, 2.0, 10.0])
def test_single_full_batch_step_matches_analytic_gaussian(sigma: float) -> None:
    # Hand check of the formula at σ = 1: ε ≈ 4.377 (Balle & Wang's calibration, δ = 1e-5).
    assert analytic_gaussian_epsilon(1.0, DELTA) == pytest.approx(4.3772, abs=1e-3)
    events = [event(sigma, 1.0, 1)]  # q = 1, one step: an evaluation release (client.release)
    assert epsilon_pld(events, DELTA, neighbours=NEIGHBOURS_ADD_REMOVE) == pytest.approx(
        analytic_gaussian_epsilon(sigma, DELTA), rel=0.01)
    # Replace-one: the sum moves by up to 2C.
    assert epsilon_pld(events, DELTA) == pytest.approx(analytic_gaussian_epsilon(sigma, DELTA, sensitivity=2.0),
                                                       rel=0.01)


def test_tf_privacy_mnist_tutorial_value() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp

    q, steps = 256 / 60000, 60 * 60000 // 256
    # Reproduce the published 2.92 (σ = 1.12) with the classic RDP -> (ε, δ) conversion.
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = compute_rdp(q=q, noise_multiplier=1.12, steps=steps, orders=orders)
    classic = float(np.min(rdp + math.log(1 / DELTA) / (orders - 1)))
    assert round(classic, 2) == 2.92
    # The tight add/remove accountant is below the published figure; replace-one is above it.
    events = [event(1.12, q, steps)]
    add_remove = pld_eps(events, neighbours=NEIGHBOURS_ADD_REMOVE)
    assert 2.2 < add_remove < 2.92
    assert pld_eps(events) > add_remove


def test_no_events_cost_nothing() -> None:
    for neighbours in (NEIGHBOURS_REPLACE_ONE, NEIGHBOURS_ADD_REMOVE):
        assert epsilon_pld([], DELTA, neighbours=neighbours) == 0.0
        assert epsilon_pld([event(1.0, 0.1, 0)], DELTA, neighbours=neighbours) == 0.0
    assert epsilon([], DELTA) == 0.0


# ----------------------------------------------------------------------------- history


def test_split_history_costs_the_same_as_one_event() -> None:
    whole = [event(1.0, 0.05, 120)]
    split = [event(1.0, 0.05, 20)] * 6
    assert pld_eps(split) == pld_eps(whole)
    # The clipping norm does not enter the accounting (σ is relative to it).
    wide_clip = MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20, max_grad_norm=5.0)
    assert pld_eps([*split[:5], wide_clip]) == pld_eps(whole)


# ----------------------------------------------------------------------------- the record


def test_mechanism_event_round_trip_and_validation() -> None:
    e = event(1.3, 0.25, 17)
    assert MechanismEvent.from_dict(e.to_dict()) == e
    assert MechanismEvent.from_dict({"noise_multiplier": "1.3", "sample_rate": 0.25, "steps": "17",
                                     "max_grad_norm": 1}) == e
    for bad, field in [
        (dict(e.to_dict(), noise_multiplier=0.0), "noise_multiplier"),
        (dict(e.to_dict(), noise_multiplier=float("inf")), "noise_multiplier"),
        (dict(e.to_dict(), sample_rate=1.5), "sample_rate"),
        (dict(e.to_dict(), sample_rate=0.0), "sample_rate"),
        (dict(e.to_dict(), steps=-1), "steps"),
        (dict(e.to_dict(), max_grad_norm=0.0), "max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=field):
            MechanismEvent.from_dict(bad)
    with pytest.raises(KeyError):
        MechanismEvent.from_dict({"noise_multiplier": 1.0})


def test_spend_event_is_one_flat_record_of_one_release() -> None:
    mechanism = event(1.1, 1 / 4, 12)
    spend = SpendEvent.of(mechanism, unit_count=100, delta=DELTA, noise=NOISE_SOURCE)
    # q = 1/ceil(100/32) = 1/4 samples 25 records a step in expectation.
    assert spend.expected_batch == 25.0 and (spend.unit, spend.release) == (UNIT_RECORD, RELEASE_UPDATE)
    flat = spend.to_dict()
    assert tuple(flat) == SPEND_KEYS  # the wire's keys and the ledger's columns, in order
    assert {k: flat[k] for k in mechanism.to_dict()} == mechanism.to_dict()
    assert MechanismEvent.from_dict(flat) == mechanism  # the mechanism reads out of the spend
    assert SpendEvent.from_dict(flat) == spend
    assert SpendEvent.from_dict({k: v for k, v in flat.items() if k != "noise"}) == dataclasses.replace(spend,
                                                                                                        noise="")
    assert spend.neighbours == NEIGHBOURS_REPLACE_ONE  # the relation fedshop accounts (N is public)
    # A spend recorded before the relation was kept was accounted for add/remove neighbours.
    assert SpendEvent.from_dict({k: v for k, v in flat.items() if k != "neighbours"}).neighbours == \
        NEIGHBOURS_ADD_REMOVE
    with pytest.raises(KeyError, match="unit_count"):
        SpendEvent.from_dict({k: v for k, v in flat.items() if k != "unit_count"})
    # A call that released nothing, or released without DP, keeps the shape (σ = q = 0).
    nothing = SpendEvent.of(MechanismEvent(noise_multiplier=0.0, sample_rate=0.0, steps=0, max_grad_norm=1.0),
                            unit_count=0, delta=0.0, noise="")
    nothing.validate()
    assert SpendEvent.from_dict(nothing.to_dict()) == nothing
    for bad, field in [
        (dict(flat, sample_rate=1.5), "sample_rate"),
        (dict(flat, noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(flat, delta=1.0), "delta"),
        (dict(flat, steps=-1), "steps"),
        (dict(flat, unit_count=-1), "unit_count"),
        (dict(flat, expected_batch=float("inf")), "expected_batch"),
        (dict(flat, unit="merchant"), "unit"),  # "user" is a unit since privacy-unit
        (dict(flat, release="broadcast"), "release"),  # "evaluation" is one: accounted evaluation
        (dict(flat, neighbours="swap-two"), "neighbours"),
    ]:
        with pytest.raises(ValueError, match=field):
            SpendEvent.from_dict(bad).validate()
