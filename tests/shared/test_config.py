"""shared.config: coercion of Flower's kebab-case run config, errors, and the pyproject mirror."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


# ----------------------------------------------------------------------------- coercion


def test_from_mapping_coerces_strings_and_kebab_case() -> None:
    config = RunConfig.from_mapping(
        {
            "batch-size": "16",  # int from str
            "learning-rate": "0.05",  # float from str
            "local-epochs": 2,  # float from int
            "max-local-steps": 7.0,  # int from an integral float (TOML may say 7.0)
            "dp": "false",  # bool from str
            "noise_multiplier": 0.5,  # snake_case works too
            "trainable": "top-k",
            "target-delta": 1e-6,
        }
    )
    assert config.batch_size == 16 and type(config.batch_size) is int
    assert config.learning_rate == 0.05 and type(config.learning_rate) is float
    assert config.local_epochs == 2.0 and type(config.local_epochs) is float
    assert config.max_local_steps == 7 and type(config.max_local_steps) is int
    assert config.dp is False
    assert config.noise_multiplier == 0.5
    assert config.trainable == "top-k"
    assert config.target_delta == 1e-6
    # Untouched keys keep their defaults.
    assert config.lora_r == RunConfig().lora_r


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("False", False), ("1", True), ("0", False), (1, True), (0, False), (True, True)],
)
def test_bool_spellings(raw: Any, expected: bool) -> None:
    assert RunConfig.from_mapping({"dp": raw, "noise-multiplier": 1.0}).dp is expected


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping(raw)
    return str(info.value)


def test_unknown_key_names_key_and_value() -> None:
    message = _error({"batch-sise": 32})
    assert "'batch-sise'" in message and "32" in message


@pytest.mark.parametrize(
    ("key", "value", "value_text"),
    [
        ("batch-size", "many", "'many'"),
        ("batch-size", 2.5, "2.5"),  # a non-integral float is not an int
        ("batch-size", True, "True"),  # a bool is not an int, though Python says it is
        ("learning-rate", "fast", "'fast'"),
        ("learning-rate", False, "False"),
        ("dp", "maybe", "'maybe'"),
        ("dp", 2, "2"),
        ("dp", 1.0, "1.0"),
    ],
)
def test_wrong_type_names_key_and_value(key: str, value: Any, value_text: str) -> None:
    message = _error({key: value})
    assert repr(key) in message
    assert value_text in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch-size", 0),
        ("num-server-rounds", -1),
        ("max-local-steps", -3),
        ("learning-rate", 0.0),
        ("learning-rate", float("inf")),
        ("max-grad-norm", float("nan")),
        ("target-epsilon", -1.0),
        ("target-delta", 1.0),
        ("target-delta", 0.0),
        ("test-fraction", 1.0),
        ("test-offset", 1.0),
        ("test-offset", -0.25),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("noise-multiplier", 0.0),  # dp defaults to true
        ("noise-plan-calls", -1),
        ("weight-decay", -0.01),
        ("proximal-mu", -0.1),
        ("proximal-mu", float("nan")),
        ("tasks", "ctr,clicks"),
        ("tasks", " , "),
    ],
)
def test_out_of_range_names_key_and_value(key: str, value: Any) -> None:
    message = _error({key: value})
    assert repr(key) in message
    assert repr(value) in message or str(value) in message


def test_noise_multiplier_zero_is_fine_without_dp() -> None:
    config = RunConfig.from_mapping({"dp": False, "noise-multiplier": 0.0})
    assert config.dp is False and config.noise_multiplier == 0.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainable", "everything"),
        ("strategy", "fedsgd"),
        ("optimizer", "sgd"),  # removed: no scenario or benchmark used it
        ("conversion-label", "view"),
    ],
)
def test_bad_literal_names_key_value_and_choices(key: str, value: str) -> None:
    message = _error({key: value})
    assert repr(key) in message and repr(value) in message
    # The allowed choices are listed, so the user can fix the value without reading code.
    choices = {"trainable": ["heads", "top-k", "lora", "full"], "strategy": ["fedavg", "fedadam", "fedprox"],
               "optimizer": ["adamw"], "conversion-label": ["click", "purchase"]}[key]
    for choice in choices:
        assert repr(choice) in message


@pytest.mark.parametrize(("key", "value"), [("grad-sample-mode", "auto"), ("precondition-shrink", 0.003),
                                            ("accountant", "prv")])
def test_a_removed_key_at_the_value_every_run_uses_still_loads(key: str, value: Any) -> None:
    """A run saved before the key was removed (``--resume`` reads its config) still loads; any
    other value says the option is gone instead of running without it."""
    assert RunConfig.from_mapping({**RunConfig().to_mapping(), key: value}) == RunConfig()
    message = _error({key: "hooks" if isinstance(value, str) else 0.01})
    assert repr(key) in message and "removed" in message


def test_the_accountant_cannot_be_chosen_any_more() -> None:
    # Opacus' PRV and RDP bound add/remove neighbours only; with N public, a saved run that
    # asked for RDP (or anything but the old default) is refused, naming what every run uses.
    message = _error({"accountant": "rdp"})
    assert "'accountant'" in message and "'rdp'" in message and "replace-one" in message


def test_replace_validates() -> None:
    config = RunConfig()
    assert config.replace(batch_size=8).batch_size == 8
    with pytest.raises(ConfigError, match="'batch-size'"):
        config.replace(batch_size=0)


def test_task_names_split_and_strip() -> None:
    assert RunConfig.from_mapping({"tasks": " ctr , relevance "}).task_names == ("ctr", "relevance")


# ----------------------------------------------------------------------------- round trip


def test_to_mapping_round_trip() -> None:
    config = RunConfig(batch_size=8, trainable="full", dp=False, target_delta=1e-6, data_dir="synthetic:5",
                       learning_rate=3e-4, tasks="rating")
    mapping = config.to_mapping()
    assert all("_" not in key for key in mapping)  # kebab-case, as Flower stores it
    assert all(isinstance(value, bool | int | float | str) for value in mapping.values())
    assert RunConfig.from_mapping(mapping) == config
    assert RunConfig.from_mapping(RunConfig().to_mapping()) == RunConfig()


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().batch_size = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------- pyproject


def test_pyproject_declares_exactly_the_run_config_defaults() -> None:
    table = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_mapping()
    assert sorted(table) == sorted(defaults), (
        f"only in pyproject: {sorted(set(table) - set(defaults))}; "
        f"only in RunConfig: {sorted(set(defaults) - set(table))}"
    )
    for key, default in defaults.items():
        # Types matter too: Flower hands over what TOML says (1 is an int, 1.0 a float).
        assert table[key] == default and type(table[key]) is type(default), (key, table[key], default)
    # And the table itself is a valid configuration.
    assert RunConfig.from_mapping(table) == RunConfig()


@pytest.mark.parametrize("metric", ["ctr_logloss_baseline", "ctr_threshold", "ctr_auc_sd", "eval-loss", "auc"])
def test_early_stopping_refuses_a_metric_that_is_no_target(metric: str) -> None:
    with pytest.raises(ConfigError, match=f"'early-stopping-metric' = '{metric}'"):
        RunConfig.from_mapping({"early-stopping-rounds": 2, "early-stopping-metric": metric})
    RunConfig.from_mapping({"early-stopping-rounds": 0, "early-stopping-metric": metric})  # off: not read
    chosen = RunConfig.from_mapping({"early-stopping-rounds": 2, "early-stopping-metric": "ctr_logloss"})
    assert chosen.early_stopping_metric == "ctr_logloss"
