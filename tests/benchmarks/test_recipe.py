"""The recommended private recipe has one home, ``simulations/scenarios/reviews.toml`` (the default scenario):
the utility benchmark's federated DP arm on reviews is that file, key for key, and the heads
replica trains by it."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from shared.config import RunConfig
from simulations.engine import load_scenario

# Where the benchmark keeps its data and caches (its own plumbing, not the recipe).
PLUMBING = {"data-dir", "run-dir"}
# What the benchmark adds that the file does not carry: its cache folder, and the public corpus
# (precondition-corpus = "bundled:esci", the ESCI texts fedshop ships; the scenario says why
# the default leaves it out).
ADDED_BY_THE_BENCHMARK = {"feature-cache-dir", "precondition-corpus"}


@pytest.fixture(scope="module")
def reviews(utility: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> object:
    """The benchmark's reviews dataset under ``--trainable heads``, as a full run builds it."""
    return utility.Dataset("reviews", tmp_path_factory.mktemp("recipe"), encoder="minilm", quick=False,
                           setting=utility.SETTINGS["heads"])


def test_the_federated_dp_arm_on_reviews_is_the_scenario_file(utility: ModuleType, reviews: object) -> None:
    recipe = load_scenario("reviews")
    assert utility.RECIPE == "reviews"
    # The arm's run config: the dataset's scenario with the DP arm's keys on top (what the
    # simulation gets as its scenario file and --set keys), at the judged ε.
    arm = {**reviews.scenario, **reviews.federated_private_keys(8.0)}  # type: ignore[attr-defined]
    assert utility.JUDGED_ARM == "federated-dp-eps-8" and recipe["target-epsilon"] == 8.0
    differ = {k: (arm.get(k), v) for k, v in recipe.items() if k not in PLUMBING and arm.get(k) != v}
    assert not differ, f"benchmark arm vs scenario: {differ}"
    assert set(arm) - set(recipe) == ADDED_BY_THE_BENCHMARK
    # Types too: the simulation reads these values as the scenario file would give them.
    assert all(type(arm[k]) is type(v) for k, v in recipe.items() if k not in PLUMBING)
    # The file is a valid configuration by itself, and a private one.
    config = RunConfig.from_mapping(recipe)
    assert config.dp and config.trainable == "heads" and config.weight_decay > 0
    assert config.noise_plan_calls == config.num_server_rounds


def test_the_non_private_arms_take_the_recipe_but_not_its_private_keys(utility: ModuleType, reviews: object,
                                                                       tmp_path: Path) -> None:
    recipe = load_scenario("reviews")
    config = reviews.config  # type: ignore[attr-defined]
    assert config.weight_decay == 0.0  # the DP arms' decay stays theirs
    for key in utility.RECIPE_SETTING_KEYS:
        assert config.to_mapping()[key] == recipe[key], key
    assert reviews.private == {"clipping": recipe["clipping"], "weight-decay": recipe["weight-decay"]}  # type: ignore[attr-defined]
    # ESCI under the same setting: the recipe's schedule and model keys, not reviews' data or decay.
    esci = utility.Dataset("esci", tmp_path, encoder="tiny", quick=False, setting=utility.SETTINGS["heads"])
    esci_arm = {**esci.scenario, **esci.federated_private_keys(8.0)}
    assert all(esci_arm[key] == recipe[key] for key in utility.RECIPE_SETTING_KEYS)
    assert esci_arm["tasks"] == "relevance" and "weight-decay" not in esci_arm
    assert esci_arm["noise-multiplier"] == recipe["noise-multiplier"] == utility.NOISE_FLOOR


def test_the_heads_replica_trains_by_the_recipe(replica: ModuleType, reviews: object) -> None:
    recipe = load_scenario("reviews")
    r = replica.recipe_of(reviews, None)
    assert (r.rounds, r.local_steps, r.batch, r.rate, r.max_grad_norm, r.delta) == (
        recipe["num-server-rounds"], recipe["max-local-steps"], recipe["batch-size"], recipe["head-learning-rate"],
        recipe["max-grad-norm"], recipe["target-delta"])
    assert r.private_weight_decay == recipe["weight-decay"] and r.weight_decay == 0.0
    assert replica.utility.NOISE_FLOOR == recipe["noise-multiplier"]
