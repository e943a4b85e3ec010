"""The privacy ledger of one federated run: every unit of privacy spent, recorded durably.

One SQLite file holds one row per merchant per round per release (``server.ledger_record.SpendRecord``:
the update's row, and the evaluation's when the merchant released noised metrics).
It records *what happened* — the spend each merchant released, as the merchant committed it
(``shared.privacy.events.SpendEvent``: the mechanism ``noise_multiplier``, ``sample_rate``,
``steps``, ``max_grad_norm`` at ``delta``, over ``unit_count`` units of kind ``unit``) — next
to *what the merchant's own accountant reported* (``epsilon_reported``), so an independent
accountant can re-derive ε from the mechanism alone and compare. The file's schema, its
versions and their migrations are ``server.ledger_schema``'s.

Durability and integrity are the database's job, not just this API's:

- WAL journal with ``synchronous=FULL``: a round that :meth:`PrivacyLedger.record_round`
  returned from survives a power cut (WAL with NORMAL could lose the last commits).
- All rows of one round are written in one transaction: a crash mid-round leaves none.
- The primary key ``(run_id, round, merchant_id, release)`` makes a replay of a round after a crash
  idempotent; a replay with *different* values raises :class:`LedgerConflictError`,
  because spend must never be recorded twice nor silently changed.
- Triggers refuse UPDATE and DELETE (and INSERT OR REPLACE, which would otherwise delete
  without firing the DELETE trigger), so even a raw ``sqlite3`` session cannot rewrite
  history. Dropping the triggers or the file is still possible: this protects against
  bugs, not against an adversary with write access to the file.

Rows with status ``"rejected"`` are spend too: the merchant trained (and its accountant
counted it) even though the server discarded the update.
"""

from __future__ import annotations

import datetime
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from server.ledger_record import COLUMNS, STATUSES, SpendRecord, differences, from_row, to_row
from server.ledger_schema import APPLICATION_ID, SCHEMA_VERSION, LedgerError, open_file, transaction
from shared.privacy.merchant_level import MerchantLevelRound

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "STATUSES", "LedgerConflictError", "LedgerError", "PrivacyLedger",
           "SpendRecord"]

log = logging.getLogger(__name__)

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM spend"
_MERCHANT_LEVEL_COLUMNS = ("run_id", "round", "contributors", "noise_multiplier", "clip_norm", "delta", "neighbours",
                           "epsilon")
_SELECT_MERCHANT_LEVEL = f"SELECT {', '.join(_MERCHANT_LEVEL_COLUMNS)} FROM merchant_level"


class LedgerConflictError(LedgerError):
    """A write would change or duplicate spend that is already recorded."""


