"""The privacy ledger of one federated run: every unit of privacy spent, recorded durably.

One SQLite file holds one row per merchant per round. It records *what happened* — the
mechanism each merchant ran (``noise_multiplier``, ``sample_rate``, ``steps``,
``max_grad_norm``, ``delta``) — next to *what the merchant's own accountant reported*
(``epsilon_reported``), so an independent accountant can re-derive ε from the mechanism
alone and compare.

Durability and integrity are the database's job, not just this API's:

- WAL journal with ``synchronous=FULL``: a round that :meth:`PrivacyLedger.record_round`
  returned from survives a power cut (WAL with NORMAL could lose the last commits).
- All rows of one round are written in one transaction: a crash mid-round leaves none.
- The primary key ``(run_id, round, merchant_id)`` makes a replay of a round after a crash
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

import dataclasses
import datetime
import logging
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Marks the file as a fedshop ledger, so opening some other SQLite file fails loudly
# instead of adding tables to it. ("FSL1" as a big-endian 32-bit int.)
APPLICATION_ID = 0x46534C31

STATUSES: frozenset[str] = frozenset({"accepted", "rejected", "refused"})

_SCHEMA = """
CREATE TABLE spend (
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL CHECK (round >= 1),
    merchant_id      TEXT    NOT NULL CHECK (merchant_id <> ''),
    -- Flower node ids are uint64, beyond SQLite's signed 64-bit INTEGER: kept as decimal text
    node_id          TEXT    NOT NULL,
    model_version    INTEGER NOT NULL CHECK (model_version >= 0),
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate      REAL    NOT NULL CHECK (sample_rate >= 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 0),
    max_grad_norm    REAL    NOT NULL CHECK (max_grad_norm >= 0),
    delta            REAL    NOT NULL CHECK (delta >= 0 AND delta < 1),
    epsilon_reported REAL    NOT NULL CHECK (epsilon_reported >= 0),
    epsilon_budget   REAL    NOT NULL CHECK (epsilon_budget >= 0),
    accountant       TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('accepted', 'rejected', 'refused')),
    reason           TEXT    NOT NULL,
    dp               INTEGER NOT NULL CHECK (dp IN (0, 1)),
    -- the noise source the merchant reported (shared.privacy.NOISE_SOURCE); '' = none said
    noise            TEXT    NOT NULL DEFAULT '',
    -- audit only: when this row was first written; not part of the replay comparison
    recorded_at      TEXT    NOT NULL,
    PRIMARY KEY (run_id, round, merchant_id),
    CHECK (status <> 'refused' OR steps = 0)
) STRICT;

CREATE INDEX spend_by_merchant ON spend (merchant_id, round);

CREATE TRIGGER spend_no_update BEFORE UPDATE ON spend
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE of spend is forbidden'); END;

CREATE TRIGGER spend_no_delete BEFORE DELETE ON spend
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE from spend is forbidden'); END;

-- INSERT OR REPLACE deletes the old row without firing DELETE triggers (unless
-- recursive_triggers is on), so refuse any insert that collides with an existing row.
CREATE TRIGGER spend_no_replace BEFORE INSERT ON spend
WHEN EXISTS (SELECT 1 FROM spend
             WHERE run_id = NEW.run_id AND round = NEW.round AND merchant_id = NEW.merchant_id)
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: row already recorded'); END;

CREATE TABLE meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'ledger meta is insert-once: UPDATE is forbidden'); END;

CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'ledger meta is insert-once: DELETE is forbidden'); END;

