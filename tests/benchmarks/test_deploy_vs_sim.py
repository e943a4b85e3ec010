"""benchmarks/deploy_vs_sim.py's ``--work recipe``: the default scenario's own work, so that
its deployed-against-simulated figure cannot drift from what `fedshop simulate` runs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from client.data import load_merchant
from simulations.engine import load_scenario
from tests.benchmarks.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("deploy_vs_sim")


def test_the_recipe_work_is_the_default_scenarios_training(bench: ModuleType) -> None:
    job = bench.recipe_job(rounds=5)
    recipe = load_scenario("reviews")
    assert {k: job[k] for k in bench.RECIPE_KEYS} == {k: recipe[k] for k in bench.RECIPE_KEYS}
    assert (job["encoder"], job["trainable"], job["noise-plan-calls"]) == ("minilm", "heads", 5)
    # the deployment's own settings stay the benchmark's: every merchant each round, its timings
    assert job["merchants-per-round"] == 3 and job["report-timings"] is True


def test_the_recipe_work_runs_on_three_bundled_departments(bench: ModuleType, tmp_path: Path) -> None:
    names = bench.write_data("recipe", tmp_path / "data")
    assert names == bench.RECIPE_MERCHANTS and len(names) == 3
    for name in names:
        assert load_merchant(tmp_path / "data" / name).merchant_id == name  # a valid merchant folder
    assert bench.write_data("lora", tmp_path / "csv") == bench.MERCHANTS