class PrivacyLedger:
    """Append-only record of the privacy spend of one run (see the module docstring).

    A ledger holds one ``run_id``: a resumed run must keep its id, or a replayed round
    would look like new spend instead of a replay.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: this class issues BEGIN/COMMIT itself, so a round is exactly
        # one transaction (the sqlite3 module's implicit transactions would not guarantee it).
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            open_file(self._conn, self.path)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- writing
    def record_round(self, records: Sequence[SpendRecord]) -> int:
        """Append all rows of one round and one release in one transaction; return how many were new.

        Replaying a round exactly as recorded writes nothing. Anything else that touches an
        already-recorded round of that release — a changed value, or a merchant the round did
        not have — raises :class:`LedgerConflictError` and writes nothing. A round not yet
        recorded must come after the last recorded one of that release (a round's evaluation
        rows follow its update rows).
        """
        if not records:
            return 0
        rounds = {r.round for r in records}
        run_ids = {r.run_id for r in records}
        releases = {r.event.release for r in records}
        if len(rounds) != 1 or len(run_ids) != 1 or len(releases) != 1:
            raise ValueError(
                f"record_round takes the rows of one round of one run and one release; got rounds "
                f"{sorted(rounds)}, run_ids {sorted(run_ids)}, releases {sorted(releases)}"
            )
        (round_,) = rounds
        (run_id,) = run_ids
        (release,) = releases

        # Duplicates inside the batch: identical ones collapse, differing ones conflict.
        batch: dict[str, SpendRecord] = {}
        for record in records:
            seen = batch.get(record.merchant_id)
            if seen is not None and seen != record:
                raise LedgerConflictError(
                    f"merchant {record.merchant_id!r} appears twice in round {round_} with different "
                    f"values: {'; '.join(differences(seen, record))}"
                )
            batch[record.merchant_id] = record

        with transaction(self._conn) as conn:
            self._check_run_id(conn, run_id)
            existing = {
                rec.merchant_id: rec
                for rec in map(
                    from_row,
                    conn.execute(f"{_SELECT} WHERE run_id = ? AND round = ? AND release = ?",
                                 (run_id, round_, release)),
                )
            }
            last = conn.execute("SELECT coalesce(max(round), 0) FROM spend WHERE release = ?", (release,)).fetchone()[0]
            if not existing and round_ <= last:
                raise LedgerConflictError(
                    f"round {round_} ({release}) comes after round {last} was recorded; rounds are appended in order"
                )
            recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            written = 0
            for merchant_id, record in batch.items():
                old = existing.get(merchant_id)
                if old is not None:
                    if old != record:
                        raise LedgerConflictError(
                            f"merchant {merchant_id!r} round {round_} ({release}) is already recorded with other "
                            f"values ({'; '.join(differences(old, record))}); spend is never changed"
                        )
                    continue
                if existing:
                    raise LedgerConflictError(
                        f"round {round_} ({release}) is already recorded without merchant {merchant_id!r}; a "
                        "recorded round is closed"
                    )
                self._warn_if_epsilon_fell(conn, record)
                conn.execute(
                    f"INSERT INTO spend ({', '.join(COLUMNS)}, recorded_at) "
                    f"VALUES ({', '.join('?' * len(COLUMNS))}, ?)",
                    (*to_row(record), recorded_at),
                )
                written += 1
        if written:
            log.info("ledger: round %d (%s) recorded for %d merchant(s)", round_, release, written)
        else:
            log.info("ledger: round %d (%s) replayed, already recorded identically", round_, release)
        return written

    def record_merchant_level(self, row: MerchantLevelRound) -> bool:
        """Append one unmasked secure round's merchant-level row (``shared.privacy.merchant_level``);
        return whether it was new. A replay of the same row writes nothing; a different row for
        a recorded round, or a round before the last recorded, raises :class:`LedgerConflictError`."""
        values = tuple(getattr(row, name) for name in _MERCHANT_LEVEL_COLUMNS)
        with transaction(self._conn) as conn:
            self._check_run_id(conn, row.run_id)
            old = conn.execute(f"{_SELECT_MERCHANT_LEVEL} WHERE run_id = ? AND round = ?",
                               (row.run_id, row.round)).fetchone()
            if old is not None:
                if tuple(old) != values:
                    raise LedgerConflictError(f"merchant-level round {row.round} is already recorded with other values "
                                              f"({tuple(old)} against {values}); spend is never changed")
                return False
            last = conn.execute("SELECT coalesce(max(round), 0) FROM merchant_level").fetchone()[0]
            if row.round <= last:
                raise LedgerConflictError(f"merchant-level round {row.round} comes after round {last} was recorded")
            recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            conn.execute(f"INSERT INTO merchant_level ({', '.join(_MERCHANT_LEVEL_COLUMNS)}, recorded_at) "
                         f"VALUES ({', '.join('?' * len(_MERCHANT_LEVEL_COLUMNS))}, ?)", (*values, recorded_at))
        log.info("ledger: round %d merchant-level ε %.4g recorded", row.round, row.epsilon)
        return True

    def merchant_level_rows(self) -> list[MerchantLevelRound]:
        """The unmasked secure rounds under merchant-level DP, in round order."""
        cursor = self._conn.execute(f"{_SELECT_MERCHANT_LEVEL} ORDER BY round")
        return [MerchantLevelRound(**dict(zip(_MERCHANT_LEVEL_COLUMNS, values, strict=True))) for values in cursor]

    def _check_run_id(self, conn: sqlite3.Connection, run_id: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
        expected = row[0] if row else None
        if expected is None:
            row = conn.execute("SELECT run_id FROM spend LIMIT 1").fetchone()
            expected = row[0] if row else None
        if expected is not None and expected != run_id:
            raise LedgerConflictError(
                f"this ledger belongs to run {expected!r}, not {run_id!r}; a resumed run must keep its id"
            )

    @staticmethod
    def _warn_if_epsilon_fell(conn: sqlite3.Connection, record: SpendRecord) -> None:
        # Cumulative ε never decreases; when it does, the merchant most likely built a
        # fresh accountant (reporting one round's ε as the total). Recorded as reported —
        # the ledger stores what happened — but said out loud.
        row = conn.execute(
            "SELECT epsilon_reported, round FROM spend WHERE merchant_id = ? ORDER BY rowid DESC LIMIT 1",
            (record.merchant_id,),
        ).fetchone()
        if row is not None and record.dp and record.epsilon_reported < row[0]:
            log.warning(
                "merchant %s reports cumulative epsilon %.4g in round %d, below %.4g in round %d: "
                "is its accountant being reset?",
                record.merchant_id,
                record.epsilon_reported,
                record.round,
                row[0],
                row[1],
            )

    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value once; setting it again to the same value is a no-op."""
        if not isinstance(value, str):
            raise TypeError(f"meta values are strings (serialise first), got {type(value).__name__}")
        with transaction(self._conn) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                if key == "run_id":  # must agree with rows recorded before it was set
                    self._check_run_id(conn, value)
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif row[0] != value:
                raise LedgerConflictError(f"ledger meta {key!r} is already {row[0]!r}; cannot set {value!r}")

    # ---------------------------------------------------------------- reading
    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta ORDER BY key"))

    def rows(self, merchant_id: str | None = None) -> list[SpendRecord]:
        if merchant_id is None:
            cursor = self._conn.execute(f"{_SELECT} ORDER BY round, merchant_id, rowid")
        else:
            cursor = self._conn.execute(
                f"{_SELECT} WHERE merchant_id = ? ORDER BY round, merchant_id, rowid", (merchant_id,)
            )
        return [from_row(row) for row in cursor]

    def merchants(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT DISTINCT merchant_id FROM spend ORDER BY 1")]

    def last_round(self) -> int:
        return int(self._conn.execute("SELECT coalesce(max(round), 0) FROM spend").fetchone()[0])

    def _latest(self) -> list[SpendRecord]:
        # Each merchant's most recent row (rowid order is recording order: a round's evaluation
        # row follows its update row and carries the cumulative ε after both).
        cursor = self._conn.execute(
            f"{_SELECT} WHERE rowid IN (SELECT max(rowid) FROM spend GROUP BY merchant_id) ORDER BY merchant_id"
        )
        return [from_row(row) for row in cursor]

    def latest_epsilon(self) -> dict[str, float]:
        """Each merchant's cumulative ε: the ``epsilon_reported`` of its most recent row."""
        return {rec.merchant_id: rec.epsilon_reported for rec in self._latest()}

    def exhausted(self, *, margin: float = 0.0) -> set[str]:
        """Merchants the server should stop sampling.

        A merchant is exhausted when its latest call was refused, or when its DP spend has
        reached ``epsilon_budget - margin``. Rows without DP (``dp=False``) carry no budget
        to exhaust; only a refusal stops those.
        """
        return {
            rec.merchant_id
            for rec in self._latest()
            if rec.status == "refused" or (rec.dp and rec.epsilon_reported >= rec.epsilon_budget - margin)
        }