CREATE TRIGGER meta_no_replace BEFORE INSERT ON meta
WHEN EXISTS (SELECT 1 FROM meta WHERE key = NEW.key)
BEGIN SELECT RAISE(ABORT, 'ledger meta is insert-once: key already set'); END;
"""

# Column order shared by INSERT and SELECT; recorded_at is deliberately absent.
_COLUMNS: tuple[str, ...] = (
    "run_id",
    "round",
    "merchant_id",
    "node_id",
    "model_version",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "epsilon_reported",
    "epsilon_budget",
    "accountant",
    "status",
    "reason",
    "dp",
    "noise",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM spend"


class LedgerError(RuntimeError):
    """The ledger file cannot be used (wrong file, newer schema, no WAL)."""


class LedgerConflictError(LedgerError):
    """A write would change or duplicate spend that is already recorded."""


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
    noise_multiplier: float
    sample_rate: float
    steps: int  # local DP-SGD steps in this call
    max_grad_norm: float
    delta: float
    epsilon_reported: float
    epsilon_budget: float
    accountant: str
    status: str  # one of STATUSES; "refused": the merchant declined for budget and took no steps
    reason: str = ""
    dp: bool = True
    noise: str = ""  # the merchant's noise source (shared.privacy.NOISE_SOURCE); "" = none reported

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
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.status == "refused" and self.steps != 0:
            raise ValueError(f"a refused call takes no steps, got steps={self.steps}")
        for name in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if self.sample_rate > 1:
            raise ValueError(f"sample_rate must be <= 1, got {self.sample_rate}")
        if self.delta >= 1:
            raise ValueError(f"delta must be < 1, got {self.delta}")
        # ε may be +inf (no DP, or a budget of "unlimited"), never NaN or negative.
        for name in ("epsilon_reported", "epsilon_budget"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 (inf allowed), got {value!r}")

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.run_id, self.round, self.merchant_id)


_INT_COLUMNS = frozenset({"round", "model_version", "steps"})
_REAL_COLUMNS = frozenset(
    {"noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon_reported", "epsilon_budget"}
)


def _to_row(record: SpendRecord) -> tuple[Any, ...]:
    # Coerce to plain Python types: sqlite3 cannot bind numpy integers, which trainers and
    # accountants readily hand over.
    values = dataclasses.asdict(record)
    for column in _INT_COLUMNS:
        values[column] = int(values[column])
    for column in _REAL_COLUMNS:
        values[column] = float(values[column])
    values["dp"] = int(bool(record.dp))
    values["node_id"] = str(int(record.node_id))
    return tuple(values[c] for c in _COLUMNS)


def _from_row(row: Sequence[Any]) -> SpendRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["dp"] = bool(values["dp"])
    values["node_id"] = int(values["node_id"])
    return SpendRecord(**values)


def _differences(old: SpendRecord, new: SpendRecord) -> list[str]:
    return [
        f"{f.name}: recorded {getattr(old, f.name)!r}, now {getattr(new, f.name)!r}"
        for f in dataclasses.fields(SpendRecord)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


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
            self._open()
        except BaseException:
            self._conn.close()
            raise

    # ---------------------------------------------------------------- lifecycle
    def _open(self) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{self.path}: cannot enable WAL journal (got {mode!r})")
        # FULL: each commit is fsynced before record_round returns.
        conn.execute("PRAGMA synchronous=FULL")

        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if app_id not in (0, APPLICATION_ID) or (has_tables and app_id != APPLICATION_ID):
            raise LedgerError(f"{self.path} is not a fedshop privacy ledger")
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path} has ledger schema version {version}, newer than this fedshop "
                f"understands ({SCHEMA_VERSION}); upgrade fedshop to read it"
            )
        if has_tables and version == 1:
            self._migrate_from_1()
        elif has_tables and version != SCHEMA_VERSION:
            raise LedgerError(f"{self.path} has ledger schema version {version}; no migration known")
        if not has_tables:
            self._create_schema()

    def _migrate_from_1(self) -> None:
        # Version 2 adds the noise source. Rows written before it keep '' (nothing was
        # reported), which the audit flags: spend is never rewritten, only described.
        with self._transaction() as conn:
            conn.execute("ALTER TABLE spend ADD COLUMN noise TEXT NOT NULL DEFAULT ''")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        logger.info("privacy ledger %s: schema 1 -> %d (rows keep an empty noise source)", self.path,
                    SCHEMA_VERSION)

    def _create_schema(self) -> None:
        created_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with self._transaction() as conn:
            for statement in _split_sql(_SCHEMA):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (created_at,))
            # PRAGMAs run inside the transaction, so a crash here leaves an empty file,
            # which the next open simply initialises again.
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        logger.info("created privacy ledger %s (schema %d)", self.path, SCHEMA_VERSION)

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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the read-compare-insert of a round
        # cannot interleave with another writer.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ---------------------------------------------------------------- writing
    def record_round(self, records: Sequence[SpendRecord]) -> int:
        """Append all rows of one round in one transaction; return how many were new.

        Replaying a round exactly as recorded writes nothing. Anything else that touches an
        already-recorded round — a changed value, or a merchant the round did not have —
        raises :class:`LedgerConflictError` and writes nothing. A round not yet recorded
        must come after the last recorded one.
        """
        if not records:
            return 0
        rounds = {r.round for r in records}
        run_ids = {r.run_id for r in records}
        if len(rounds) != 1 or len(run_ids) != 1:
            raise ValueError(
                f"record_round takes the rows of one round of one run; got rounds {sorted(rounds)}, "
                f"run_ids {sorted(run_ids)}"
            )
        (round_,) = rounds
        (run_id,) = run_ids

        # Duplicates inside the batch: identical ones collapse, differing ones conflict.
        batch: dict[str, SpendRecord] = {}
        for record in records:
            seen = batch.get(record.merchant_id)
            if seen is not None and seen != record:
                raise LedgerConflictError(
                    f"merchant {record.merchant_id!r} appears twice in round {round_} with different "
                    f"values: {'; '.join(_differences(seen, record))}"
                )
            batch[record.merchant_id] = record

        with self._transaction() as conn:
            self._check_run_id(conn, run_id)
            existing = {
                rec.merchant_id: rec
                for rec in map(
                    _from_row,
                    conn.execute(f"{_SELECT} WHERE run_id = ? AND round = ?", (run_id, round_)),
                )
            }
            last = conn.execute("SELECT coalesce(max(round), 0) FROM spend").fetchone()[0]
            if not existing and round_ <= last:
                raise LedgerConflictError(
                    f"round {round_} comes after round {last} was recorded; rounds are appended in order"
                )
            recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
            written = 0
            for merchant_id, record in batch.items():
                old = existing.get(merchant_id)
                if old is not None:
                    if old != record:
                        raise LedgerConflictError(
                            f"merchant {merchant_id!r} round {round_} is already recorded with other "
                            f"values ({'; '.join(_differences(old, record))}); spend is never changed"
                        )
                    continue
                if existing:
                    raise LedgerConflictError(
                        f"round {round_} is already recorded without merchant {merchant_id!r}; a "
                        "recorded round is closed"
                    )
                self._warn_if_epsilon_fell(conn, record)
                conn.execute(
                    f"INSERT INTO spend ({', '.join(_COLUMNS)}, recorded_at) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))}, ?)",
                    (*_to_row(record), recorded_at),
                )
                written += 1
        if written:
            logger.info("ledger: round %d recorded for %d merchant(s)", round_, written)
        else:
            logger.info("ledger: round %d replayed, already recorded identically", round_)
        return written

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
            "SELECT epsilon_reported, round FROM spend WHERE merchant_id = ? ORDER BY round DESC LIMIT 1",
            (record.merchant_id,),
        ).fetchone()
        if row is not None and record.dp and record.epsilon_reported < row[0]:
            logger.warning(
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
        with self._transaction() as conn:
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
            cursor = self._conn.execute(f"{_SELECT} ORDER BY round, merchant_id")
        else:
            cursor = self._conn.execute(
                f"{_SELECT} WHERE merchant_id = ? ORDER BY round, merchant_id", (merchant_id,)
            )
        return [_from_row(row) for row in cursor]

    def merchants(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT DISTINCT merchant_id FROM spend ORDER BY 1")]

    def last_round(self) -> int:
        return int(self._conn.execute("SELECT coalesce(max(round), 0) FROM spend").fetchone()[0])

    def _latest(self) -> list[SpendRecord]:
        # Each merchant's most recent row; a ledger holds one run, so (merchant, round) is unique.
        cursor = self._conn.execute(
            f"{_SELECT} WHERE (merchant_id, round) IN "
            "(SELECT merchant_id, max(round) FROM spend GROUP BY merchant_id) ORDER BY merchant_id"
        )
        return [_from_row(row) for row in cursor]

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


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT the open transaction first; split instead so the schema
    # is created atomically. sqlite3.complete_statement keeps trigger bodies (which contain
    # ';') in one piece.
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not current.strip():
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in schema: {current!r}")
    return statements
