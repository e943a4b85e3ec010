"""The ClientApp: translate Flower messages to ``Merchant`` calls and back, and a failed call
to a public error.

A handler that raises would have Flower send the exception's text to the server, and a
data-validation error's text quotes the offending values. So each handler's failure is
logged here, in full, on the merchant's side, and the server gets an error that names only
the exception's class, the merchant and, for invalid data, where the problems are (file,
row, field): never a value (docs/privacy.md, "What a merchant releases").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.merchant import Merchant, resolve_node
from client.policy import MerchantPolicy
from client.release import EvalSettings
from client.secure_aggregation import secure_aggregation_mod
from shared import flower_log
from shared.config import RunConfig
from shared.wire import ARRAYS, CONFIG, MODEL_VERSION, PROXIMAL_MU, RUN_ID, SERVER_ROUND, record_to_params

log = logging.getLogger(__name__)
flower_log.quiet_flower()  # this module is where fedshop's code first runs in a Ray worker or a node's ClientApp

# The mod steps in only for the messages of a secure-aggregation round (aggregation = secagg+).
app = ClientApp(mods=[secure_aggregation_mod])

Handler = Callable[[Message, Context], Message]


class MerchantCallError(RuntimeError):
    """A merchant's handler failed; the message carries only what is public (``public_failure``)."""


def public_failure(exc: BaseException, merchant_id: str, call: str) -> str:
    """What the server may read of a failed call: that it failed (no reply arrives either way),
    the exception's class, the merchant, and where the details are. Not where the data is
    invalid: which rows or fields fail is a fact about the records, not about N."""
    return (f"{type(exc).__name__} in the {call} call of merchant {merchant_id!r}; the details stay in the "
            "merchant's own log (not sent)")


def _merchant_id(context: Context) -> str:
    """Who failed, as the reply would have said; the node id if even that cannot be worked out."""
    try:
        return resolve_node(context.node_config, RunConfig.from_mapping(context.run_config)).merchant_id
    except Exception:  # the failure being reported may be this very resolution
        return str(context.node_config.get("merchant-id", f"node {context.node_id}"))


def _failures_stay_home(handler: Handler) -> Handler:
    """Run ``handler``; if it raises, log the whole exception here (the merchant's log) and raise
    one whose text is public. The call still fails: the server sees it and counts it failed."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            who = _merchant_id(context)
            log.error("merchant %s: the %s call raised an error (the server is told its class only, "
                      "never this text): %s", who, handler.__name__, exc, exc_info=exc)
            # "from None": no chained original whose text a traceback would carry to the server.
            raise MerchantCallError(public_failure(exc, who, handler.__name__)) from None
    return guarded


def _merchant(context: Context) -> Merchant:
    config = RunConfig.from_mapping(context.run_config)
    policy = MerchantPolicy.from_node_config(context.node_config)  # what the merchant pinned
    return Merchant(resolve_node(context.node_config, config), config, policy=policy)


@app.train()
@_failures_stay_home
def train(msg: Message, context: Context) -> Message:
    merchant = _merchant(context)
    server_config = msg.content.config_records.get(CONFIG, ConfigRecord())
    reply = merchant.train(
        record_to_params(msg.content.array_records[ARRAYS]),
        server_round=int(server_config.get(SERVER_ROUND, 0)),  # type: ignore[arg-type]
        model_version=int(server_config.get(MODEL_VERSION, 0)),  # type: ignore[arg-type]
        run_id=str(server_config.get(RUN_ID, "")),
        proximal_mu=float(server_config.get(PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
        eval_settings=EvalSettings.resolve(context.node_config, merchant.config),  # a noise plan leaves them room
    )
    return Message(reply.to_recorddict(), reply_to=msg)


@app.evaluate()
@_failures_stay_home
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
