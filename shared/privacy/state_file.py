"""A merchant's privacy-state file: its records (spent entries, reservations), its format
versions, and the exclusive lock that serialises calls on it (``shared.privacy.budget`` holds the
budget logic; the format history is told there)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.privacy.events import NEIGHBOURS_ADD_REMOVE, RELEASE_UPDATE, UNIT_RECORD, MechanismEvent, SpendEvent

log = logging.getLogger(__name__)

STATE_VERSION = 4
LOCK_SUFFIX = ".lock"


class PrivacyStateError(ValueError):
    """The persisted state file is missing, unreadable or inconsistent; the message names the file."""


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
                               noise=str(raw.get("noise", "")), neighbours=NEIGHBOURS_ADD_REMOVE)
        else:
            event = SpendEvent.from_dict(raw["event"])
            if not math.isclose(event.delta, delta):
                raise ValueError(f"an entry's δ {event.delta} is not the state's δ {delta}")
        event.validate()
        event.mechanism.validate()  # every entry is a private call: its mechanism is accountable
        return cls(event=event, round=int(raw["round"]), model_version=int(raw["model_version"]),
                   recorded_at=float(raw["recorded_at"]), run_id=str(raw.get("run_id", "")))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reservation:
    """A call's planned spend, written before it trains; ``commit`` replaces it by the entry.

    ``pid`` and ``host`` only say who reserved it (for the log line about a call that died)."""

    mechanism: MechanismEvent
    reserved_at: float
    pid: int
    host: str

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism.to_dict(), "reserved_at": self.reserved_at, "pid": self.pid,
                "host": self.host}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Reservation:
        return cls(mechanism=MechanismEvent.from_dict(raw["mechanism"]), reserved_at=float(raw["reserved_at"]),
                   pid=int(raw["pid"]), host=str(raw["host"]))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.reserved_at))
        return (f"{self.mechanism.steps} step(s) at σ = {self.mechanism.noise_multiplier:g}, "
                f"q = {self.mechanism.sample_rate:g}, reserved {when} by pid {self.pid} on {self.host}")


@dataclasses.dataclass(frozen=True)
class StoredState:
    """A state file as read, validated in itself (not yet against what a caller asks)."""

    merchant_id: Any
    target_epsilon: float
    target_delta: float
    accountant: str | None
    entries: list[SpendEntry]
    reservations: list[Reservation]


def read_state(path: Path) -> StoredState:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        stored_eps, stored_delta = float(raw["target_epsilon"]), float(raw["target_delta"])
        version = int(raw.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(f"state version {version} is newer than this fedshop understands ({STATE_VERSION})")
        entries = [SpendEntry.from_dict(e, version=version, delta=stored_delta) for e in raw["entries"]]
        reservations = [Reservation.from_dict(r) for r in raw.get("reservations", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrivacyStateError(f"{path}: unreadable privacy state ({exc}); refusing to train") from exc
    accountant = raw.get("accountant")
    return StoredState(merchant_id=raw.get("merchant_id"), target_epsilon=stored_eps, target_delta=stored_delta,
                   accountant=str(accountant) if accountant is not None else None, entries=entries,
                   reservations=reservations)


def lock_path(path: Path) -> Path:
    """The lock file of the state at ``path``: ``<name>.lock`` beside it (present while held)."""
    return path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def exclusive(path: Path, *, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock of the state at ``path``; waits for another holder (``timeout_s``: at most)."""
    import fcntl  # POSIX only; imported here so that readers elsewhere can still import this module

    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log.info("%s: another call holds this privacy state; waiting for it to finish", path)
                    said = True
                if deadline is None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    while True:
                        if time.monotonic() > deadline:
                            raise PrivacyStateError(
                                f"{path}: still locked by another call after {timeout_s:g} s") from None
                        time.sleep(0.05)
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            continue
            # The holder before us removes the file as it releases it: if the name no longer
            # points at the file we locked, someone may hold a newer one; lock that instead.
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                continue
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                continue
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # while still held: waiters on it then retry
            return
        finally:
            os.close(fd)  # releases the lock
