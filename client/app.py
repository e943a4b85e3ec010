"""The ClientApp: translate Flower messages to ``Merchant`` calls and back. Nothing else."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.merchant import Merchant, resolve_node
from shared.config import RunConfig
from shared.wire import ARRAYS, CONFIG, METRICS, MODEL_VERSION, RUN_ID, SERVER_ROUND, record_to_params

log = logging.getLogger(__name__)

# The key under which Flower's FedProx strategy sends μ in every train instruction's config
# (flwr.serverapp.strategy.FedProx.configure_train); absent from other strategies' (μ = 0).
PROXIMAL_MU = "proximal-mu"

app = ClientApp()


def _merchant(context: Context) -> Merchant:
    config = RunConfig.from_mapping(context.run_config)
    return Merchant(resolve_node(context.node_config, config), config)


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
    result = merchant.evaluate(record_to_params(msg.content.array_records[ARRAYS]))
    metrics = {"num-examples": float(result.num_examples), "eval-loss": result.loss, **result.metrics}
    content = RecordDict({METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
                          "merchant": ConfigRecord({"merchant-id": merchant.identity.merchant_id})})
    return Message(content, reply_to=msg)
