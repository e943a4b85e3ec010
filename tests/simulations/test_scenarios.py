"""Every shipped scenario file loads, validates into a ``RunConfig`` and works with ``flwr run``.

Parametrized over the scenarios folder, so a new scenario is covered as soon as it is added.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import RunConfig
from simulations import engine

SCENARIOS = sorted(engine.SCENARIO_DIR.glob("*.toml"))


def _declared_keys() -> set[str]:
    with (engine.PROJECT_DIR / "pyproject.toml").open("rb") as fh:
        return set(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_the_folder_holds_the_scenarios_the_cli_lists() -> None:
    assert sorted(p.stem for p in SCENARIOS) == engine.scenario_names()
    assert "reviews" in engine.scenario_names()  # `fedshop simulate`'s default


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_loads_and_validates(path: Path, tmp_path: Path) -> None:
    raw = engine.load_scenario(path.stem)  # by name, as `fedshop simulate --scenario NAME` does
    assert raw == engine.load_scenario(str(path))  # ... and by path, as `flwr run --run-config` reads it
    assert raw, f"{path.name} sets nothing"

    config = engine.build_config(raw, {}, out=None)
    assert isinstance(config, RunConfig)
    # Each setting arrives as written (after typing), none dropped: a key RunConfig retired is
    # silently ignored at its default, and would leave the scenario saying something it no longer does.
    applied = config.to_mapping()
    for key, value in raw.items():
        assert key in applied, f"{path.name}: {key!r} is not a run-config key"
        assert applied[key] == value, f"{path.name}: {key} = {value!r} became {applied[key]!r}"

    # Flower rejects run-config overrides that pyproject does not declare.
    undeclared = set(raw) - _declared_keys()
    assert not undeclared, f"{path.name}: not declared in pyproject's [tool.flwr.app.config]: {sorted(undeclared)}"

    # --out replaces the scenario's run dir and nothing else.
    moved = engine.build_config(raw, {}, out=tmp_path / "run")
    assert moved.run_dir == str(tmp_path / "run")
    assert {**moved.to_mapping(), "run-dir": config.run_dir} == applied


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_private_scenario_plans_each_merchants_noise(path: Path) -> None:
    """A σ fixed for every merchant refuses the small ones (one call costs them more than their
    budget) or stops a run early (esci at σ 0.8: every merchant refused from round 2). Each
    private scenario has its merchants plan σ for the calls they will make."""
    config = engine.build_config(engine.load_scenario(path.stem), {}, out=None)
    if config.dp:
        assert config.noise_plan_calls >= 1, f"{path.name}: dp = true with σ fixed (noise-plan-calls = 0)"
        assert config.noise_plan_calls <= config.num_server_rounds, f"{path.name}: plans more calls than rounds"
