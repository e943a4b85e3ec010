"""server.strategy: FedAdam's moments survive a checkpoint and resume; the grid view limits sampling.

Rounds are driven the way ``server.federation`` drives them — ``configure_train`` on an
``EligibleNodesGrid``, replies built as Flower messages answering those instructions, then
``aggregate_train`` — on hand-made arrays, without a simulation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from server import checkpoint as ckpt
from server.strategy import EligibleNodesGrid, build_strategy, restore_strategy_state, strategy_state
from shared.config import RunConfig
from shared.wire import ARRAYS, METRICS, params_to_record, record_to_params

ETA = 0.5
BETA_1, BETA_2, TAU = 0.9, 0.99, 1e-3  # Flower's FedAdam defaults, which build_strategy keeps

Params = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Message built outside a running ServerApp needs the identity Flower's runtime sets
    # (simulations.engine sets the same for the simulated ServerApp).
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class FakeGrid:
    """The two grid calls the strategy and the view need; every other one must not happen."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.pushed: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushed.extend(messages)
        return [f"id-{i}" for i, _ in enumerate(messages)]


def fedadam() -> Strategy:
    return build_strategy(RunConfig.from_mapping({"strategy": "fedadam", "server-learning-rate": ETA}))


def train_round(strategy: Strategy, rnd: int, params: Params, updates: dict[int, tuple[Params, float]]) -> Params:
    """One round: instructions to the nodes in ``updates``, their replies, the aggregate."""
    grid = EligibleNodesGrid(FakeGrid([1, 2, 3, 4, 5]), sorted(updates))  # type: ignore[arg-type]
    instructions = list(strategy.configure_train(rnd, params_to_record(params), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in instructions) == sorted(updates)
    replies = []
    for instruction in instructions:
        update, num_examples = updates[instruction.metadata.dst_node_id]
        content = RecordDict({ARRAYS: params_to_record(update),
                              METRICS: MetricRecord({"num-examples": num_examples})})
        replies.append(Message(content, reply_to=instruction))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    assert arrays is not None
    return dict(record_to_params(arrays))


X0: Params = {"w": np.zeros(2, dtype=np.float32), "b": np.array([1.0], dtype=np.float32)}
ROUND_1 = {2: ({"w": np.array([1.0, -2.0], np.float32), "b": np.array([1.0], np.float32)}, 1.0),
           4: ({"w": np.array([2.0, -4.0], np.float32), "b": np.array([1.6], np.float32)}, 2.0)}
ROUND_2 = {1: ({"w": np.array([0.5, 0.5], np.float32), "b": np.array([0.0], np.float32)}, 3.0),
           5: ({"w": np.array([-1.0, 1.0], np.float32), "b": np.array([2.0], np.float32)}, 1.0)}


def test_first_fedadam_step_matches_the_hand_computed_one() -> None:
    strategy = fedadam()
    x1 = train_round(strategy, 1, X0, ROUND_1)
    # Weighted mean of the updates (weights 1 and 2), minus the current parameters.
    delta = {"w": np.array([5 / 3, -10 / 3]), "b": np.array([(1.0 + 2 * 1.6) / 3 - 1.0])}
    m = {k: (1 - BETA_1) * d for k, d in delta.items()}
    v = {k: (1 - BETA_2) * d**2 for k, d in delta.items()}
    eta_norm = ETA * math.sqrt(1 - BETA_2**2) / (1 - BETA_1**2)  # round 1: Flower's bias correction at t = 2
    for k in X0:
        np.testing.assert_allclose(x1[k], X0[k] + eta_norm * m[k] / (np.sqrt(v[k]) + TAU), rtol=1e-5)
    state = strategy_state(strategy)
    assert sorted(state) == ["m_t/b", "m_t/w", "v_t/b", "v_t/w"]
    np.testing.assert_allclose(state["m_t/w"], m["w"], rtol=1e-5)
    np.testing.assert_allclose(state["v_t/b"], v["b"], rtol=1e-5)


def test_fedadam_moments_survive_a_checkpoint_and_resume(tmp_path: Path) -> None:
    uninterrupted = fedadam()
    x1 = train_round(uninterrupted, 1, X0, ROUND_1)
    x2 = train_round(uninterrupted, 2, x1, ROUND_2)

    # The same round 1, checkpointed the way the federation does, then a fresh server.
    before_crash = fedadam()
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint(round=1, parameters=train_round(before_crash, 1, X0, ROUND_1),
                                                   config={}, extra_arrays=strategy_state(before_crash)))
    latest = ckpt.load_latest(tmp_path)
    assert latest is not None
    resumed = fedadam()
    restore_strategy_state(resumed, latest.extra_arrays, latest.parameters)
    x2_resumed = train_round(resumed, 2, latest.parameters, ROUND_2)

    for k in X0:
        np.testing.assert_array_equal(x2_resumed[k], x2[k])
    for k, v in strategy_state(uninterrupted).items():
        np.testing.assert_array_equal(strategy_state(resumed)[k], v)

    # Control: without the moments, round 2 restarts Adam from zero and lands elsewhere.
    forgetful = fedadam()
    x2_forgetful = train_round(forgetful, 2, latest.parameters, ROUND_2)
    assert not np.allclose(x2_forgetful["w"], x2["w"])


def test_fedavg_has_no_state_and_restoring_none_changes_nothing() -> None:
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "fedavg"}))
    x1 = train_round(strategy, 1, X0, ROUND_1)
    assert strategy_state(strategy) == {}
    restore_strategy_state(strategy, {}, X0)
    np.testing.assert_allclose(x1["w"], [5 / 3, -10 / 3], rtol=1e-6)  # plain weighted mean
    # A FedAdam state handed to FedAvg (a run resumed with another strategy) is ignored.
    restore_strategy_state(strategy, {"m_t/w": np.ones(2)}, X0)
    assert strategy_state(strategy) == {}


def test_eligible_nodes_grid_lists_only_the_chosen_nodes_and_delegates_the_rest() -> None:
    grid = FakeGrid([1, 2, 3, 4, 5])
    chosen = [4, 2]
    view = EligibleNodesGrid(grid, iter(chosen))  # type: ignore[arg-type]  # any iterable; read once
    assert view.get_node_ids() == [4, 2]
    view.get_node_ids().append(9)  # a caller mutating the answer does not change the view
    assert view.get_node_ids() == [4, 2]
    assert grid.get_node_ids() == [1, 2, 3, 4, 5]  # the real grid is untouched

    # Flower's own sampling through the view reaches exactly the chosen nodes, every time.
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "fedavg"}))
    for rnd in range(1, 6):
        messages = list(strategy.configure_train(rnd, params_to_record(X0), ConfigRecord(), view))  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in messages) == [2, 4]
        messages = list(strategy.configure_evaluate(rnd, params_to_record(X0), ConfigRecord(), view))  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in messages) == [2, 4]
    # Everything but the node list is the real grid's: messages pushed through the view reach it.
    assert view.push_messages(messages) == ["id-0", "id-1"]
    assert grid.pushed == messages
