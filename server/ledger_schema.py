"""The privacy ledger's SQLite file: its schema, its versions and how an older file is migrated.

``open_file`` makes a connection ready for ``server.ledger.PrivacyLedger``: WAL journal with
``synchronous=FULL`` (a committed round survives a power cut), then the file is recognised
(``application_id``), created, or migrated to ``SCHEMA_VERSION`` in one transaction.

Versions:

1. one row per merchant per round: the mechanism (σ, q, steps, C, δ), the merchant's ε
   and budget, the server's status;
2. adds ``noise``, the merchant's noise source; rows migrated from 1 keep '' (nothing was
   reported), which the audit flags;
3. adds what the spend was of (``shared.privacy.events.SpendEvent``): ``unit``,
   ``unit_count`` (N), ``expected_batch`` (q·N) and ``release``. Rows migrated from 2 read
   ``unit = 'record'`` and ``release = 'update'`` (the only ones fedshop had) and
   ``unit_count = expected_batch = 0``: not recorded. Spend is never rewritten, only described.
4. ``release`` joins the primary key, (run_id, round, merchant_id, release): a merchant's
   round can hold its update's row and its evaluation's row (noised metrics, accounted as
   their own spend; ``client.release``). SQLite cannot change a primary key in place, so the
   migration copies every row, unchanged and in order, into the new table in the same
   transaction and recreates the index and the append-only triggers on it.
5. adds ``neighbours``, the neighbouring relation each row's ε was accounted for
   (``shared.privacy.events.NEIGHBOURS``): ``replace-one`` since N is declared public. Rows
   migrated from 4 read ``add-remove``, which is what they were accounted for; the audit fails
   them (their ε understates a guarantee that must hold while N is released).
6. adds the table ``merchant_level``: one row per secure round whose masked sum the server
   unmasked under merchant-level DP (``aggregation = "secagg+"`` with ``merchant-epsilon``):
   the noise the merchants added between them, the clipping norm, how many merchants'
   vectors the sum held, and the run's merchant-level ε after it. Nothing to migrate: a file
   of version 5 gets the empty table.

The triggers make the spend and merchant_level tables append-only and meta insert-once, whatever writes to the
file (see ``server.ledger``).
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
# Marks the file as a fedshop ledger, so opening some other SQLite file fails loudly
# instead of adding tables to it. ("FSL1" as a big-endian 32-bit int.)
APPLICATION_ID = 0x46534C31


class LedgerError(RuntimeError):
    """The ledger file cannot be used (wrong file, newer schema, no WAL)."""


# Added by version 3, at the end of the table (where ALTER TABLE puts them on a migrated file).
_SPEND_OF = """
    unit             TEXT    NOT NULL DEFAULT 'record' CHECK (unit <> ''),
    unit_count       INTEGER NOT NULL DEFAULT 0 CHECK (unit_count >= 0),
    expected_batch   REAL    NOT NULL DEFAULT 0.0 CHECK (expected_batch >= 0),
    release          TEXT    NOT NULL DEFAULT 'update' CHECK (release <> '')"""

# Added by version 5 (at the end, as ALTER TABLE puts it).
_NEIGHBOURS = """
    neighbours       TEXT    NOT NULL DEFAULT 'add-remove' CHECK (neighbours <> '')"""

_COLUMNS_V4 = f"""
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
    recorded_at      TEXT    NOT NULL,{_SPEND_OF}"""
_COLUMNS = f"{_COLUMNS_V4},{_NEIGHBOURS}"


def _names(columns: str) -> tuple[str, ...]:
    return tuple(line.split()[0] for line in columns.strip().splitlines() if not line.strip().startswith("--"))


def _spend_table(name: str, columns: str = _COLUMNS) -> str:
    return f"""CREATE TABLE {name} ({columns},
    PRIMARY KEY (run_id, round, merchant_id, release),
    CHECK (status <> 'refused' OR steps = 0)
) STRICT;"""


# The index and the triggers of the spend table (recreated by the migration to version 4).
_SPEND_GUARDS = """
CREATE INDEX spend_by_merchant ON spend (merchant_id, round);

CREATE TRIGGER spend_no_update BEFORE UPDATE ON spend
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE of spend is forbidden'); END;

CREATE TRIGGER spend_no_delete BEFORE DELETE ON spend
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE from spend is forbidden'); END;

