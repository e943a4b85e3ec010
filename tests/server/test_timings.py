"""server.federation with merchants that report their timings and merchants that do not.

``duration-s`` / ``client-s`` leave a merchant only when its ``report-timings`` is on
(``client.policy``); a deployment can mix both. The server must aggregate such a round (Flower
needs the same metric keys in every reply), keep what was reported, and read 0 for the rest,
down to ``metrics.jsonl``, the summary and the HTML report. The grid here answers at once,
without Ray: the replies are what ``client.merchant`` sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from server.federation import Federation
from server.report import run_summary
from server.report_html import render_report
from shared.config import RunConfig
from shared.privacy.events import MechanismEvent, SpendEvent
from shared.wire import (
    CLIENT_S,
    DURATION_S,
    NUM_EXAMPLES,
    STATUS_OK,
    STEPS,
    EvalReply,
    PrivacyFacts,
    TrainReply,
)
from tests.helpers.federation import metrics_rows

PARAMS = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Message built outside a running ServerApp needs the identity Flower's runtime sets.
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def train_reply(merchant: str, timings: dict[str, float]) -> TrainReply:
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


def run(tmp_path: Path, replies: dict[int, TrainReply]) -> dict[str, Any]:
    config = RunConfig(num_server_rounds=1, merchants_per_round=len(replies), run_dir=str(tmp_path / "run"),
                       dp=False, node_wait_timeout_s=1.0)
    federation = Federation(AnsweringGrid(replies), config, PARAMS)  # type: ignore[arg-type]
    try:
        result = federation.run()
    finally:
        federation.close()
    assert result.rounds_completed == 1 and result.reports[0].aggregated
    assert np.allclose(result.params["w"], 0.1)  # both updates aggregated
    (row,) = metrics_rows(tmp_path / "run")
    return row


def test_a_round_mixing_merchants_with_and_without_timings_aggregates_and_keeps_what_was_sent(
    tmp_path: Path,
) -> None:
    row = run(tmp_path, {1: train_reply("shop-a", {DURATION_S: 2.0, CLIENT_S: 3.0}), 2: train_reply("shop-b", {})})
    assert sorted(row["accepted"]) == ["shop-a", "shop-b"] and row["failed"] == {}
    assert (row["slowest_train_s"], row["slowest_client_s"], row["total_client_s"]) == (2.0, 3.0, 3.0)


def test_without_timings_the_run_reads_zero_and_its_reports_still_render(tmp_path: Path) -> None:
    row = run(tmp_path, {1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})})
    assert (row["slowest_train_s"], row["slowest_client_s"], row["total_client_s"]) == (0.0, 0.0, 0.0)
    assert row["wall_s"] > 0  # the server's own clock, not the merchants'
    summary = run_summary(tmp_path / "run", stopped_because="all rounds done")
    assert summary["rounds_completed"] == 1
    assert "shop-a" in render_report(tmp_path / "run")
