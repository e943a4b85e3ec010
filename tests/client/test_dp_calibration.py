"""Planning noise for a budget: the calibrated σ meets the budget and is not needlessly large."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.trainer import train
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, load_tokenizer
from shared.privacy.accounting import epsilon, noise_for_budget
from shared.privacy.budget import PrivacyState
from shared.privacy.events import MechanismEvent
from tests.helpers.examples import product_examples


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


def test_history_and_floor_are_respected() -> None:
    past = [MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=12, max_grad_norm=1.0)] * 2
    fresh = noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=2)
    after_spending = noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=2, history=past)
    assert after_spending > fresh
    assert noise_for_budget(50.0, 1e-5, sample_rate=0.05, steps=12, calls=1, floor=2.5) == 2.5


def test_a_smaller_merchant_plans_more_noise(tmp_path: Path) -> None:
    """Same budget, same planned calls: the merchant with less data (larger q) adds more noise,
    and both still fit their budgets after the planned calls."""
    config = RunConfig(encoder="tiny", trainable="heads", batch_size=32, max_local_steps=4, max_seq_len=16,
                       noise_multiplier=0.3, noise_plan_calls=2, target_epsilon=3.0, target_delta=1e-5)
    tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
    sigma = {}
    for name, size in (("small", 64), ("large", 640)):
        state = PrivacyState.open(tmp_path / f"{name}.json", merchant_id=name, target_epsilon=3.0,
                                  target_delta=1e-5)
        model = build_model(ModelSpec.from_config(config))
        results = [train(model, product_examples(size, seed=0), tokenizer, config, privacy=state, round=r)
                   for r in (1, 2)]
        assert results[-1].epsilon <= 3.0
        assert all(r.mechanism is not None for r in results)
        sigma[name] = results[0].mechanism.noise_multiplier  # type: ignore[union-attr]
        # One plan, kept: the second call re-plans its one remaining call and lands on the
        # same σ up to the bisection's 1 % (spending any slack the first rounding left).
        assert state.events[1].noise_multiplier == pytest.approx(sigma[name], rel=0.02)
    assert sigma["small"] > sigma["large"]


HINTED_PAST = [MechanismEvent(noise_multiplier=1.2, sample_rate=0.05, steps=12, max_grad_norm=1.0)]


@pytest.fixture(scope="module")
def unhinted_sigma() -> float:
    """The search without a hint (a dozen ε evaluations): the same for every hint below, so once."""
    return noise_for_budget(3.0, 1e-5, sample_rate=0.05, steps=12, calls=4, history=HINTED_PAST)


@pytest.mark.parametrize("factor", [1.0, 1.004, 3.0, 1 / 3, 1e3])
def test_a_hint_narrows_the_search_without_changing_its_guarantee(factor: float, unhinted_sigma: float,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the hint (right, slightly off, far off, outside [floor, 100]), the planned σ fits
    the budget and 2 % less would not; the right hint costs two ε evaluations, not a dozen."""
    import shared.privacy.accounting as dp

    q, steps, calls, delta, target = 0.05, 12, 4, 1e-5, 3.0
    past, exact = HINTED_PAST, unhinted_sigma
    evaluations = []
    real = dp.epsilon
    monkeypatch.setattr(dp, "epsilon", lambda *a, **k: evaluations.append(1) or real(*a, **k))
    sigma = noise_for_budget(target, delta, sample_rate=q, steps=steps, calls=calls, history=past,
                             hint=exact * factor)
    monkeypatch.undo()

    def eps(s: float) -> float:
        return epsilon(past + [MechanismEvent(noise_multiplier=s, sample_rate=q, steps=steps, max_grad_norm=1.0)]
                       * calls, delta)

    assert eps(sigma) <= target
    assert eps(sigma / 1.02) > target
    if factor == 1.0:
        assert sigma == exact and len(evaluations) == 2


def test_the_hint_floor_and_ceiling_still_hold() -> None:
    # A generous budget: the floor is the answer even when the hint sits above it.
    assert noise_for_budget(50.0, 1e-5, sample_rate=0.05, steps=12, calls=1, floor=2.5, hint=4.0) == 2.5
    # A budget nothing fits: the ceiling (100) comes back, for the budget check to refuse.
    spent = [MechanismEvent(noise_multiplier=2.0, sample_rate=1.0, steps=20, max_grad_norm=1.0)]  # ε ≈ 11.5
    assert noise_for_budget(1.0, 1e-5, sample_rate=1.0, steps=5, calls=1, history=spent, hint=5.0) == 100.0


def test_a_noise_plan_leaves_room_for_the_evaluations_still_to_come(tmp_path: Path) -> None:
    """Two planned training calls and three evaluations ahead: the planned σ is larger than
    without them, and the calls plus the evaluations, spent as planned, fit the budget."""
    config = RunConfig(encoder="tiny", trainable="heads", batch_size=32, max_local_steps=4, max_seq_len=16,
                       noise_multiplier=0.3, noise_plan_calls=2, target_epsilon=4.0, target_delta=1e-5)
    evaluation = MechanismEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, max_grad_norm=1.0)
    tokenizer = load_tokenizer(ModelSpec(encoder="tiny"))
    planned = {}
    for name, reserve in (("plain", []), ("reserving", [evaluation] * 3)):
        state = PrivacyState.open(tmp_path / f"{name}.json", merchant_id=name, target_epsilon=4.0,
                                  target_delta=1e-5)
        result = train(build_model(ModelSpec.from_config(config)), product_examples(128, seed=0), tokenizer, config,
                       privacy=state, round=1, run_id="run", reserve=reserve)
        assert result.mechanism is not None
        planned[name] = result.mechanism
        # The rest of the plan: one more call like this one, then the evaluations.
        assert epsilon([*state.events, result.mechanism, *reserve], 1e-5) <= 4.0
    assert planned["reserving"].noise_multiplier > planned["plain"].noise_multiplier


def test_the_merchant_reserves_one_evaluation_per_round_left_when_it_evaluates(tmp_path: Path) -> None:
    from client.merchant import Merchant, resolve_node
    from client.release import EvalSettings
    from tests.helpers.merchants import write_merchant

    config = RunConfig(encoder="tiny", num_server_rounds=4, eval_min_units=1, test_fraction=0.3)
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    merchant = Merchant(resolve_node({"data-dir": str(merchant_dir), "merchant-id": "shop-a"}, config), config)
    split = merchant.split()
    on = EvalSettings.resolve({}, config)
    assert split.test
    assert merchant.evaluations_ahead(split, on, server_round=2) == [on.mechanism] * 3  # rounds 2, 3, 4
    assert merchant.evaluations_ahead(split, on, server_round=4) == [on.mechanism]
    assert merchant.evaluations_ahead(split, EvalSettings.resolve({"evaluate": "false"}, config), server_round=1) == []
    # A held-out set below the merchant's minimum is refused at evaluation, so nothing to reserve.
    too_few = EvalSettings.resolve({"eval-min-units": 10_000}, config)
    assert merchant.evaluations_ahead(split, too_few, server_round=1) == []
    assert merchant.evaluations_ahead(split, on, server_round=1) == [on.mechanism] * 4
