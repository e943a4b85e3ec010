"""The utility benchmark's popularity baseline: smoothed per-product means, backed off to the
product's category and then the global mean, against hand-computed values; and the arm added
to a stored run only on that run's split."""

from __future__ import annotations

import types
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from shared.config import RunConfig
from shared.tasks import Example


def ctr(product: str, target: float, group: str = "u") -> Example:
    return Example(task="ctr", context="", product=product, target=target, group=group, product_id=product)


def test_means_are_smoothed_towards_the_category_then_the_global_value(utility: ModuleType) -> None:
    train = [ctr("a", 1.0), ctr("a", 1.0), ctr("b", 0.0), ctr("c", 0.0), ctr("c", 0.0), ctr("c", 1.0)]
    model = utility.Popularity.fit(train, {"a": "shoes", "b": "shoes"}, prior=2.0)
    g = 3 / 6  # the global rate
    shoes = (2.0 + 2.0 * g) / (3 + 2.0)  # "a" twice positive, "b" once negative
    assert model.value("ctr", "a") == pytest.approx((2.0 + 2.0 * shoes) / (2 + 2.0))
    assert model.value("ctr", "b") == pytest.approx((0.0 + 2.0 * shoes) / (1 + 2.0))
    assert model.value("ctr", "c") == pytest.approx((1.0 + 2.0 * g) / (3 + 2.0))  # no category: global
    assert model.value("ctr", "unseen") == pytest.approx(g)
    assert list(model.predict([ctr("unseen", 0.0), ctr("a", 0.0)])) == pytest.approx([g, model.value("ctr", "a")])
    assert model.seen(ctr("b", 0.0), "product") and not model.seen(ctr("c", 0.0), "category")
    with pytest.raises(ValueError, match="no training record of task 'rating'"):
        model.value("rating", "a")


def test_relevance_ties_are_not_broken_by_input_order(utility: ModuleType) -> None:
    judged = [Example(task="relevance", context="q", product=p, target=3.0, group="q", product_id=p)
              for p in ("x", "y")]
    model = utility.Popularity.fit(judged, {})
    unseen = [Example(task="relevance", context="q2", product=p, target=0.0, group="q2", product_id=p)
              for p in ("p1", "p2", "p3")]
    preds = model.predict(unseen)
    assert np.allclose(preds, 3.0) and len(set(preds)) == 3  # equal values, ordered by a hash of the product
    assert list(model.predict(unseen[::-1])) == list(preds[::-1])


def test_the_arm_is_added_only_on_the_stored_runs_split(utility: ModuleType, tmp_path: Path) -> None:
    train = {"m": [ctr("a", 1.0), ctr("b", 0.0)]}
    tests = {"m": [ctr("a", 1.0, group="u1"), ctr("b", 0.0, group="u2")]}
    dataset = types.SimpleNamespace(name="reviews", merchants=["m"], categories={},
                                    splits={"m": types.SimpleNamespace(train=train["m"])}, tests=tests,
                                    config=RunConfig(max_train_examples=5), dirs=[])
    stored: dict[str, Any] = {"train_records": {"m": 2}, "test_examples": {"m": 2},
                              "arms": {"untrained": {}, "centralised": {}, utility.JUDGED_ARM: {}}}
    held_out = utility.HeldOut.of(tests, {utility.JUDGED_ARM: [{"m": np.array([0.9, 0.2])}]})
    added = utility.add_popularity(dataset, stored, held_out)
    assert list(stored["arms"]) == ["untrained", "popularity", "centralised", utility.JUDGED_ARM]
    assert stored["arms"]["popularity"]["notes"]["split"] == "today's split"
    assert stored["arms"]["popularity"]["macro"]["ctr_auc"] == pytest.approx(1.0)
    assert "popularity" in added.preds and set(stored["gap_ci95"]) == {"popularity"}
    # Another run's split (other training counts): refused, not scored on other records.
    with pytest.raises(ValueError, match="not the stored run's"):
        utility.add_popularity(dataset, {**stored, "train_records": {"m": 3}}, held_out)
