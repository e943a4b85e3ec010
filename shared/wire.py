"""What crosses the network: record keys and (de)serialisation of updates and privacy facts.

A train reply carries exactly one ArrayRecord (the trainable parameters), one MetricRecord
(with ``num-examples`` for weighting; the timing keys only from a merchant that reports
them, and the server drops those before Flower's aggregation, which needs the same keys in
every reply) and one ConfigRecord of privacy facts describing *that* update. The facts
travel with the update they describe, never separately.

An evaluate reply (``EvalReply``) carries the merchant's id, the privacy facts of the
evaluation (its own ``SpendEvent``, release ``"evaluation"``) and, when the merchant released
any, one MetricRecord of metrics computed from noised sums (``client.release``). No raw loss
crosses the network: the train reply has none (docs/privacy.md, "Released fields").
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.privacy.events import SPEND_KEYS, SpendEvent

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"

# Keys the server sends in the train/evaluate ConfigRecord.
SERVER_ROUND = "server-round"
MODEL_VERSION = "model-version"
RUN_ID = "run-id"  # the federation run, so a merchant's own record can be matched to a ledger

# Metric keys (train and evaluate replies). num-examples is N, declared public (docs/privacy.md).
NUM_EXAMPLES = "num-examples"
STEPS = "steps"
DURATION_S = "duration-s"
CLIENT_S = "client-s"
EVAL_LOSS = "eval-loss"  # computed from the evaluation's noised sums, never the raw mean
# The evaluate reply's ConfigRecord naming the merchant, and its one key.
MERCHANT = "merchant"
MERCHANT_ID = "merchant-id"
REASON = "reason"  # in the evaluate reply's merchant record: why nothing was released
# The key under which Flower's FedProx strategy sends μ in every train instruction's config
# (flwr.serverapp.strategy.FedProx.configure_train); absent from other strategies' (μ = 0).
PROXIMAL_MU = "proximal-mu"

STATUS_OK = "ok"
STATUS_REFUSED = "refused"  # the merchant declined: its budget would be exceeded

# In every train reply that carries an update. No loss: the first step's loss is a function
# of the sampled records, so update + loss has no finite ε.
TRAIN_METRIC_KEYS = (NUM_EXAMPLES, STEPS)
# duration-s: the DP training loop alone; client-s: the whole train handler (data loading,
# model building, training) — the benchmarks separate framework overhead with them. A timing
# side channel (a step's time follows its sampled records' text lengths), so a reply carries
# them only when the merchant's report-timings is on (client.policy); otherwise they are absent.
TIMING_METRIC_KEYS = (DURATION_S, CLIENT_S)


class WireError(ValueError):
    """A reply is missing a record or a key; the message names it."""


class MalformedUpdateError(WireError):
    """A train reply whose privacy facts read but whose parameters do not: the server records
    the call's spend (``facts``) and rejects the update."""

    def __init__(self, facts: PrivacyFacts, reason: str) -> None:
        super().__init__(f"merchant {facts.merchant_id!r}: {reason}")
        self.facts, self.reason = facts, reason


# A model's parameters travel as one flat array whose key names the layout (the parameters'
# names and shapes, in order): ``PACKED_PREFIX + '[["name",[rows,cols]],...]'``. Flower moves a
# message as a tree of objects, each fetched or sent with a request of its own (two at a time on
# a 2-core machine), and every Array is two objects (the array and its chunk): a MiniLM LoRA
# model as 30 arrays was ~64 objects a message, ~6 packed; deployed, each hop (SuperLink ->
# node -> ClientApp and back) paid for every one. The key keeps the record self-describing, so
# a receiver needs nothing beside it, and Flower's aggregation, which averages arrays of the
# same key, averages only replies of the same layout (server.federation re-packs each accepted
# reply in the global model's order first). Parameters of more than one dtype travel unpacked,
# one array per parameter, as Flower's ArrayRecord holds them.
PACKED_PREFIX = "fedshop-packed/1 "


def pack(params: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """``params`` keyed as they travel: one flat array under its layout key, or (several
    dtypes) as they are. What anything keyed like an ArrayRecord holds (FedAdam's moments too)."""
    arrays = [np.asarray(v) for v in params.values()]
    if not arrays or len({a.dtype for a in arrays}) != 1:
        return OrderedDict(zip(params, arrays, strict=True))
    layout = json.dumps([[name, list(a.shape)] for name, a in zip(params, arrays, strict=True)], separators=(",", ":"))
    return OrderedDict([(PACKED_PREFIX + layout, np.concatenate([a.reshape(-1) for a in arrays]))])


def unpack(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """``pack``'s inverse: the parameters by name; a WireError when a packed layout does not
    match its data."""
    if len(arrays) == 1:
        key, flat = next(iter(arrays.items()))
        if key.startswith(PACKED_PREFIX):
            return _unpack(key[len(PACKED_PREFIX):], np.asarray(flat))
    return OrderedDict(arrays)


def params_to_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in pack(params).items()))


