"""The soak's ClientApp (``benchmarks/soak.py``): fedshop's own, except in the round that the node's
environment names, where it damages its update after really training (and spending).

``FEDSHOP_SOAK_FAULT=KIND@ROUND`` in a merchant's start-script environment (the warm ClientApp
launcher and its forks inherit it): ``shape`` (malformed: one array loses its last row), ``nan``
or ``norm`` (over max-update-norm), as ``tests.helpers.faulty_app`` damages them. A fault keyed by
round rather than by merchant name lets one merchant misbehave once and be accepted afterwards,
and keeps fault injection out of fedshop's own code: the soak deploys this app from a copy of
the project whose pyproject names it as the ClientApp.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as fedshop_app
from shared.wire import CONFIG, SERVER_ROUND, STATUS_OK, TrainReply
from tests.helpers.faulty_app import damage

FAULT_ENV = "FEDSHOP_SOAK_FAULT"
KINDS = ("shape", "nan", "norm")

app = ClientApp()


def planned_fault(server_round: int, spec: str | None = None) -> str | None:
    """The kind of damage planned for ``server_round`` (``spec``: the environment's by default)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    if not spec:
        return None
    kind, _, rnd = spec.partition("@")
    if kind not in KINDS or not rnd.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected KIND@ROUND with KIND one of {KINDS}")
    return kind if int(rnd) == server_round else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    honest = fedshop_app.train(msg, context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    kind = planned_fault(int(config.get(SERVER_ROUND, 0)))  # type: ignore[arg-type]
    if kind is None:
        return honest
    reply = TrainReply.from_recorddict(honest.content)
    if reply.facts.status != STATUS_OK or reply.params is None:
        return honest  # a refusal stays a refusal
    damaged = TrainReply(facts=reply.facts, params=damage(f"bad-{kind}", reply.params), metrics=reply.metrics)
    return Message(damaged.to_recorddict(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedshop_app.evaluate(msg, context)
