"""A merchant's own privacy budget and accountant state, persisted on the merchant's side.

The state file (JSON) holds every spend this merchant ever released (``SpendEvent``), plus
its budget. It is written atomically and durably (``shared.atomic``) *before* an update
leaves the trainer, so a crash can lose an update but never the record of its spend. ε is
always recomputed from the full history of mechanisms, so it composes across calls and
restarts; a fresh accountant per round (which would report one round's ε as the total)
cannot happen.

The budget here is the merchant's: a server's run config may ask for a larger ε, but
``check`` compares against the budget stored on this machine and the smaller one wins.

File versions: 2 keeps each entry's whole ``SpendEvent`` under ``"event"``. Version 1 kept
only the mechanism there (σ, q, steps, C) and the noise source beside it; it is read by
migrating each entry: δ is the file's own (it cannot change once spending started), the
unit and the release are the only ones version 1 knew ("record", "update"), and N and the
expected batch read as 0 (not recorded). The next save writes version 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from shared import atomic
from shared.privacy import accounting
from shared.privacy.events import NOISE_SOURCE, RELEASE_UPDATE, UNIT_RECORD, MechanismEvent, SpendEvent

log = logging.getLogger(__name__)

STATE_VERSION = 2


class BudgetExceededError(RuntimeError):
    """Training would push ε past the merchant's budget; nothing was spent."""

    def __init__(self, *, merchant_id: str, epsilon_now: float, epsilon_after: float, budget: float) -> None:
        self.merchant_id = merchant_id
        self.epsilon_now = epsilon_now
        self.epsilon_after = epsilon_after
        self.budget = budget
        super().__init__(
            f"merchant {merchant_id!r}: this call would raise ε from {epsilon_now:.4f} to "
            f"{epsilon_after:.4f}, over the budget {budget:.4f} by {epsilon_after - budget:.4f}; "
            "refusing to train (nothing spent)"
        )


