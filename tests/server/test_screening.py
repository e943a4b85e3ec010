"""server.screening.screen_update: names, shapes, finiteness and the update-norm bound."""

from __future__ import annotations

import numpy as np
import pytest

from server.screening import screen_update


def global_params() -> dict[str, np.ndarray]:
    return {"a": np.array([1.0, 1.0], dtype=np.float32), "b": np.zeros((2, 2), dtype=np.float32)}


def test_unchanged_update_is_accepted_with_norm_zero() -> None:
    verdict = screen_update(global_params(), global_params(), max_update_norm=1.0)
    assert verdict.accepted and verdict.reason == "" and verdict.update_norm == 0.0


def test_norm_is_the_l2_distance_from_the_global_parameters_over_all_arrays() -> None:
    # a moves by (3, 4) -> 25; b moves by (0, 0, 12, 0) -> 144; sqrt(169) = 13.
    update = {"a": np.array([4.0, 5.0], dtype=np.float32), "b": np.array([[0, 0], [12, 0]], dtype=np.float32)}
    verdict = screen_update(update, global_params(), max_update_norm=100.0)
    assert verdict.accepted
    assert verdict.update_norm == pytest.approx(13.0, abs=0)


def test_norm_boundary_is_inclusive() -> None:
    update = {"a": np.array([4.0, 5.0], dtype=np.float32), "b": np.zeros((2, 2), dtype=np.float32)}  # norm 5
    at_bound = screen_update(update, global_params(), max_update_norm=5.0)
    assert at_bound.accepted and at_bound.update_norm == 5.0
    over = screen_update(update, global_params(), max_update_norm=4.999)
    assert not over.accepted
    assert over.update_norm == 5.0
    assert "norm 5 exceeds max-update-norm 4.999" in over.reason


def test_norm_is_computed_in_float64() -> None:
    # 1e20 squared overflows float32 (inf) but not float64: the verdict is a norm, not an overflow.
    update = {"a": np.array([1.0, 1e20], dtype=np.float32), "b": np.zeros((2, 2), dtype=np.float32)}
    verdict = screen_update(update, global_params(), max_update_norm=1e21)
    assert verdict.accepted
    assert verdict.update_norm == pytest.approx(1e20, rel=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    update = global_params()
    update["b"][1, 0] = bad
    verdict = screen_update(update, global_params(), max_update_norm=1e30)
    assert not verdict.accepted
    assert "'b'" in verdict.reason and "non-finite" in verdict.reason


def test_wrong_shape_is_rejected_with_both_shapes() -> None:
    update = global_params()
    update["b"] = np.zeros((2, 3), dtype=np.float32)
    verdict = screen_update(update, global_params(), max_update_norm=1e30)
    assert not verdict.accepted
    assert verdict.reason == "parameter 'b' has shape (2, 3), expected (2, 2)"


def test_same_size_other_shape_is_rejected() -> None:
    update = global_params()
    update["b"] = np.zeros(4, dtype=np.float32)  # same number of values, flattened
    assert not screen_update(update, global_params(), max_update_norm=1e30).accepted


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.pop("b"), "missing ['b']"),
        (lambda p: p.update(c=np.zeros(1, dtype=np.float32)), "unexpected ['c']"),
        (lambda p: p.update(c=p.pop("b")), "missing ['b'], unexpected ['c']"),
    ],
)
def test_parameter_names_must_match_exactly(change, expected: str) -> None:  # type: ignore[no-untyped-def]
    update = global_params()
    change(update)
    verdict = screen_update(update, global_params(), max_update_norm=1e30)
    assert not verdict.accepted
    assert "parameter names differ" in verdict.reason and expected in verdict.reason


def test_an_empty_update_is_rejected() -> None:
    verdict = screen_update({}, global_params(), max_update_norm=1e30)
    assert not verdict.accepted and "missing ['a', 'b']" in verdict.reason
