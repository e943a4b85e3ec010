"""shared.privacy.auditing: the one-run ε lower bounds (Steinke et al. 2023; Mahloujifar et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from scipy import stats

from shared.privacy.auditing import (
    best_expected_correct,
    canaries_to_prove,
    fdp_epsilon_lower_bound,
    fdp_excess,
    gaussian_mu,
    lower_bounds,
    power,
    steinke_epsilon_lower_bound,
    steinke_p_value,
)

Bound = Callable[..., float]
BOUNDS = (steinke_epsilon_lower_bound, fdp_epsilon_lower_bound)


# --------------------------------------------------------------------------- both bounds
@pytest.mark.parametrize("bound", BOUNDS)
def test_chance_level_guessing_proves_nothing(bound: Bound) -> None:
    assert bound(m=100, r=100, v=50, delta=1e-5) == 0.0
    assert bound(m=1000, r=500, v=250, delta=1e-5) == 0.0
    assert bound(m=1000, r=500, v=260, delta=1e-5) == 0.0  # a little above chance is still chance at 95%
    assert bound(m=1000, r=0, v=0, delta=1e-5) == 0.0
    assert bound(m=100, r=100, v=10, delta=1e-5) == 0.0  # worse than chance


@pytest.mark.parametrize("bound", BOUNDS)
def test_more_correct_guesses_give_a_larger_bound(bound: Bound) -> None:
    bounds = [bound(m=1000, r=500, v=v, delta=1e-5) for v in range(250, 501, 10)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > 5.0
    # Strictly larger wherever anything is proved at all.
    proved = [b for b in bounds if b > 0]
    assert len(proved) > 10 and all(b2 > b1 for b1, b2 in zip(proved, proved[1:], strict=False))


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("bad", [dict(m=10, r=11, v=5), dict(m=10, r=5, v=6), dict(m=10, r=5, v=-1)])
def test_impossible_counts_are_refused(bound: Bound, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        bound(delta=1e-5, **bad)


def test_power_at_1000_canaries() -> None:
    # The figures in DESIGN.md's privacy model: 500 guesses among 1,000 canaries (the audit's
    # default, a quarter of them guessed each way), all right, at δ = 1e-5 and 95%.
    best = power(m=1000, r=500, delta=1e-5)
    assert best.steinke == pytest.approx(5.09, abs=0.01)
    assert best.fdp == pytest.approx(9.92, abs=0.01)
    assert best.largest == best.fdp
    # Guessing all 1,000 right would prove more; Steinke's needs 50,000 canaries for 7.5.
    assert power(m=1000, r=1000, delta=1e-5).fdp == pytest.approx(12.33, abs=0.01)
    assert power(m=50_000, r=25_000, delta=1e-5).steinke == pytest.approx(7.51, abs=0.01)
    # ε = 8 is out of Steinke's reach at 1,000 canaries, not of the f-DP bound's.
    assert best.steinke < 8.0 < best.fdp


def test_known_values_from_the_jax_privacy_reference() -> None:
    # jax-privacy 2.0's auditing_test.py, test_epsilon_one_run_close: 10,000 held-in and
    # 10,000 held-out canaries with deterministic N(shift, 1) / N(0, 1) scores, significance
    # 0.05 Bonferroni-divided over the N thresholds on the ROC hull, δ = 1e-6. Running the
    # reference's threshold search on those scores gives its best threshold as (r guesses, v
    # right, N); the expected ε are that test's own values.
    m, delta = 20_000, 1e-6
    fdp = {(406, 379, 386): 2.164749, (938, 934, 374): 4.7218075, (5436, 5436, 140): 9.133752}
    steinke = {(3376, 2807, 386): 1.13346, (4666, 4499, 374): 2.311945, (8233, 8223, 140): 4.395568}
    for (r, v, n), expected in fdp.items():
        got = fdp_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=1 - 0.05 / n)
        assert got == pytest.approx(expected, rel=1e-5), (r, v, n)
    for (r, v, n), expected in steinke.items():
        got = steinke_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=1 - 0.05 / n)
        assert got == pytest.approx(expected, rel=1e-5), (r, v, n)


def test_the_f_dp_bound_proves_more_from_the_same_guesses() -> None:
    for m, r, v in [(1000, 500, 500), (1000, 500, 450), (200, 100, 90), (20_000, 406, 379)]:
        both = lower_bounds(m=m, r=r, v=v, delta=1e-5)
        assert both.fdp > both.steinke, (m, r, v, both)


# --------------------------------------------------------------------------- Steinke et al.
def test_steinke_all_correct_matches_the_hand_computed_value() -> None:
    # r = v = 100, δ = 0: the p-value is P[Binomial(100, p) >= 100] = p^100 with
    # p = e^ε / (1 + e^ε). It is < 0.05 while p < 0.05^(1/100) = exp(ln(0.05) / 100)
    # = exp(-0.0299573) = 0.9704870, so ε < ln(p / (1 - p)) = ln(0.9704870 / 0.0295130)
    # = ln(32.8834) = 3.49297.
    expected = math.log(0.05 ** (1 / 100) / (1 - 0.05 ** (1 / 100)))
    assert expected == pytest.approx(3.49297, abs=1e-5)
    assert steinke_epsilon_lower_bound(m=100, r=100, v=100, delta=0.0) == pytest.approx(expected, abs=1e-6)


def test_steinke_confidence_level_is_honoured() -> None:
    # At 99% the same 100/100 must reject less: p < 0.01^(1/100).
    p = 0.01 ** (1 / 100)
    assert steinke_epsilon_lower_bound(m=100, r=100, v=100, delta=0.0, confidence=0.99) == pytest.approx(
        math.log(p / (1 - p)), abs=1e-6
    )


def test_steinke_p_value_at_epsilon_zero_is_a_fair_coin() -> None:
    # ε = 0, δ = 0: every guess is a fair coin, so the p-value is the binomial tail itself.
    for r, v in [(10, 9), (100, 60), (100, 50)]:
        assert steinke_p_value(m=r, r=r, v=v, epsilon=0.0, delta=0.0) == pytest.approx(stats.binom.sf(v - 1, r, 0.5))


def test_steinke_delta_term_lowers_the_bound() -> None:
    pure = steinke_epsilon_lower_bound(m=1000, r=500, v=450, delta=0.0)
    approx = steinke_epsilon_lower_bound(m=1000, r=500, v=450, delta=1e-5)
    loose = steinke_epsilon_lower_bound(m=1000, r=500, v=450, delta=1e-4)
    assert pure > approx > loose > 0.0
    # The δ term carries a factor 2·m: more canaries at the same r, v and δ prove less.
    assert steinke_epsilon_lower_bound(m=10_000, r=500, v=450, delta=1e-5) < approx


# --------------------------------------------------------------------------- Mahloujifar et al.
def test_f_dp_test_under_perfect_privacy_is_the_coin_flip_test() -> None:
    # μ = 0 (the trade-off curve of perfect privacy, blow-up inverse = identity): each guess
    # is a fair coin. 5 of 5 right has probability 2^-5 = 0.031 < 0.05 and is rejected; 4 of
    # 4, 0.0625, is not; 9 of 10 (0.011) and 60 of 100 (0.028) are; 58 of 100 (0.067) is not.
    def rejects(m: int, r: int, v: int) -> bool:
        return fdp_excess(m=m, r=r, v=v, significance=0.05, blow_up_inverse=lambda x: x) > 0

    assert rejects(5, 5, 5) and not rejects(4, 4, 4)
    assert rejects(10, 10, 9) and rejects(100, 100, 60)
    assert not rejects(100, 100, 58) and not rejects(100, 100, 50)


def test_gaussian_mu_is_the_gaussian_mechanism_at_that_epsilon_delta() -> None:
    # ε = 0: δ(0) = Φ(μ/2) − Φ(−μ/2) = 2Φ(μ/2) − 1, so μ = 2Φ⁻¹((1 + δ)/2).
    for delta in (1e-5, 1e-2, 0.3):
        assert gaussian_mu(0.0, delta) == pytest.approx(2 * stats.norm.ppf((1 + delta) / 2), rel=1e-9)
    # Against Google's dp_accounting (Balle & Wang's analytic Gaussian mechanism): σ = 1/μ.
    import dp_accounting

    for epsilon in (0.5, 1.0, 3.0, 8.0, 12.0):
        for delta in (1e-6, 1e-5):
            sigma = dp_accounting.get_sigma_gaussian(epsilon, delta)
            assert gaussian_mu(epsilon, delta) == pytest.approx(1 / sigma, rel=1e-8)
    assert gaussian_mu(1.0, 0.0) == 0.0 and math.isinf(gaussian_mu(1.0, 1.0))
    assert gaussian_mu(2.0, 1e-5) > gaussian_mu(1.0, 1e-5)  # a larger ε is a less noisy Gaussian


def test_f_dp_bound_needs_a_positive_delta() -> None:
    with pytest.raises(ValueError, match="delta"):
        fdp_epsilon_lower_bound(m=100, r=50, v=50, delta=0.0)


# --------------------------------------------------------------------------- what an audit can show
def test_best_expected_correct_guesses() -> None:
    # Every canary sampled: every guess can be right. None sampled: chance.
    assert best_expected_correct(m=1000, k_plus=250, k_minus=250, seen=1.0) == pytest.approx(500)
    assert best_expected_correct(m=1000, k_plus=250, k_minus=250, seen=0.0) == pytest.approx(250)
    # seen = 1/2: 250 sampled (all 250 "included" guesses right), a pool of 500 left out +
    # 250 unsampled, so each "excluded" guess is right with probability 500/750.
    assert best_expected_correct(m=1000, k_plus=250, k_minus=250, seen=0.5) == pytest.approx(250 + 250 * 2 / 3)
    # seen = 0.2: 100 sampled, then 150 "included" guesses from the pool at 400/900 each.
    assert best_expected_correct(m=1000, k_plus=250, k_minus=250, seen=0.2) == pytest.approx(
        100 + 150 * 0.8 / 1.8 + 250 / 1.8)


def test_canaries_to_prove_a_claim() -> None:
    m = canaries_to_prove(8.0, delta=1e-5)
    assert m is not None and power(m=m, r=m // 2, delta=1e-5).largest > 8.0
    assert power(m=m // 2, r=m // 4, delta=1e-5).largest <= 8.0
    assert canaries_to_prove(30.0, delta=1e-5) is None  # past what any canary count here proves
