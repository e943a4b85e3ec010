"""The ClientApp: translate Flower messages to ``Merchant`` calls and back. Nothing else."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.merchant import Merchant, resolve_node
from client.policy import MerchantPolicy
from client.release import EvalSettings
from shared.config import RunConfig
from shared.wire import ARRAYS, CONFIG, MODEL_VERSION, PROXIMAL_MU, RUN_ID, SERVER_ROUND, record_to_params

log = logging.getLogger(__name__)

app = ClientApp()


def _merchant(context: Context) -> Merchant:
    config = RunConfig.from_mapping(context.run_config)
    policy = MerchantPolicy.from_node_config(context.node_config)  # what the merchant pinned
    return Merchant(resolve_node(context.node_config, config), config, policy=policy)


@app.train()
def train(msg: Message, context: Context) -> Message:
    merchant = _merchant(context)
    server_config = msg.content.config_records.get(CONFIG, ConfigRecord())
    reply = merchant.train(
        record_to_params(msg.content.array_records[ARRAYS]),
        server_round=int(server_config.get(SERVER_ROUND, 0)),  # type: ignore[arg-type]
        model_version=int(server_config.get(MODEL_VERSION, 0)),  # type: ignore[arg-type]
        run_id=str(server_config.get(RUN_ID, "")),
        proximal_mu=float(server_config.get(PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
    )
    return Message(reply.to_recorddict(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    merchant = _merchant(context)
    server_config = msg.content.config_records.get(CONFIG, ConfigRecord())
    reply = merchant.evaluate(
        record_to_params(msg.content.array_records[ARRAYS]),
        EvalSettings.resolve(context.node_config, merchant.config),  # the merchant's keys win
        server_round=int(server_config.get(SERVER_ROUND, 0)),  # type: ignore[arg-type]
        model_version=int(server_config.get(MODEL_VERSION, 0)),  # type: ignore[arg-type]
        run_id=str(server_config.get(RUN_ID, "")),
    )
    return Message(reply.to_recorddict(), reply_to=msg)
