"""A merchant's own privacy budget and accountant state, persisted on the merchant's side.

The state file (JSON) holds every mechanism event this merchant ever released, plus its
budget. It is written atomically (temp file, fsync, rename) *before* an update leaves the
trainer, so a crash can lose an update but never the record of its spend. ε is always
recomputed from the full event history, so it composes across calls and restarts; a
fresh accountant per round (which would report one round's ε as the total) cannot happen.

The budget here is the merchant's: a server's run config may ask for a larger ε, but
``check`` compares against the budget stored on this machine and the smaller one wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.privacy import accounting
from shared.privacy.events import NOISE_SOURCE, MechanismEvent

log = logging.getLogger(__name__)

STATE_VERSION = 1


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
    """One released training call: the mechanism plus where it happened."""

    event: MechanismEvent
    round: int
    model_version: int
    recorded_at: float
    run_id: str = ""
    noise: str = ""  # the noise source of the call (shared.privacy.NOISE_SOURCE); "" = recorded before it was kept

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event.to_dict(), "round": self.round, "run_id": self.run_id,
                "model_version": self.model_version, "recorded_at": self.recorded_at, "noise": self.noise}


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
            entries = [
                SpendEntry(event=MechanismEvent.from_dict(e["event"]), round=int(e["round"]),
                           model_version=int(e["model_version"]), recorded_at=float(e["recorded_at"]),
                           run_id=str(e.get("run_id", "")), noise=str(e.get("noise", "")))
                for e in raw["entries"]
            ]
            stored_eps, stored_delta = float(raw["target_epsilon"]), float(raw["target_delta"])
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
        return [e.event for e in self.entries]

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

    def commit(self, event: MechanismEvent, *, round: int, model_version: int, run_id: str = "") -> float:
        """Durably record a released call, then return the new cumulative ε."""
        event.validate()
        self.entries.append(SpendEntry(event=event, round=round, model_version=model_version,
                                       recorded_at=time.time(), run_id=run_id, noise=NOISE_SOURCE))
        try:
            self.save()
        except BaseException:
            self.entries.pop()
            raise
        return self.epsilon()

    def save(self) -> None:
        payload = {
            "version": STATE_VERSION,
            "merchant_id": self.merchant_id,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "accountant": self.accountant,
            "entries": [e.to_dict() for e in self.entries],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
