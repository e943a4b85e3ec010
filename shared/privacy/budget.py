"""A merchant's own privacy budget and accountant state, persisted on the merchant's side.

The state file (JSON) holds every spend this merchant ever released (``SpendEvent``), plus
its budget. It is written atomically and durably (``shared.atomic``) *before* an update
leaves the trainer, so a crash can lose an update but never the record of its spend. ε is
always recomputed from the full history of mechanisms, so it composes across calls and
restarts; a fresh accountant per round (which would report one round's ε as the total)
cannot happen.

The budget here is the merchant's: a server's run config may ask for a larger ε, but
``check`` compares against the budget stored on this machine and the smaller one wins.

One budget for the lifetime of the data: the file lives with the merchant's data (see
``client.merchant.resolve_node``), and it is never started from nothing by accident:

- ``PrivacyState.create`` writes a state with a budget and no spend, and never overwrites one.
  Explicit steps call it: ``fedshop deploy add-merchant`` (or ``python -m
  shared.privacy.budget create ...`` on the merchant's machine), the first ``fedshop
  simulate`` / ``train-local`` on a merchant folder. A deployed node that finds no state
  refuses to train (``PrivacyStateError`` naming the path): a lost file is not a new budget.
- ``PrivacyState.locked`` holds an exclusive lock (``fcntl.flock`` on the sibling
  ``<name>.lock``) from before ``check`` until after ``commit``, and reads the file under it,
  so a second call on the same state waits and then sees the first one's spend. Under the
  lock ``check`` also *reserves* the planned spend: it is written to the file before any
  training, and ``commit`` turns it into the released entry. A reservation still in the file
  when the state is next opened belongs to a call that died between the two (killed, power
  cut): it counts as spent, in every ε, from then on (never under-reported) and each opening
  says so in the log. A call that fails with an exception before ``commit`` released nothing
  (its update never left): ``locked`` withdraws its reservation.
- Without the lock (``PrivacyState.open``: readers, audits, tests, benchmarks that own their
  file) ``check`` only checks, and ``commit`` still re-reads the file under the lock and
  appends to what is there, so overlapping commits never drop each other's spend.

The lock file is removed when the lock is released (a waiter that then finds it gone or
replaced locks again), so no stray file stays beside the state. ``flock`` needs a local file
system (NFS may not honour it); the lock is not re-entrant: do not open a state ``locked``
twice in one thread, nor ``commit`` through a second object while holding it.

File versions: 3 adds ``reservations`` (a list of ``{"mechanism", "reserved_at", "pid",
"host"}``) beside ``entries``; a file without it (versions 1 and 2) has none. 2 keeps each
entry's whole ``SpendEvent`` under ``"event"``. Version 1 kept only the mechanism there (σ,
q, steps, C) and the noise source beside it; it is read by migrating each entry: δ is the
file's own (it cannot change once spending started), the unit and the release are the only
ones version 1 knew ("record", "update"), and N and the expected batch read as 0 (not
recorded). 4 adds each entry's ``neighbours`` (the relation its ε was accounted for,
``replace-one``); an entry without it was accounted for add/remove neighbours. ε is never read
from the file: every history, older entries included, is re-accounted for replace-one
neighbours (``shared.privacy.accounting``), so a state written by an older fedshop reports a
larger ε than it did, never a smaller one. The next save writes version 4, which an older
fedshop refuses to read rather than account it for the wrong neighbours.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shared import atomic
from shared.privacy import accounting
from shared.privacy.events import NOISE_SOURCE, RELEASE_UPDATE, UNIT_RECORD, MechanismEvent, SpendEvent
from shared.privacy.state_file import (
    STATE_VERSION,
    PrivacyStateError,
    Reservation,
    SpendEntry,
    exclusive,
    read_state,
)

log = logging.getLogger(__name__)



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



@dataclasses.dataclass(kw_only=True)
class PrivacyState:
    """Budget + history of one merchant. Train through ``PrivacyState.locked``; never build per round."""

    path: Path
    merchant_id: str
    target_epsilon: float
    target_delta: float
    entries: list[SpendEntry] = dataclasses.field(default_factory=list)
    # Spend reserved by calls that have not committed (in flight, or died before committing):
    # counted in every ε like the entries.
    reservations: list[Reservation] = dataclasses.field(default_factory=list)
    # ε per exact event history: ``check`` accounts history + planned call, and ``commit``
    # asks for the very same history right after, so the accountant runs once per call.
    _epsilon_cache: dict[tuple[Any, ...], float] = dataclasses.field(
        default_factory=dict, repr=False, compare=False)
    _locked: bool = dataclasses.field(default=False, repr=False, compare=False)
    _pending: Reservation | None = dataclasses.field(default=None, repr=False, compare=False)
    _created: bool = dataclasses.field(default=False, repr=False, compare=False)  # by ``locked(create=True)``

    @classmethod
    def open(
        cls, path: Path, *, merchant_id: str, target_epsilon: float, target_delta: float) -> PrivacyState:
        """Load the merchant's state (a missing file reads as no spend). A stored budget is never loosened.

        The effective budget is the smaller of the stored one and the one asked for now; δ
        must not change once spending has started (ε at different δ is not comparable).
        Not locked: for reading, and for callers that own their file (tests, benchmarks, the
        canary audit). A merchant's training call goes through ``locked``.
        """
        path = Path(path)
        if not path.exists():
            return cls(path=path, merchant_id=merchant_id, target_epsilon=target_epsilon,
                       target_delta=target_delta)
        stored = read_state(path)
        if stored.merchant_id != merchant_id:
            raise PrivacyStateError(
                f"{path}: state belongs to merchant {stored.merchant_id!r}, not {merchant_id!r}"
            )
        if stored.entries and not math.isclose(stored.target_delta, target_delta):
            raise PrivacyStateError(
                f"{path}: δ was {stored.target_delta} when spending started; run asks for {target_delta}"
            )
        if target_epsilon > stored.target_epsilon:
            log.warning("merchant %s: run asks for ε budget %.3f; the merchant's own budget %.3f applies",
                        merchant_id, target_epsilon, stored.target_epsilon)
        if stored.reservations:
            log.info("%s: %d reserved call(s) not committed (in flight, or a call that died before committing); "
                     "counted as spent", path, len(stored.reservations))
        return cls(path=path, merchant_id=merchant_id, target_epsilon=min(stored.target_epsilon, target_epsilon),
                   target_delta=stored.target_delta if stored.entries else target_delta, entries=stored.entries,
                   reservations=stored.reservations)

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: Path, *, merchant_id: str, target_epsilon: float, target_delta: float,
               create: bool = False, timeout_s: float | None = None
               ) -> Iterator[PrivacyState]:
        """The merchant's state, read and held under its exclusive lock for one training call.

        Inside the block ``check`` reserves the planned spend in the file and ``commit``
        turns it into the entry. A missing file is refused (``PrivacyStateError`` naming it)
        unless ``create`` (simulation, ``train-local``: a first run on this data), which
        writes a state with the budget asked for and no spend, and logs it. Reservations found
        in the file are of calls that died before committing: logged, and counted as spent.
        If the block raises before ``commit``, this call's reservation is withdrawn (nothing
        of the call left); a reservation still pending when the block ends normally stays.
        ``timeout_s``: how long to wait for another call's lock (None: as long as it takes).
        """
        path = Path(path)
        if not create and not path.is_file():
            raise PrivacyStateError(cls._missing(path, merchant_id))
        with exclusive(path, timeout_s=timeout_s):
            if not path.exists():
                if not create:
                    raise PrivacyStateError(cls._missing(path, merchant_id))
                state = cls(path=path, merchant_id=merchant_id, target_epsilon=target_epsilon,
                            target_delta=target_delta)
                state._write(state.entries, state.reservations)
                state._created = True
                log.info("merchant %s: no privacy state yet; created %s (budget ε = %g at δ = %g, no spend)",
                         merchant_id, path, target_epsilon, target_delta)
            else:
                state = cls.open(path, merchant_id=merchant_id, target_epsilon=target_epsilon,
                                 target_delta=target_delta)
                for reservation in state.reservations:
                    log.warning("%s: a call reserved spend and died before committing it (%s); the state cannot "
                                "tell how far it got, so it counts as spent", path, reservation.describe())
            state._locked = True
            try:
                yield state
            except BaseException:
                if state._pending is not None:
                    state._withdraw()
                raise
            finally:
                if state._pending is not None:
                    log.warning("%s: the call ended without committing its reserved spend; it stays counted", path)
                state._locked = False
                state._pending = None

    @classmethod
    def create(cls, path: Path, *, merchant_id: str, target_epsilon: float, target_delta: float) -> bool:
        """Write a state with this budget and no spend at ``path``, unless one is there: True if it wrote one.

        Never overwrites: an existing state is only checked (same merchant; its stored budget
        and δ stay). The explicit first step of a merchant's budget (``fedshop deploy
        add-merchant``, ``fedshop simulate``'s first run on a merchant folder).
        """
        with cls.locked(Path(path), merchant_id=merchant_id, target_epsilon=target_epsilon,
                        target_delta=target_delta, create=True) as state:
            return state._created

    @staticmethod
    def _missing(path: Path, merchant_id: str) -> str:
        return (f"{path}: no privacy state for merchant {merchant_id!r}; refusing to train, since a missing "
                "state would start its budget from zero. If this merchant never trained, create it "
                "(`fedshop deploy add-merchant`, or `python -m shared.privacy.budget create PATH --merchant-id ID "
                "--epsilon EPS --delta DELTA`); if it did, restore the file from a backup")

    @property
    def accountant(self) -> str:
        """The accountant every ε of this state comes from (``shared.privacy.accounting``)."""
        return accounting.ACCOUNTANT

    @property
    def events(self) -> list[MechanismEvent]:
        """The mechanisms of every released call, then of every reservation: what the accountants compose."""
        return [e.event.mechanism for e in self.entries] + [r.mechanism for r in self.reservations]

    def epsilon(self, extra: MechanismEvent | None = None) -> float:
        events = tuple(self.events + ([extra] if extra is not None else []))
        key = (events, self.target_delta)
        if key not in self._epsilon_cache:
            self._epsilon_cache[key] = accounting.epsilon(events, self.target_delta)
        return self._epsilon_cache[key]

    def calls_in_run(self, run_id: str) -> int:
        """Training calls this state committed in run ``run_id`` (its updates; an evaluation
        release is not a training call, so it does not use up a noise plan's calls)."""
        return sum(1 for e in self.entries if e.run_id == run_id and e.event.release == RELEASE_UPDATE)

    def planned_noise(self, *, sample_rate: float, steps: int, max_grad_norm: float, calls: int, floor: float,
                      reserve: Sequence[MechanismEvent] = ()) -> float:
        """σ (at least ``floor``) at which ``calls`` more calls like this one fit the budget, with
        the releases in ``reserve`` (evaluations still to come) counted as spent already."""
        # The last training call's σ is the likely answer within a run (its plan, followed,
        # leaves the same σ for the calls after): a hint makes the search a couple of ε evaluations.
        events = self.events
        updates = [e.event.mechanism for e in self.entries if e.event.release == RELEASE_UPDATE]
        return accounting.noise_for_budget(self.target_epsilon, self.target_delta, sample_rate=sample_rate, steps=steps,
                                   calls=calls, max_grad_norm=max_grad_norm, history=[*events, *reserve], floor=floor,
                                   hint=updates[-1].noise_multiplier if updates else None)

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.events)

    def check(self, planned: MechanismEvent) -> float:
        """ε after ``planned``; raises ``BudgetExceededError`` (spending nothing) if over budget.

        Under ``locked``, the planned spend is then reserved: written to the file before the
        call trains, so that it counts even if the call dies before ``commit``."""
        planned.validate()
        if self._pending is not None:
            raise RuntimeError(f"{self.path}: this call already reserved its spend; commit it before checking again")
        after = self.epsilon(planned)
        if after > self.target_epsilon:
            raise BudgetExceededError(merchant_id=self.merchant_id, epsilon_now=self.epsilon(),
                                      epsilon_after=after, budget=self.target_epsilon)
        if self._locked:
            reservation = Reservation(mechanism=planned, reserved_at=time.time(), pid=os.getpid(),
                                      host=socket.gethostname())
            reservations = [*self.reservations, reservation]
            self._write(self.entries, reservations)
            self.reservations, self._pending = reservations, reservation
        return after

    def commit(self, mechanism: MechanismEvent, *, unit_count: int, round: int, model_version: int,
               run_id: str = "", unit: str = UNIT_RECORD, release: str = RELEASE_UPDATE) -> float:
        """Durably record a released call on ``unit_count`` units (of kind ``unit``), then return
        the new cumulative ε. ``release``: what left (an update; an evaluation's noised metrics).

        Under ``locked`` this replaces the call's reservation. Without it, the file is re-read
        under the lock first and the entry appended to what is there (another call's spend
        committed meanwhile is kept, and counted in the ε returned)."""
        mechanism.validate()
        event = SpendEvent.of(mechanism, unit_count=unit_count, delta=self.target_delta, noise=NOISE_SOURCE,
                              unit=unit, release=release)
        event.validate()
        entry = SpendEntry(event=event, round=round, model_version=model_version, recorded_at=time.time(),
                           run_id=run_id)
        with self._hold():
            if not self._locked:
                self._reload()
            entries = [*self.entries, entry]
            reservations = [r for r in self.reservations if r is not self._pending]
            self._write(entries, reservations)
            self.entries, self.reservations, self._pending = entries, reservations, None
        return self.epsilon()

    def save(self) -> None:
        """Write the state as it is in memory (under the lock unless this object holds it)."""
        with self._hold():
            self._write(self.entries, self.reservations)

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        if self._locked:
            yield
        else:
            with exclusive(self.path):
                yield

    def _reload(self) -> None:
        """Take the file's entries and reservations (the caller holds the lock); budget and δ as ``open``."""
        if not self.path.exists():
            return
        stored = read_state(self.path)
        if stored.merchant_id != self.merchant_id:
            raise PrivacyStateError(
                f"{self.path}: state belongs to merchant {stored.merchant_id!r}, not {self.merchant_id!r}")
        if stored.entries and not math.isclose(stored.target_delta, self.target_delta):
            raise PrivacyStateError(
                f"{self.path}: δ was {stored.target_delta} when spending started; this call accounts at "
                f"{self.target_delta}")
        self.target_epsilon = min(self.target_epsilon, stored.target_epsilon)
        self.entries, self.reservations = stored.entries, stored.reservations

    def _withdraw(self) -> None:
        """Drop this call's reservation: it failed before its update could leave (the lock is held)."""
        pending = self._pending
        assert pending is not None
        reservations = [r for r in self.reservations if r is not pending]
        try:
            self._write(self.entries, reservations)
        except OSError as exc:  # then the reservation stays: over-reported, never under
            log.warning("%s: could not withdraw the reservation of a failed call (%s); it stays counted",
                        self.path, exc)
            return
        self.reservations, self._pending = reservations, None
        log.info("%s: the call failed before releasing anything; its reserved spend is withdrawn", self.path)

    def _write(self, entries: Sequence[SpendEntry], reservations: Sequence[Reservation]) -> None:
        atomic.write_json(self.path, {
            "version": STATE_VERSION,
            "merchant_id": self.merchant_id,
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "accountant": accounting.ACCOUNTANT,  # informative: ε is always re-accounted, never read
            "entries": [e.to_dict() for e in entries],
            "reservations": [r.to_dict() for r in reservations],
        })


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.privacy.budget create PATH --merchant-id ID --epsilon EPS --delta D``: a
    merchant's first state, on its own machine, when ``fedshop deploy add-merchant`` could not
    write it there (a ``--state-dir`` on another machine)."""
    parser = argparse.ArgumentParser(prog="python -m shared.privacy.budget")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="write a merchant's privacy state (budget, no spend) unless one exists")
    create.add_argument("path", type=Path, help="the node's STATE_DIR/privacy-state.json")
    create.add_argument("--merchant-id", required=True)
    create.add_argument("--epsilon", type=float, required=True, help="the merchant's ε budget")
    create.add_argument("--delta", type=float, required=True, help="the δ it accounts at")
    args = parser.parse_args(argv)
    if not (0 < args.epsilon < math.inf and 0 < args.delta < 1):
        parser.error("--epsilon must be a finite number > 0 and --delta lie strictly between 0 and 1")
    try:
        created = PrivacyState.create(args.path, merchant_id=args.merchant_id, target_epsilon=args.epsilon,
                                      target_delta=args.delta)
    except PrivacyStateError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{args.path}: {'created' if created else 'already there; left as it is'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