def record_to_params(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """The parameters an ArrayRecord holds, packed (``params_to_record``) or one array each; a
    WireError when a packed record's layout does not match its data."""
    return unpack(OrderedDict((k, v.numpy()) for k, v in record.items()))


def _unpack(layout: str, flat: np.ndarray) -> OrderedDict[str, np.ndarray]:
    try:
        entries = [(str(name), tuple(int(d) for d in shape)) for name, shape in json.loads(layout)]
    except (ValueError, TypeError) as exc:
        raise WireError(f"packed parameters: unreadable layout ({exc})") from exc
    sizes = [math.prod(shape) for _, shape in entries]
    if flat.ndim != 1 or any(d < 0 for _, shape in entries for d in shape) or sum(sizes) != flat.size:
        raise WireError(f"packed parameters: the layout names {sum(sizes)} values in {len(entries)} parameters, "
                        f"the array holds {flat.size} (shape {flat.shape})")
    if len({name for name, _ in entries}) != len(entries):
        raise WireError("packed parameters: the layout names a parameter twice")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    start = 0
    for (name, shape), size in zip(entries, sizes, strict=True):
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def packed_key(record: ArrayRecord) -> str | None:
    """The key of a packed record (its layout), None for an unpacked one."""
    keys = list(record)
    return keys[0] if len(keys) == 1 and keys[0].startswith(PACKED_PREFIX) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyFacts:
    """The privacy side of one train reply: the call's spend and the merchant's account of it.

    On the wire the spend's keys (``shared.privacy.events.SPEND_KEYS``, kebab-cased) sit flat
    beside the facts' own; all are required except ``reason``, ``noise`` and ``neighbours`` (``_OPTIONAL``).
    """

    merchant_id: str
    status: str  # STATUS_OK or STATUS_REFUSED
    dp: bool
    event: SpendEvent  # what this call released, and how (a refused call: steps = 0)
    epsilon: float  # the merchant's cumulative ε after this call (its own accountant)
    epsilon_budget: float
    accountant: str
    model_version: int
    reason: str = ""

    def to_record(self) -> ConfigRecord:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "event"}
        return ConfigRecord({_key(k): v for k, v in {**own, **self.event.to_dict()}.items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyFacts:
        values: dict[str, Any] = {k.replace("-", "_"): v for k, v in record.items()}
        for name in (*(f.name for f in dataclasses.fields(cls) if f.name != "event"), *SPEND_KEYS):
            if name not in values and name not in _OPTIONAL:
                raise WireError(f"privacy facts lack key {_key(name)!r}")
        try:
            event = SpendEvent.from_dict(values)
            event.validate()
        except (TypeError, ValueError) as exc:
            raise WireError(f"privacy facts: {exc}") from exc
        facts = cls(event=event, **{f.name: values[f.name] for f in dataclasses.fields(cls)
                                    if f.name != "event" and f.name in values})
        for name in ("epsilon", "epsilon_budget"):
            if not math.isfinite(float(getattr(facts, name))):
                raise WireError(f"privacy fact {name!r} = {getattr(facts, name)!r} is not finite")
        return facts


# Absent means empty; an absent ``neighbours`` reads as add/remove (a merchant that predates the
# key accounted for it), which the ledger keeps and the audit fails.
_OPTIONAL = frozenset({"reason", "noise", "neighbours"})


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainReply:
    facts: PrivacyFacts
    params: dict[str, np.ndarray] | None  # None when refused
    metrics: dict[str, float]

    def to_recorddict(self) -> RecordDict:
        content = RecordDict({PRIVACY: self.facts.to_record()})
        if self.params is not None:
            content[ARRAYS] = params_to_record(self.params)
            keys = TRAIN_METRIC_KEYS + tuple(k for k in TIMING_METRIC_KEYS if k in self.metrics)
            content[METRICS] = MetricRecord({k: float(self.metrics.get(k, 0.0)) for k in keys})
        return content

    @classmethod
    def from_recorddict(cls, content: RecordDict) -> TrainReply:
        if PRIVACY not in content.config_records:
            raise WireError(f"train reply has no {PRIVACY!r} ConfigRecord")
        facts = PrivacyFacts.from_record(content.config_records[PRIVACY])
        try:
            params = record_to_params(content.array_records[ARRAYS]) if ARRAYS in content.array_records else None
        except WireError as exc:
            raise MalformedUpdateError(facts, str(exc)) from exc
        metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
        if facts.status == STATUS_OK and params is None:
            raise WireError(f"merchant {facts.merchant_id!r}: reply status ok but no {ARRAYS!r} record")
        return cls(facts=facts, params=params, metrics={k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]


def array_bytes(params: dict[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in params.values()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalReply:
    """What one evaluate reply carries: who answered, the evaluation's privacy facts (None
    when the merchant evaluates without DP), and the released metrics (empty when it released
    none: evaluation off, held-out set too small, budget spent; ``facts.reason`` says which)."""

    merchant_id: str
    facts: PrivacyFacts | None
    metrics: dict[str, float]
    reason: str = ""

    @property
    def released(self) -> bool:
        return bool(self.metrics)

    def to_recorddict(self) -> RecordDict:
        merchant = ConfigRecord({MERCHANT_ID: self.merchant_id})
        if self.reason:
            merchant[REASON] = self.reason
        content = RecordDict({MERCHANT: merchant})
        if self.facts is not None:
            content[PRIVACY] = self.facts.to_record()
        if self.metrics:
            content[METRICS] = MetricRecord({k: float(v) for k, v in self.metrics.items()})
        return content

    @classmethod
    def from_recorddict(cls, content: RecordDict) -> EvalReply:
        merchant = content.config_records.get(MERCHANT)
        if merchant is None or MERCHANT_ID not in merchant:
            raise WireError(f"evaluate reply has no {MERCHANT!r} ConfigRecord with {MERCHANT_ID!r}")
        facts = PrivacyFacts.from_record(content.config_records[PRIVACY]) if PRIVACY in content.config_records else None
        metrics = dict(content.metric_records[METRICS]) if METRICS in content.metric_records else {}
        if facts is not None and facts.status != STATUS_OK and metrics:
            raise WireError(f"merchant {facts.merchant_id!r}: evaluation {facts.status} but metrics released")
        return cls(merchant_id=str(merchant[MERCHANT_ID]), facts=facts, reason=str(merchant.get(REASON, "")),
                   metrics={k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
