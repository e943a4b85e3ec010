"""Empirical ε lower bounds from one training run: the statistics of a canary audit.

A one-run audit inserts each of ``m`` canaries with probability 1/2, trains once, and makes
``r`` guesses ("inserted" / "not inserted"; it may abstain on the rest), ``v`` of them right.
A training that really is private cannot make ``v`` large, so a large ``v`` rejects every
privacy claim under which it would be unlikely. Two tests of that kind are here:

* **Steinke, Nasr & Jagielski 2023** ("Privacy Auditing with One (1) Training Run",
  arXiv:2305.08846, NeurIPS 2023): valid for any (ε, δ)-DP training. Each guess is then no
  better than ε-DP randomized response, right with probability at most e^ε / (1 + e^ε), so

      p(ε) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2·m·δ · max_{i=1..v} P[v > Binomial(r, e^ε/(1+e^ε)) ≥ v−i] / i,

  and every ε with p(ε) < β = 1 − confidence is rejected. Loose by construction: r right
  guesses out of r prove at most about ln(r / ln(1/β)) — ≈ 5.1 for 500 right guesses out of
  1,000 canaries at δ = 1e-5, 7.5 for 25,000 out of 50,000 — so a claim of ε = 8 can never be
  refuted with it, however badly the training leaks.

* **Mahloujifar, Melis & Chaudhuri 2024** ("Auditing f-Differential Privacy in One Run",
  arXiv:2410.22235, ICML 2025): the same game, analysed through a trade-off curve f instead of
  (ε, δ). The claim tested is "the training is f-DP" for the trade-off curve of the Gaussian
  mechanism (μ-GDP, Dong, Roth & Su 2019) whose privacy profile passes through (ε, δ); the
  curve carries far more than the single point (ε, δ), so the same guesses refute much
  larger claims: 500 right out of 1,000 canaries reject up to ε ≈ 9.9 (δ = 1e-5), enough for
  a noise-off control to refute ε = 8. What it refutes is the Gaussian curve at that ε; a
  DP-SGD training's own curve (subsampled, composed Gaussian) is close to but not exactly
  Gaussian, which the Steinke bound, valid for any (ε, δ)-DP training, does not depend on.
  The algorithm follows jax-privacy 2.0's reference implementation
  (``jax_privacy.auditing._epsilon_one_run_fdp``), written here in numpy/scipy.

Both need the guess counts fixed before any score is seen; choosing the cut that maximises
the bound after looking would be a different, data-dependent test whose confidence level
does not hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special, stats

_BISECTION_STEPS = 60  # halves [0, ε_max] 60 times: far below any ε resolution that matters
_EPS_TOL = 1e-9  # root-finding tolerance on ε for the f-DP bound
_EPS_CEILING = 1e4  # no count of guesses proves more; past it the search is broken, not slow


def _check_counts(*, m: int, r: int, v: int, delta: float, confidence: float) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m; got m = {m!r}, r = {r!r}, v = {v!r}")
    if not (0.0 <= delta < 1.0):
        raise ValueError(f"delta = {delta!r}: must lie in [0, 1)")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence = {confidence!r}: must lie strictly between 0 and 1")


# --------------------------------------------------------------------------- Steinke et al. 2023
def steinke_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Chance of ``v`` or more right guesses out of ``r`` (``m`` canaries) if training were (ε, δ)-DP."""
    p = float(special.expit(epsilon))  # e^ε / (1 + e^ε): ε-DP randomized response's accuracy
    tail = float(stats.binom.sf(v - 1, r, p))  # P[W >= v]
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # P[v > W >= v - i] for i = 1..v is the running sum of pmf(v-1), pmf(v-2), ..., pmf(0).
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
    band = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(band.max()))


