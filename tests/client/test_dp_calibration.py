"""Planning noise for a budget: the calibrated σ meets the budget and is not needlessly large."""

from __future__ import annotations

import pytest

from client.dp import epsilon, noise_for_budget
from shared.privacy import MechanismEvent


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_meets_the_budget_tightly(target: float) -> None:
    q, steps, calls, delta = 0.05, 12, 4, 1e-5
    sigma = noise_for_budget(target, delta, sample_rate=q, steps=steps, calls=calls)

    def eps(s: float) -> float:
        return epsilon([MechanismEvent(noise_multiplier=s, sample_rate=q, steps=steps, max_grad_norm=1.0)] * calls,
                       delta)

    assert eps(sigma) <= target
    assert eps(sigma / 1.03) > target  # 3 % less noise would overspend: σ is near the smallest


def test_more_calls_or_a_smaller_budget_need_more_noise() -> None:
    base = noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=2)
    assert noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=6) > base
    assert noise_for_budget(1.0, 1e-5, sample_rate=0.05, steps=12, calls=2) > base


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="calls"):
        noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=0)