class PrivacyStateError(ValueError):
    """The persisted state file is unreadable or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpendEntry:
    """One released call: its spend, and where in the federation it happened."""

    event: SpendEvent
    round: int
    model_version: int
    recorded_at: float
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event.to_dict(), "round": self.round, "run_id": self.run_id,
                "model_version": self.model_version, "recorded_at": self.recorded_at}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, version: int, delta: float) -> SpendEntry:
        """An entry of a version-``version`` file whose δ is ``delta``; validated."""
        if version == 1:
            event = SpendEvent(mechanism=MechanismEvent.from_dict(raw["event"]), delta=delta, unit=UNIT_RECORD,
                               unit_count=0, expected_batch=0.0, release=RELEASE_UPDATE,
                               noise=str(raw.get("noise", "")))
        else:
            event = SpendEvent.from_dict(raw["event"])
            if not math.isclose(event.delta, delta):
                raise ValueError(f"an entry's δ {event.delta} is not the state's δ {delta}")
        event.validate()
        event.mechanism.validate()  # every entry is a private call: its mechanism is accountable
        return cls(event=event, round=int(raw["round"]), model_version=int(raw["model_version"]),
                   recorded_at=float(raw["recorded_at"]), run_id=str(raw.get("run_id", "")))


@dataclasses.dataclass(kw_only=True)
class PrivacyState:
    """Budget + history of one merchant. Load with ``PrivacyState.open``; never build per round."""

    path: Path
    merchant_id: str
    target_epsilon: float
    target_delta: float
    accountant: str = "prv"
    entries: list[SpendEntry] = dataclasses.field(default_factory=list)
    # ε per exact event history: ``check`` accounts history + planned call, and ``commit``
    # asks for the very same history right after, so the accountant runs once per call.
    _epsilon_cache: dict[tuple[Any, ...], float] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(
        cls, path: Path, *, merchant_id: str, target_epsilon: float, target_delta: float, accountant: str = "prv"
    ) -> PrivacyState:
        """Load the merchant's state, or start one. A stored budget is never loosened.

        The effective budget is the smaller of the stored one and the one asked for now; δ
        must not change once spending has started (ε at different δ is not comparable).
        """
        path = Path(path)
        if not path.exists():
            return cls(path=path, merchant_id=merchant_id, target_epsilon=target_epsilon,
                       target_delta=target_delta, accountant=accountant)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            stored_eps, stored_delta = float(raw["target_epsilon"]), float(raw["target_delta"])
            version = int(raw.get("version", 1))
            if version > STATE_VERSION:
                raise ValueError(f"state version {version} is newer than this fedshop understands ({STATE_VERSION})")
            entries = [SpendEntry.from_dict(e, version=version, delta=stored_delta) for e in raw["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyStateError(f"{path}: unreadable privacy state ({exc}); refusing to train") from exc
        if raw.get("merchant_id") != merchant_id:
            raise PrivacyStateError(
                f"{path}: state belongs to merchant {raw.get('merchant_id')!r}, not {merchant_id!r}"
            )
        if entries and not math.isclose(stored_delta, target_delta):
            raise PrivacyStateError(
                f"{path}: δ was {stored_delta} when spending started; run asks for {target_delta}"
            )
        if target_epsilon > stored_eps:
            log.warning("merchant %s: run asks for ε budget %.3f; the merchant's own budget %.3f applies",
                        merchant_id, target_epsilon, stored_eps)
        return cls(path=path, merchant_id=merchant_id, target_epsilon=min(stored_eps, target_epsilon),
                   target_delta=stored_delta if entries else target_delta,
                   accountant=str(raw.get("accountant", accountant)), entries=entries)

    @property
    def events(self) -> list[MechanismEvent]:
        """The mechanisms of every released call, in order: what the accountants compose."""
        return [e.event.mechanism for e in self.entries]

    def epsilon(self, extra: MechanismEvent | None = None) -> float:
        events = tuple(self.events + ([extra] if extra is not None else []))
        key = (events, self.target_delta, self.accountant)
        if key not in self._epsilon_cache:
            self._epsilon_cache[key] = accounting.epsilon(events, self.target_delta, self.accountant)
        return self._epsilon_cache[key]

    def calls_in_run(self, run_id: str) -> int:
        return sum(1 for e in self.entries if e.run_id == run_id)

    def planned_noise(self, *, sample_rate: float, steps: int, max_grad_norm: float, calls: int, floor: float) -> float:
        """σ (at least ``floor``) at which ``calls`` more calls like this one fit the budget."""
        # The last call's σ is the likely answer within a run (its plan, followed, leaves the
        # same σ for the calls after): a hint makes the search a couple of ε evaluations.
        events = self.events
        return accounting.noise_for_budget(self.target_epsilon, self.target_delta, sample_rate=sample_rate, steps=steps,
                                   calls=calls, max_grad_norm=max_grad_norm, accountant=self.accountant,
                                   history=events, floor=floor,
                                   hint=events[-1].noise_multiplier if events else None)

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.events)

    def check(self, planned: MechanismEvent) -> float:
        """ε after ``planned``; raises ``BudgetExceededError`` (spending nothing) if over budget."""
        planned.validate()
        after = self.epsilon(planned)
        if after > self.target_epsilon:
            raise BudgetExceededError(merchant_id=self.merchant_id, epsilon_now=self.epsilon(),
                                      epsilon_after=after, budget=self.target_epsilon)
        return after

    def commit(self, mechanism: MechanismEvent, *, unit_count: int, round: int, model_version: int,
               run_id: str = "") -> float:
        """Durably record a released call on ``unit_count`` units, then return the new cumulative ε."""
        mechanism.validate()
        event = SpendEvent.of(mechanism, unit_count=unit_count, delta=self.target_delta, noise=NOISE_SOURCE)
        event.validate()
        self.entries.append(SpendEntry(event=event, round=round, model_version=model_version,
                                       recorded_at=time.time(), run_id=run_id))
        try:
            self.save()
        except BaseException:
            self.entries.pop()
            raise
        return self.epsilon()

    def save(self) -> None:
        atomic.write_json(self.path, {
            "version": STATE_VERSION,
            "merchant_id": self.merchant_id,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "accountant": self.accountant,
            "entries": [e.to_dict() for e in self.entries],
        })
