"""One row of the privacy ledger: a merchant's spend in one round, as the server recorded it.

A merchant's round may hold two rows: its update's and its evaluation's (``event.release``).

A ``SpendRecord`` carries the merchant's ``shared.privacy.events.SpendEvent`` whole (the spend
the merchant committed and sent in its privacy facts) and adds the server's context: which
run, round, merchant and node, the merchant's reported ε and budget, and the server's verdict.
Its columns are the context's plus the event's own keys (``SPEND_KEYS``), so the table stores
the event field by field and reads it back equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from shared.privacy.events import SPEND_KEYS, SpendEvent
from shared.wire import PrivacyFacts

STATUSES: frozenset[str] = frozenset({"accepted", "rejected", "refused"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpendRecord:
    """One merchant's privacy spend in one round, as the merchant reported it.

    ``epsilon_reported`` is the merchant's *cumulative* ε after this call, from its own
    persistent accountant; the spend of this call alone is derivable (difference to the
    merchant's previous row) and therefore not stored.
    """

    run_id: str
    round: int
    merchant_id: str
    node_id: int
    model_version: int  # the global model round the update was computed on
    event: SpendEvent  # what the merchant released, and how
    epsilon_reported: float
    epsilon_budget: float
    accountant: str
    status: str  # one of STATUSES; "refused": the merchant declined for budget and took no steps
    reason: str = ""
    dp: bool = True

    def __post_init__(self) -> None:
        # Fail where the record is built, with a message naming the field; the table's
        # CHECK constraints are the backstop for anything that bypasses this.
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, got {self.status!r}")
        if self.round < 1:
            raise ValueError(f"round must be >= 1, got {self.round}")
        if not self.merchant_id:
            raise ValueError("merchant_id must not be empty")
        if not 0 <= self.node_id < 2**64:
            raise ValueError(f"node_id must be a uint64 (Flower node id), got {self.node_id}")
        if self.model_version < 0:
            raise ValueError(f"model_version must be >= 0, got {self.model_version}")
        self.event.validate()
        if self.status == "refused" and self.event.mechanism.steps != 0:
            raise ValueError(f"a refused call takes no steps, got steps={self.event.mechanism.steps}")
        # ε may be +inf (no DP, or a budget of "unlimited"), never NaN or negative.
        for name in ("epsilon_reported", "epsilon_budget"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 (inf allowed), got {value!r}")

    @property
    def key(self) -> tuple[str, int, str, str]:
        """The primary key: a merchant has at most one row per round per kind of release."""
        return (self.run_id, self.round, self.merchant_id, self.event.release)

    def columns(self) -> dict[str, Any]:
        """Column -> value, the event's flattened in: what a row stores (recorded_at aside)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "event"}
        return {**own, **self.event.to_dict()}


# Column order shared by INSERT and SELECT; recorded_at is deliberately absent.
COLUMNS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(SpendRecord) if f.name != "event"),
    *SPEND_KEYS,
)
_INT_COLUMNS = frozenset({"round", "model_version", "steps", "unit_count"})
_REAL_COLUMNS = frozenset({"noise_multiplier", "sample_rate", "max_grad_norm", "delta", "expected_batch",
                           "epsilon_reported", "epsilon_budget"})


def to_row(record: SpendRecord) -> tuple[Any, ...]:
    """The record's values in ``COLUMNS`` order, as plain SQLite types."""
    # Coerce to plain Python types: sqlite3 cannot bind numpy integers, which trainers and
    # accountants readily hand over.
    values = record.columns()
    for column in _INT_COLUMNS:
        values[column] = int(values[column])
    for column in _REAL_COLUMNS:
        values[column] = float(values[column])
    values["dp"] = int(bool(record.dp))
    values["node_id"] = str(int(record.node_id))
    return tuple(values[c] for c in COLUMNS)


def from_row(row: Sequence[Any]) -> SpendRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    event = SpendEvent.from_dict(values)
    own = {c: values[c] for c in COLUMNS if c not in SPEND_KEYS}
    own["dp"] = bool(own["dp"])
    own["node_id"] = int(own["node_id"])
    return SpendRecord(event=event, **own)


def differences(old: SpendRecord, new: SpendRecord) -> list[str]:
    """``column: recorded X, now Y`` for every column in which two records differ."""
    before, after = old.columns(), new.columns()
    return [f"{c}: recorded {before[c]!r}, now {after[c]!r}" for c in COLUMNS if before[c] != after[c]]


def spend_record(facts: PrivacyFacts, *, run_id: str, round: int, node_id: int, status: str,
                 reason: str) -> SpendRecord:
    """The ledger row of one train reply: the merchant's spend as it sent it, the server's verdict."""
    return SpendRecord(run_id=run_id, round=round, merchant_id=facts.merchant_id, node_id=node_id,
                       model_version=facts.model_version, event=facts.event,
                       epsilon_reported=facts.epsilon if facts.dp else float("inf"),
                       epsilon_budget=facts.epsilon_budget, accountant=facts.accountant, status=status,
                       reason=reason[:500], dp=facts.dp)
