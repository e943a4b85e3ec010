"""A grid whose nodes answer at once, without Ray, for tests of ``server.federation`` itself.

Each node answers a train instruction with its ``TrainReply`` (as ``client.merchant`` sends
it) and an evaluate instruction with an evaluation released by nobody. ``run_federation`` runs
a ``Federation`` over such a grid; a module using it takes the ``task_identity`` fixture
(``from tests.helpers.answering_grid import task_identity``), which gives Messages built outside
a running ServerApp the identity Flower's runtime would set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from server.federation import Federation
from server.round_report import FederationResult
from shared.config import RunConfig
from shared.privacy.events import MechanismEvent, SpendEvent
from shared.wire import NUM_EXAMPLES, STATUS_OK, STEPS, EvalReply, PrivacyFacts, TrainReply

PARAMS = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def train_reply(merchant: str, timings: dict[str, float]) -> TrainReply:
    """A non-private call's reply that moves every parameter of ``PARAMS`` by 0.1."""
    event = SpendEvent.of(MechanismEvent(noise_multiplier=0.0, sample_rate=0.0, steps=2, max_grad_norm=1.0),
                          unit_count=40, delta=0.0, noise="")  # a non-private call's facts (client.merchant)
    facts = PrivacyFacts(merchant_id=merchant, status=STATUS_OK, dp=False, event=event, epsilon=0.0,
                         epsilon_budget=8.0, accountant="pld", model_version=0)
    params = {k: v + 0.1 for k, v in PARAMS.items()}
    return TrainReply(facts=facts, params=params, metrics={NUM_EXAMPLES: 40.0, STEPS: 2.0, **timings})


class AnsweringGrid:
    """Nodes that answer every instruction at once: train with their reply, evaluate with nothing."""

    def __init__(self, replies: dict[int, TrainReply]) -> None:
        self.replies = replies
        self.answers: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.replies)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{len(self.answers)}"  # as Flower's InMemoryGrid does
            reply = self.replies[msg.metadata.dst_node_id]
            if msg.metadata.message_type == "train":
                content = reply.to_recorddict()
            else:
                content = EvalReply(merchant_id=reply.facts.merchant_id, facts=None, metrics={},
                                    reason="evaluation is off").to_recorddict()
            self.answers.append(Message(content, reply_to=msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [a for a in self.answers if a.metadata.reply_to_message_id in message_ids]


def run_federation(grid: AnsweringGrid, run_dir: Path, **settings: Any) -> FederationResult:
    """A non-private federation of every node of ``grid`` on ``PARAMS`` (one round unless
    ``settings`` say otherwise: RunConfig's field names)."""
    config = RunConfig(**{"num_server_rounds": 1, "merchants_per_round": len(grid.replies), "run_dir": str(run_dir),
                          "dp": False, "node_wait_timeout_s": 1.0, **settings})
    federation = Federation(grid, config, PARAMS)  # type: ignore[arg-type]
    try:
        return federation.run()
    finally:
        federation.close()