-- INSERT OR REPLACE deletes the old row without firing DELETE triggers (unless
-- recursive_triggers is on), so refuse any insert that collides with an existing row.
CREATE TRIGGER spend_no_replace BEFORE INSERT ON spend
WHEN EXISTS (SELECT 1 FROM spend
             WHERE run_id = NEW.run_id AND round = NEW.round AND merchant_id = NEW.merchant_id
               AND release = NEW.release)
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: row already recorded'); END;
"""

# Merchant-level DP of a secure round (version 6): the Gaussian noise the round's sum carries
# (σ_m · C_m, shared out among the merchants that sent vectors: server.secure_aggregation),
# what it protects (one merchant's whole update, clipped to C_m) and the run's ε after it.
_MERCHANT_LEVEL = """
CREATE TABLE merchant_level (
    run_id           TEXT    NOT NULL,
    round            INTEGER NOT NULL CHECK (round >= 1),
    contributors     INTEGER NOT NULL CHECK (contributors >= 0),
    noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
    clip_norm        REAL    NOT NULL CHECK (clip_norm > 0),
    delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
    neighbours       TEXT    NOT NULL CHECK (neighbours <> ''),
    epsilon          REAL    NOT NULL CHECK (epsilon >= 0),
    recorded_at      TEXT    NOT NULL,
    PRIMARY KEY (run_id, round)
) STRICT;

CREATE TRIGGER merchant_level_no_update BEFORE UPDATE ON merchant_level
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE of merchant_level is forbidden'); END;

CREATE TRIGGER merchant_level_no_delete BEFORE DELETE ON merchant_level
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE from merchant_level is forbidden'); END;

CREATE TRIGGER merchant_level_no_replace BEFORE INSERT ON merchant_level
WHEN EXISTS (SELECT 1 FROM merchant_level WHERE run_id = NEW.run_id AND round = NEW.round)
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: row already recorded'); END;
"""

_SCHEMA = f"""
{_spend_table("spend")}
{_SPEND_GUARDS}
{_MERCHANT_LEVEL}
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

# version -> the statements that take a file from it to the next version. ALTER TABLE keeps
# the append-only triggers: they fire on UPDATE / DELETE / INSERT, not on schema changes.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE spend ADD COLUMN noise TEXT NOT NULL DEFAULT ''",),
    2: tuple(f"ALTER TABLE spend ADD COLUMN {column.strip()}" for column in _SPEND_OF.split(",\n")),
    # A new primary key: copy the rows (in their order: rowid order is recording order) into a
    # table that has it. The triggers go first, explicitly (DROP TABLE fires none anyway).
    3: (_spend_table("spend_v4", _COLUMNS_V4),
        f"INSERT INTO spend_v4 ({', '.join(_names(_COLUMNS_V4))}) SELECT {', '.join(_names(_COLUMNS_V4))} FROM spend "
        "ORDER BY rowid",
        "DROP TRIGGER spend_no_update", "DROP TRIGGER spend_no_delete", "DROP TRIGGER spend_no_replace",
        "DROP TABLE spend",
        "ALTER TABLE spend_v4 RENAME TO spend",
        *(part.strip() for part in _SPEND_GUARDS.split("\n\n") if part.strip())),  # one statement each
    4: (f"ALTER TABLE spend ADD COLUMN {_NEIGHBOURS.strip()}",),
}


def open_file(conn: sqlite3.Connection, path: Path) -> None:
    """Make ``conn`` (autocommit mode) a ledger of ``SCHEMA_VERSION``: create or migrate the file."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise LedgerError(f"{path}: cannot enable WAL journal (got {mode!r})")
    # FULL: each commit is fsynced before the transaction returns.
    conn.execute("PRAGMA synchronous=FULL")

    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    has_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
    if app_id not in (0, APPLICATION_ID) or (has_tables and app_id != APPLICATION_ID):
        raise LedgerError(f"{path} is not a fedshop privacy ledger")
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{path} has ledger schema version {version}, newer than this fedshop "
            f"understands ({SCHEMA_VERSION}); upgrade fedshop to read it"
        )
    if not has_tables:
        _create(conn, path)
    elif version != SCHEMA_VERSION:
        _migrate(conn, path, version)


def _create(conn: sqlite3.Connection, path: Path) -> None:
    created_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with transaction(conn):
        for statement in split_sql(_SCHEMA):
            conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (created_at,))
        # PRAGMAs run inside the transaction, so a crash here leaves an empty file,
        # which the next open simply initialises again.
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    log.info("created privacy ledger %s (schema %d)", path, SCHEMA_VERSION)


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    if version not in _MIGRATIONS:
        raise LedgerError(f"{path} has ledger schema version {version}; no migration known")
    # One transaction from ``version`` to SCHEMA_VERSION: a crash leaves the old file whole.
    with transaction(conn):
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    log.info("privacy ledger %s: schema %d -> %d (old rows kept as they were; see server.ledger_schema)",
             path, version, SCHEMA_VERSION)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
    # IMMEDIATE takes the write lock up front, so a read-compare-insert cannot interleave
    # with another writer.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def split_sql(script: str) -> list[str]:
    """Statements of ``script``, so a schema is created inside one transaction.

    ``executescript()`` would COMMIT the open transaction first; ``sqlite3.complete_statement``
    keeps trigger bodies (which contain ';') in one piece.
    """
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


# Version 5 -> 6 creates the merchant_level table and its triggers (split once split_sql exists).
_MIGRATIONS[5] = tuple(split_sql(_MERCHANT_LEVEL))
