"""The server's side of secure aggregation (run config ``aggregation = "secagg+"``).

One training round becomes Flower's SecAgg+ protocol: the four stages of
``flwr.server.workflow.SecAggPlusWorkflow`` (setup, share keys, collect masked vectors,
unmask), run from fedshop's round loop over the same grid and the same bounded waits as a
plain round. What the server learns is the *mean* of the merchants' quantised updates; no
single merchant's update is ever in its hands (the masked vector it receives from one
merchant is uniform noise modulo 2**32). The merchant's side is ``client.secure_aggregation``.

The workflow was written for Flower's legacy ``Strategy`` API, so it reads who trains from
``configure_fit`` and hands the unmasked sum to ``aggregate_fit``: ``_Round`` is that strategy
for one round, listing the nodes fedshop sampled and keeping the sum. The third stage's
message to each node is fedshop's own train message (from the run's strategy, FedProx's μ
included) with the protocol's record added, and each node's reply to it (its privacy facts,
beside the masked vector) is kept for the ledger (``SecureRound.replies``).

What the server can still check without seeing updates (docs/privacy.md, "Secure
aggregation"): every honest merchant's coordinates are clipped to ±clipping range before
masking, so a mean outside that range proves that some merchant sent a vector it did not
quantise honestly; ``SecureRound.reason`` says so and no aggregate is returned. Inside the
range a merchant can move each coordinate of the mean by at most 2 · range / n, the most a
clipped update can.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from shared.config import RunConfig
from shared.privacy import merchant_level
from shared.wire import PRIVACY, STATUS_OK

log = logging.getLogger(__name__)

# One vector weight per merchant (1 when it trained, 0 when it refused the call): the mean is
# unweighted, so no merchant's size shifts it, and N stays what the train reply declares.
MAX_WEIGHT = 1.0

# Sends one stage's messages and gathers the replies, in time: None for a node that did not answer.
Collect = Callable[[list[Message], str], list[tuple[int, "Message | None"]]]

STAGES = ("setup", "share keys", "collect masked vectors", "unmask")


@dataclasses.dataclass
class SecureRound:
    """What one secure round produced: every third-stage reply (node -> message, its privacy
    facts included), the mean update in the global model's key order (None when the round
    did not complete), and why not."""

    replies: dict[int, Message]
    mean_update: dict[str, np.ndarray] | None
    reason: str = ""
    # Whether the server unmasked the round's sum (and so learned it, even when it then
    # refused it), and how many trained merchants' vectors it held: what merchant-level DP
    # accounts (shared.privacy.merchant_level).
    unmasked: bool = False
    contributors: int = 0
    # False when the round produced no aggregate for a reason that is no fault of the protocol
    # or of a merchant (too many refused to train): the run goes on with the model unchanged.
    fault: bool = True


class _Node:
    """The legacy client proxy the workflow keys its results by: only ``node_id`` is read."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Round(LegacyStrategy):
    """A legacy strategy for one secure round: the workflow asks it who trains and hands it
    the unmasked mean (every result then carries it), which it keeps."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        # The message each node gets in the third stage is replaced by fedshop's own (``run``).
        return [(_Node(n), FitIns(parameters, {})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    # The workflow calls nothing else; a legacy strategy must still define these.
    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _StageGrid:
    """The grid the workflow talks to: each ``send_and_receive`` is one protocol stage, sent
    and awaited through fedshop's ``collect`` (message expiry, the round timeout, a log line
    per reply); the third stage's replies are kept."""

    def __init__(self, collect: Collect) -> None:
        self._collect = collect
        self._stage = 0
        self.masked_replies: dict[int, Message] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        stage = STAGES[min(self._stage, len(STAGES) - 1)]
        replies = self._collect(list(messages), f"secagg+ {stage}")
        if self._stage == STAGES.index("collect masked vectors"):
            self.masked_replies = {n: m for n, m in replies if m is not None and not m.has_error()}
        self._stage += 1
        return [m for _, m in replies if m is not None]


