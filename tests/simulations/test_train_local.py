"""``fedshop train-local`` trains as the utility benchmark's reference arms do: as many steps as
the federation it stands beside (``simulations.local.federation_steps``), in one call whose
noise plan fits the merchant's budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import ConfigError, RunConfig
from shared.privacy.budget import PrivacyState
from simulations import cli, local
from tests.helpers.merchants import write_merchants

RULE = RunConfig(num_server_rounds=4, merchants_per_round=3, max_local_steps=5, local_epochs=2.0,
                 noise_plan_calls=4)


@pytest.mark.parametrize(("folders", "steps"), [(1, 4 * 5), (2, 4 * 2 * 5), (3, 4 * 3 * 5), (6, 4 * 3 * 5)])
def test_the_step_count_follows_the_federation(folders: int, steps: int) -> None:
    # One folder: the steps it would take if sampled every round, over rounds x local-epochs;
    # several: rounds x merchants per round (at most the folders) x max-local-steps.
    plan = local.federation_steps(RULE, folders)
    assert plan.config.max_local_steps == steps
    assert plan.config.local_epochs == (4 * 2.0 if folders == 1 else local.UNBOUNDED_EPOCHS)
    assert plan.config.noise_plan_calls == 1  # one call holds every round's steps
    assert str(steps // (4 if folders == 1 else 4 * min(3, folders))) in plan.why


def test_explicit_steps_and_an_uncapped_federation() -> None:
    plan = local.federation_steps(RULE, 6, steps=7)
    assert (plan.config.max_local_steps, plan.config.local_epochs, plan.why) == (7, local.UNBOUNDED_EPOCHS, "--steps")
    with pytest.raises(ConfigError, match="steps 0"):
        local.federation_steps(RULE, 1, steps=0)
    uncapped = RULE.replace(max_local_steps=0, noise_plan_calls=0)
    # No cap: epochs bound the call, as they bound each of the federation's calls.
    assert local.federation_steps(uncapped, 1).config.local_epochs == 4 * 2.0
    assert local.federation_steps(uncapped, 6).config.local_epochs == pytest.approx(4 * 2.0 * 3 / 6)
    assert local.federation_steps(uncapped, 6).config.max_local_steps == 0
    assert local.federation_steps(uncapped, 1).config.noise_plan_calls == 0  # a fixed σ stays fixed


TINY = ["--set", "encoder=tiny", "--set", "batch-size=16", "--set", "evaluate=false", "--set", "max-seq-len=32",
        "--set", "num-server-rounds=3", "--set", "merchants-per-round=2"]


def test_a_pooled_non_private_run_trains_over_the_whole_data(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folders = write_merchants(tmp_path / "data", ["shop-a", "shop-b", "shop-c"])
    assert cli.main(["train-local", "--data", *map(str, folders), "--out", str(tmp_path / "pooled"), "--json",
                     "--set", "dp=false", "--set", "max-local-steps=4", *TINY]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["steps"] == 3 * 2 * 4 and "the federation's steps" in pooled["steps_why"]
    # A pass over every folder's training records at least, where the per-call cap alone
    # (max-local-steps = 4 batches of 16, what train-local took before) saw a fraction of them.
    assert pooled["steps"] * 16 >= pooled["examples"] > 4 * 16
    assert set(pooled["per_merchant"]) == {"shop-a", "shop-b", "shop-c"}
    assert cli.main(["train-local", "--data", *map(str, folders), "--out", str(tmp_path / "exact"), "--json",
                     "--set", "dp=false", "--steps", "5", *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 5


def test_a_private_merchant_alone_plans_its_noise_for_the_steps_it_takes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (folder,) = write_merchants(tmp_path / "data", ["shop-a"])
    assert cli.main(["train-local", "--data", str(folder), "--out", str(tmp_path / "alone"), "--json",
                     "--set", "dp=true", "--set", "target-epsilon=4.0", "--set", "noise-multiplier=0.5",
                     "--set", "noise-plan-calls=3", *TINY, "--set", "max-local-steps=2", "--set", "batch-size=4"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["steps"] == 3 * 2 and "sampled every round" in alone["steps_why"]
    state = PrivacyState.open(folder / ".fedshop" / "privacy-state.json", merchant_id="shop-a",
                              target_epsilon=4.0, target_delta=RunConfig.target_delta)
    (entry,) = state.entries
    # σ planned for this one call of 6 steps: it spends about all of the budget, never more (σ
    # planned for 3 such calls, as noise-plan-calls = 3 asked, spent ε ≈ 2.18 of 4).
    assert entry.event.mechanism.steps == 6
    assert 0.9 * 4.0 < state.epsilon() <= 4.0
    assert alone["epsilon"] == pytest.approx(state.epsilon())
