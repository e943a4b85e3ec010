"""The evaluation schedule (``evaluate-every``): the server evaluates after every K-th round and
after the last, and a merchant reserves budget for exactly those evaluations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.config import ConfigError, RunConfig
from tests.helpers.answering_grid import AnsweringGrid, run_federation, task_identity, train_reply

__all__ = ["task_identity"]  # the fixture Messages built outside a ServerApp need


def test_the_schedule_is_every_kth_round_and_the_last() -> None:
    config = RunConfig(num_server_rounds=8, evaluate_every=3)
    assert [r for r in range(1, 9) if config.evaluates_after(r)] == [3, 6, 8]
    assert [config.evaluations_from(r) for r in (1, 3, 4, 7, 8, 9)] == [3, 3, 2, 1, 1, 0]
    every = RunConfig(num_server_rounds=4)
    assert every.evaluations_from(1) == 4 and every.evaluations_from(0) == 4
    with pytest.raises(ConfigError, match="'evaluate-every' = 0"):
        RunConfig(evaluate_every=0).validate()


def test_the_server_sends_evaluate_only_on_scheduled_rounds(tmp_path: Path) -> None:
    grid = AnsweringGrid({1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})})
    result = run_federation(grid, tmp_path / "run", num_server_rounds=5, evaluate_every=2)
    assert result.rounds_completed == 5 and np.allclose(result.params["w"], 0.1)
    trains, evaluated = 0, set()  # two merchants: every two train replies close a round
    for answer in grid.answers:
        if answer.metadata.message_type == "train":
            trains += 1
        else:
            evaluated.add(trains // 2)
    assert trains == 10 and sorted(evaluated) == [2, 4, 5]


def test_the_merchant_reserves_only_the_scheduled_evaluations(tmp_path: Path) -> None:
    from client.merchant import Merchant, resolve_node
    from client.release import EvalSettings
    from tests.helpers.merchants import write_merchant

    config = RunConfig(encoder="tiny", num_server_rounds=4, evaluate_every=3, eval_min_units=1, test_fraction=0.3)
    merchant_dir = write_merchant(tmp_path / "data", "shop-a", seed=1)
    merchant = Merchant(resolve_node({"data-dir": str(merchant_dir), "merchant-id": "shop-a"}, config), config)
    on = EvalSettings.resolve({}, config)
    split = merchant.split()
    assert merchant.evaluations_ahead(split, on, server_round=1) == [on.mechanism] * 2  # rounds 3 and 4
    assert merchant.evaluations_ahead(split, on, server_round=4) == [on.mechanism]


def test_with_evaluation_off_the_server_sends_no_evaluate_message(tmp_path: Path) -> None:
    grid = AnsweringGrid({1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})})
    result = run_federation(grid, tmp_path / "run", num_server_rounds=3, evaluate=False)
    assert result.rounds_completed == 3
    assert [a.metadata.message_type for a in grid.answers] == ["train"] * 6
