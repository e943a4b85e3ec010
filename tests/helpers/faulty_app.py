"""A ClientApp whose merchants misbehave, chosen by merchant id (its data folder's name).

It wraps fedshop's own train handler, so every merchant really trains (and spends privacy
budget, recorded in its state file) before its update is damaged:

- ``bad-nan``:   one value of one array becomes NaN;
- ``bad-shape``: one array loses its last row;
- ``bad-norm``:  one array is shifted by +1e6 (update norm far above max-update-norm);
- anything else is honest.

Ray workers import this module by name (``tests.helpers.faulty_app``), so the repository
root must be on their PYTHONPATH.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as fedshop_app
from shared.wire import STATUS_OK, TrainReply

app = ClientApp()


def damage(merchant_id: str, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    params = {k: np.array(v, copy=True) for k, v in params.items()}
    name = next(k for k, v in params.items() if v.ndim == 2 and v.shape[0] > 1)
    if merchant_id == "bad-nan":
        params[name].flat[0] = np.nan
    elif merchant_id == "bad-shape":
        params[name] = params[name][:-1]
    elif merchant_id == "bad-norm":
        params[name] = params[name] + 1e6
    return params


@app.train()
def train(msg: Message, context: Context) -> Message:
    honest = fedshop_app.train(msg, context)
    reply = TrainReply.from_recorddict(honest.content)
    if reply.facts.status != STATUS_OK or reply.params is None:
        return honest
    damaged = TrainReply(facts=reply.facts, params=damage(reply.facts.merchant_id, reply.params),
                         metrics=reply.metrics)
    return Message(damaged.to_recorddict(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedshop_app.evaluate(msg, context)
