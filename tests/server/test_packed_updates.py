"""server.federation with packed updates (shared.wire): a reply laid out in another order is
still averaged name by name, and one whose packing does not read is rejected with its spend
recorded. The grid answers at once, without Ray (tests.helpers.answering_grid)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from shared.wire import ARRAYS, PACKED_PREFIX, TrainReply, packed_key, params_to_record
from tests.helpers.answering_grid import PARAMS, AnsweringGrid, run_federation, task_identity, train_reply
from tests.helpers.federation import ledger_rows, metrics_rows

__all__ = ["task_identity"]  # the fixture Messages outside a ServerApp need


class RelayingGrid(AnsweringGrid):
    """Answers as AnsweringGrid, with one node's train reply's ArrayRecord replaced."""

    def __init__(self, replies: dict[int, TrainReply], node: int, arrays: ArrayRecord) -> None:
        super().__init__(replies)
        self.node, self.arrays = node, arrays

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = super().push_messages(messages)
        for answer, msg in zip(self.answers[-len(messages):], messages, strict=True):
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == self.node:
                answer.content.array_records[ARRAYS] = self.arrays
        return ids


def run(tmp_path: Path, grid: AnsweringGrid) -> tuple[dict[str, np.ndarray], dict]:
    result = run_federation(grid, tmp_path / "run")
    (row,) = metrics_rows(tmp_path / "run")
    return result.params, row


def test_a_reply_packed_in_another_order_is_averaged_name_by_name(tmp_path: Path) -> None:
    other = OrderedDict([("b", np.full(3, 0.5, dtype=np.float32)), ("w", np.full((2, 3), 0.3, dtype=np.float32))])
    assert packed_key(params_to_record(other)) != packed_key(params_to_record(PARAMS))
    grid = RelayingGrid({1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})}, 2, params_to_record(other))
    params, row = run(tmp_path, grid)
    assert sorted(row["accepted"]) == ["shop-a", "shop-b"]
    assert np.allclose(params["w"], (0.1 + 0.3) / 2) and np.allclose(params["b"], (0.1 + 0.5) / 2)
    assert params["w"].shape == (2, 3) and list(params) == list(PARAMS)


def test_a_reply_whose_packing_does_not_read_is_rejected_and_its_spend_recorded(tmp_path: Path) -> None:
    broken = ArrayRecord(OrderedDict([(PACKED_PREFIX + '[["w",[2,3]],["b",[3]]]',
                                       Array(np.zeros(8, dtype=np.float32)))]))
    grid = RelayingGrid({1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})}, 2, broken)
    params, row = run(tmp_path, grid)
    assert row["accepted"] == ["shop-a"] and row["failed"] == {}
    assert "shop-b" in row["rejected"] and "the array holds 8" in row["rejected"]["shop-b"]
    assert np.allclose(params["w"], 0.1)  # shop-a's update alone
    rows = {r.merchant_id: r for r in ledger_rows(tmp_path / "run")}
    assert rows["shop-b"].status == "rejected" and rows["shop-b"].event.mechanism.steps == 2
