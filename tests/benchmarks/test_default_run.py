"""benchmarks/default_run.py: issue #23's checks on a default run, and one real run of the default
recipe (tiny encoder, six synthetic merchants) through `fedshop simulate`."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from shared.tasks import Example
from tests.benchmarks.conftest import load_benchmark


@pytest.fixture(scope="module")
def default_run() -> ModuleType:
    return load_benchmark("default_run")


def _ex(task: str, target: float) -> Example:
    return Example(task, "", "a product", target)


def test_checks_fail_what_the_issue_asks_for(default_run: ModuleType) -> None:
    good = {"ctr_logloss": 0.30, "ctr_logloss_held_out": 0.45, "rating_rmse": 0.8, "rating_rmse_held_out": 1.1}
    summary = {"privacy": {"a": {"epsilon": 7.9, "budget": 8.0, "rounds": 8},
                           "b": {"epsilon": 5.0, "budget": 8.0, "rounds": 8},
                           "c": {"epsilon": 1.0, "budget": 8.0, "rounds": 3}}}
    scored = {"a": good, "b": {**good, "ctr_logloss": 0.5}, "c": {**good, "rating_rmse": 1.2}}
    verdict = default_run.checks(scored, summary, rounds=8)
    assert all(verdict["a"].values())
    assert verdict["b"]["epsilon_at_least_80_percent"] is False and verdict["b"]["logloss_below_base_rate"] is False
    # Trained in 3 of 8 rounds: under half, so it counts as not trained (and ε is not judged).
    assert verdict["c"]["trained"] is False and "epsilon_at_least_80_percent" not in verdict["c"]
    assert verdict["c"]["rating_rmse_below_mean"] is False
    ranked = {"q": {"relevance_ndcg@10": 0.6, "relevance_ndcg@10_baseline": 0.7}}
    assert default_run.checks(ranked, {"privacy": {}}, rounds=8)["q"]["ndcg_above_random_order"] is False


def test_the_default_recipe_trains_every_merchant_and_spends_its_budget(default_run: ModuleType,
                                                                         tmp_path: Path) -> None:
    """The default scenario on six generated merchants (tiny encoder): the real engine, every
    merchant trained in every round, each ends with ε ≥ 80 % of its budget; the exact scores
    are written beside the constant baselines."""
    out = tmp_path / "result.json"
    default_run.main(["--data", "synth", "--set", "encoder=tiny", "--set", "num-server-rounds=3",
                      "--set", "noise-plan-calls=3", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["rounds_completed"] == 3 and len(report["privacy"]) == 6
    for merchant, privacy in report["privacy"].items():
        assert privacy["rounds"] == 3, merchant
        assert 0.8 * privacy["budget"] <= privacy["epsilon"] <= privacy["budget"], merchant
        assert report["checks"][merchant]["trained"] and report["checks"][merchant]["epsilon_at_least_80_percent"]
    for scores in report["exact_held_out"].values():
        assert {"ctr_auc", "ctr_logloss", "ctr_logloss_held_out", "rating_rmse", "rating_rmse_held_out"} <= set(scores)
        assert np.isfinite(list(scores.values())).all()