class SecureAggregation:
    """Runs training rounds as SecAgg+ with the run's threshold and quantisation settings."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def workflow(self) -> SecAggPlusWorkflow:
        # num_shares 1.0: every sampled merchant holds a share of every other's secrets (a
        # round has a handful of merchants, so SecAgg+'s sparser graphs would save little).
        return SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=self.config.secagg_threshold,
                                  max_weight=MAX_WEIGHT, clipping_range=self.config.secagg_clipping_range,
                                  quantization_range=self.config.secagg_quantization_range)

    def run(self, rnd: int, train_messages: Sequence[Message], keys: Sequence[str], collect: Collect) -> SecureRound:
        """One round: ``train_messages`` are fedshop's train messages for the sampled nodes
        (one each); ``keys`` the global model's array names, in the order updates are sent."""
        contents = {m.metadata.dst_node_id: m.content for m in train_messages}
        workflow = self.workflow()
        strategy = _Round(contents)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        grid = _StageGrid(collect)
        state = WorkflowState()
        # Parameters for the workflow's configure_fit call only: it never sends them.
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        if not workflow.setup_stage(grid, context, state):  # type: ignore[arg-type]
            return SecureRound({}, None, _short("setup", state))
        # The third stage sends each node its stored "fit instructions": fedshop's train message.
        state.nid_to_fitins = {n: _copy(contents[n]) for n in state.nid_to_fitins}
        for stage in (workflow.share_keys_stage, workflow.collect_masked_vectors_stage):
            if not stage(grid, context, state):  # type: ignore[arg-type]
                return SecureRound(grid.masked_replies, None, _short(stage.__name__, state))
        contributors = sum(_weight(m) for m in grid.masked_replies.values())
        if not contributors:
            # Every merchant refused: nothing to unmask (the protocol divides by the total weight).
            return SecureRound(grid.masked_replies, None, "no merchant sent an update", fault=False)
        if merchant_level.noise_multiplier(self.config) > 0 and contributors < state.threshold:
            # Each trained merchant added 1/threshold of the merchant-level noise: fewer of them
            # would leave the sum under-noised, so it is never unmasked.
            return SecureRound(grid.masked_replies, None,
                               f"only {contributors} merchant(s) sent an update; the merchant-level noise needs "
                               f"{state.threshold} (the round's secagg threshold), so the sum was not unmasked",
                               fault=False)
        if not workflow.unmask_stage(grid, context, state) or strategy.mean is None:  # type: ignore[arg-type]
            return SecureRound(grid.masked_replies, None, _short("unmask_stage", state))
        seen = SecureRound(grid.masked_replies, None, unmasked=True, contributors=contributors)
        limit = self.config.secagg_clipping_range * (1 + 1e-6)
        if any(not np.all(np.abs(v) <= limit) for v in strategy.mean):
            seen.reason = (f"the unmasked mean lies outside ±{self.config.secagg_clipping_range:g} (secagg-"
                           "clipping-range): some merchant sent a vector it did not quantise honestly")
        elif len(strategy.mean) != len(keys):
            seen.reason = f"the unmasked mean has {len(strategy.mean)} arrays, the model {len(keys)}"
        else:
            seen.mean_update = dict(zip(keys, strategy.mean, strict=True))
        return seen


def _weight(reply: Message) -> int:
    """The vector weight a third-stage reply's merchant used: 1 if it trained, 0 if it refused
    (read from the reply's privacy facts; the weight itself is inside the masked vector)."""
    privacy = reply.content.config_records.get(PRIVACY)
    return int(privacy is not None and privacy.get("status") == STATUS_OK)


def _short(stage: str, state: WorkflowState) -> str:
    """Why the protocol stopped, as the ledger and the log say it."""
    name = stage.replace("_stage", "").replace("_", " ")
    alive, sampled = len(state.active_node_ids), len(state.sampled_node_ids) or len(state.nid_to_fitins)
    return (f"secure aggregation stopped at its {name} stage: {alive} of {sampled} merchant(s) still in the "
            f"protocol; it needs at least 2, and each merchant needs {state.threshold} of its neighbours' key "
            "shares (secagg-threshold)")


def _copy(content: RecordDict) -> RecordDict:
    """A fresh RecordDict holding the same records (the workflow adds its own to it)."""
    out = RecordDict()
    for name, record in content.items():
        out[name] = record
    out.config_records.pop(RECORD_KEY_CONFIGS, None)
    return out


def masked_bytes(reply: Message) -> int:
    """The size of the masked vector in a third-stage reply (what the merchant uploaded)."""
    record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    vectors = record.get(SecAggKey.MASKED_PARAMETERS, []) if record is not None else []
    return sum(len(b) for b in vectors if isinstance(b, bytes)) if isinstance(vectors, list) else 0