def steinke_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` right guesses out of ``r`` (``m`` canaries) reject at ``confidence``.

    Steinke, Nasr & Jagielski's bound for (ε, δ)-DP, found by bisection on ε (the p-value's
    binomial tail grows with ε): every ε below the returned value is rejected with
    confidence ``confidence``; 0 when nothing is (e.g. no better than chance, ``v <= r / 2``).
    """
    _check_counts(m=m, r=r, v=v, delta=delta, confidence=confidence)
    beta = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return steinke_p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < beta

    if r == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # even v = r stops rejecting near ln(r / ln(1/β)): a few doublings
        low, high = high, 2.0 * high
        if high > _EPS_CEILING:
            raise ArithmeticError(f"ε lower bound did not converge (m = {m}, r = {r}, v = {v})")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


# --------------------------------------------------------------------------- Gaussian DP
def _log_delta_gaussian(epsilon: float, mu: float) -> float:
    """ln δ(ε) of μ-GDP: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2019,
    Cor. 2.13; the analytic Gaussian mechanism of Balle & Wang 2018), in logs so that the
    e^ε of a large ε cannot overflow."""
    a = float(special.log_ndtr(-epsilon / mu + mu / 2.0))
    b = epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2.0))
    if b >= a:  # only by rounding, where δ is far below anything asked for
        return -math.inf
    return a + math.log1p(-math.exp(b - a))


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The μ for which μ-GDP is exactly (ε, δ)-DP: the Gaussian mechanism with sensitivity 1
    and noise σ = 1/μ whose privacy profile passes through (ε, δ).

    0 when δ = 0 (no Gaussian mechanism is pure DP), ∞ when δ = 1 or ε = ∞.
    """
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon = {epsilon!r}: must be >= 0")
    if not (0.0 <= delta <= 1.0):
        raise ValueError(f"delta = {delta!r}: must lie in [0, 1]")
    if delta == 1.0 or math.isinf(epsilon):
        return math.inf
    if delta == 0.0:
        return 0.0
    target = math.log(delta)

    def gap(mu: float) -> float:  # increases with μ: less noise, more δ at the same ε
        return _log_delta_gaussian(epsilon, mu) - target

    low, high = 0.1, 1.0
    while gap(low) > 0:
        low, high = low / 10.0, low
    while gap(high) < 0:
        low, high = high, high * 10.0
    return float(optimize.brentq(gap, low, high, xtol=1e-14, rtol=1e-14))


def gaussian_blow_up_inverse(mu: float) -> Callable[[float], float]:
    """x ↦ Φ(Φ⁻¹(x) − μ): the inverse of μ-GDP's blow-up x ↦ Φ(Φ⁻¹(x) + μ) = 1 − f(1 − x), where
    f(α) = Φ(Φ⁻¹(1 − α) − μ) is μ-GDP's trade-off curve. The blow-up is the most an event of
    probability x on one neighbouring dataset can weigh on the other."""
    if math.isinf(mu):
        return lambda x: 1.0 if x >= 1.0 else 0.0
    return lambda x: float(special.ndtr(special.ndtri(x) - mu))


# --------------------------------------------------------------------------- Mahloujifar et al. 2024
def fdp_excess(*, m: int, r: int, v: int, significance: float, blow_up_inverse: Callable[[float], float]) -> float:
    """Positive iff ``v`` right out of ``r`` guesses (``m`` canaries) refute the f-DP claim at ``significance``.

    Mahloujifar, Melis & Chaudhuri 2024, the f-DP bound on how likely ``v`` right guesses
    are (their ``audit_rh_with_cap``, as jax-privacy 2.0 implements it): start from the
    probability mass the event "v right" must carry to be seen with probability β
    (``right = β·v/m``, ``wrong = β·(r−v)/m``), and walk down one right guess at a time; at
    each step the trade-off curve says how much mass the neighbouring outcome (one right
    guess fewer) must carry (``wrong`` rises to at least ``blow_up_inverse(right)``), which
    feeds back into ``right`` in proportion i / (r − i). If the mass forced onto the r guesses
    exceeds what they can hold (r / m), such a run has probability below β under the claim,
    which is rejected. Any trade-off curve can be plugged in through its blow-up inverse.
    """
    if r == 0:
        return -1.0
    right = significance * v / m
    wrong = significance * (r - v) / m
    for i in range(v - 1, -1, -1):
        forced = max(wrong, blow_up_inverse(right))
        if forced == wrong:  # nothing moves now, so nothing moves at any later step either
            break
        right = min(right + (i / (r - i)) * (forced - wrong), 1.0)
        wrong = forced
    return right + wrong - r / m


def fdp_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε whose Gaussian trade-off curve (μ-GDP with that (ε, δ)) ``v`` right guesses
    out of ``r`` (``m`` canaries) reject at ``confidence``; 0 when none is.

    Mahloujifar, Melis & Chaudhuri 2024 with the Gaussian curve, ε found by Brent's method (a
    larger ε is a larger μ, a lower curve, so the excess falls as ε grows). δ must be > 0:
    no Gaussian curve is (ε, 0)-DP.
    """
    _check_counts(m=m, r=r, v=v, delta=delta, confidence=confidence)
    if delta == 0.0:
        raise ValueError("delta = 0: the f-DP bound tests Gaussian curves, none of which is (ε, 0)-DP")
    significance = 1.0 - confidence

    def excess(epsilon: float) -> float:
        return fdp_excess(m=m, r=r, v=v, significance=significance,
                          blow_up_inverse=gaussian_blow_up_inverse(gaussian_mu(epsilon, delta)))

    if r == 0 or excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        low, high = high, 2.0 * high
        if high > _EPS_CEILING:
            raise ArithmeticError(f"f-DP ε lower bound did not converge (m = {m}, r = {r}, v = {v})")
    return float(optimize.brentq(excess, low, high, xtol=_EPS_TOL))


# --------------------------------------------------------------------------- what an audit can show
@dataclasses.dataclass(frozen=True)
class Bounds:
    """One count of guesses through both tests."""

    steinke: float
    fdp: float

    @property
    def largest(self) -> float:
        return max(self.steinke, self.fdp)


def lower_bounds(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> Bounds:
    """Both ε lower bounds for ``v`` right guesses out of ``r`` among ``m`` canaries."""
    return Bounds(steinke=steinke_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence),
                  fdp=fdp_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence))


def power(*, m: int, r: int, delta: float, confidence: float = 0.95) -> Bounds:
    """The largest ε an audit with ``r`` guesses among ``m`` canaries can ever prove: every guess
    right. A claim at or above it cannot be refuted by that audit, whatever the training does."""
    return lower_bounds(m=m, r=r, v=r, delta=delta, confidence=confidence)


def best_expected_correct(*, m: int, k_plus: int, k_minus: int, seen: float) -> float:
    """Expected right guesses of the best attack when each inserted canary reaches training
    with probability ``seen`` and only those that do can leave a trace.

    A canary never sampled into a batch leaves the trained model exactly as if it had not
    been inserted, so even an attack that recognises every sampled canary faces a pool of
    the m/2 left-out canaries plus the (1 − seen)·m/2 unsampled ones, inserted with
    probability (1 − seen) / (2 − seen). Its "inserted" guesses go to the seen canaries first
    (all right), then to the pool; its "left out" guesses all go to the pool.
    """
    if not (0.0 <= seen <= 1.0):
        raise ValueError(f"seen = {seen!r}: must lie in [0, 1]")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k_plus = {k_plus}, k_minus = {k_minus}: need both >= 0 and a sum <= m = {m}")
    sampled = seen * m / 2.0
    inserted_in_pool = (1.0 - seen) / (2.0 - seen)
    return (min(k_plus, sampled) + max(0.0, k_plus - sampled) * inserted_in_pool
            + k_minus * (1.0 - inserted_in_pool))


def canaries_to_prove(epsilon: float, *, delta: float, confidence: float = 0.95, guess_fraction: float = 0.5,
                      start: int = 100, limit: int = 102_400) -> int | None:
    """The smallest canary count (a power of two times ``start``) whose audit, guessing on
    ``guess_fraction`` of them, can prove more than ``epsilon``; None past ``limit``."""
    m = start
    while m <= limit:
        r = max(1, int(m * guess_fraction))
        if power(m=m, r=r, delta=delta, confidence=confidence).largest > epsilon:
            return m
        m *= 2
    return None
