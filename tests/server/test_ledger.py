from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.ledger import (
    SCHEMA_VERSION,
    LedgerConflictError,
    LedgerError,
    PrivacyLedger,
    SpendRecord,
)
from shared.privacy.events import MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE
from tests.helpers.audit_runs import as_schema_1, as_schema_2, as_schema_3, as_schema_4, as_schema_5

RUN = "run-1"


def spend(merchant: str = "m1", round_: int = 1, **overrides: object) -> SpendRecord:
    """A ledger row; overrides name a row field or a field of its spend event (or its mechanism)."""
    mechanism: dict[str, object] = dict(noise_multiplier=1.1, sample_rate=0.02, steps=20, max_grad_norm=1.0)
    event: dict[str, object] = dict(delta=1e-5, unit="record", unit_count=500, expected_batch=10.0,
                                    release="update", noise="", neighbours="replace-one")
    fields: dict[str, object] = dict(
        run_id=RUN,
        round=round_,
        merchant_id=merchant,
        node_id=1000 + int(merchant.lstrip("m") or 0),
        model_version=round_ - 1,
        epsilon_reported=0.5 * round_,
        epsilon_budget=8.0,
        accountant="pld",
        status="accepted",
    )
    for name, value in overrides.items():
        (mechanism if name in mechanism else event if name in event else fields)[name] = value
    fields["event"] = SpendEvent(mechanism=MechanismEvent(**mechanism), **event)  # type: ignore[arg-type]
    return SpendRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    with PrivacyLedger(tmp_path / LEDGER_FILE) as opened:
        yield opened


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# ------------------------------------------------------------------------------ schema
def test_schema_wal_and_version(ledger: PrivacyLedger) -> None:
    conn = raw(ledger.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    columns = [row[1] for row in conn.execute("PRAGMA table_info(spend)")]
    assert columns[:3] == ["run_id", "round", "merchant_id"]
    assert "epsilon_spent_this_call" not in columns  # derivable, so not stored
    pk = [row[1] for row in sorted(conn.execute("PRAGMA table_info(spend)"), key=lambda r: r[5]) if row[5]]
    assert pk == ["run_id", "round", "merchant_id", "release"]
    triggers = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert {"spend_no_update", "spend_no_delete", "spend_no_replace"} <= triggers
    conn.close()
    # synchronous is per connection: check the ledger's own one (2 = FULL).
    assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert "created_at" in ledger.meta()


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    PrivacyLedger(path).close()
    conn = raw(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        PrivacyLedger(path)


def test_schema_1_ledger_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.record_round([spend("m1", 1, noise="fresh-per-call"), spend("m2", 1, noise="fresh-per-call")])
    as_schema_1(path)
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "noise" not in [row[1] for row in conn.execute("PRAGMA table_info(spend)")]
    conn.close()

    with PrivacyLedger(path) as ledger:
        # Old rows keep their spend and read as unmarked: nothing is rewritten.
        assert ledger.rows() == [spend("m1", 1, unit_count=0, expected_batch=0.0, neighbours="add-remove"),
                                 spend("m2", 1, unit_count=0, expected_batch=0.0, neighbours="add-remove")]
        ledger.record_round([spend("m1", 2, noise="fresh-per-call")])
        assert [r.event.noise for r in ledger.rows()] == ["", "", "fresh-per-call"]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute("UPDATE spend SET noise = 'x'")
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    conn.close()
    with PrivacyLedger(path) as ledger:  # a second open finds schema 6: nothing to migrate
        assert len(ledger.rows()) == 3


def test_schema_2_ledger_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.set_meta("run_id", RUN)
        ledger.record_round([spend("m1", 1, noise="fresh-per-call"), spend("m2", 1, status="refused", steps=0)])
    as_schema_2(path)
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "unit_count" not in [row[1] for row in conn.execute("PRAGMA table_info(spend)")]
    conn.close()

    with PrivacyLedger(path) as ledger:
        # Schema 2 knew one unit and one release and kept no N: rows read so, nothing rewritten.
        old = [spend("m1", 1, noise="fresh-per-call", unit_count=0, expected_batch=0.0, neighbours="add-remove"),
               spend("m2", 1, status="refused", steps=0, unit_count=0, expected_batch=0.0, neighbours="add-remove")]
        assert ledger.rows() == old
        assert [(r.event.unit, r.event.release) for r in old] == [("record", "update")] * 2
        assert ledger.record_round(old) == 0  # a replay of a migrated round is still idempotent
        with pytest.raises(LedgerConflictError, match="unit_count: recorded 0, now 500"):
            ledger.record_round([spend("m1", 1, noise="fresh-per-call", neighbours="add-remove"), old[1]])
        ledger.record_round([spend("m1", 2, noise="fresh-per-call")])
        assert ledger.rows("m1")[-1] == spend("m1", 2, noise="fresh-per-call")  # new rows keep N
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute("UPDATE spend SET unit_count = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute("DELETE FROM spend")
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM spend").fetchone()[0] == 3
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # the new columns' constraints hold
        conn.execute("INSERT INTO spend (run_id, round, merchant_id, node_id, model_version, noise_multiplier, "
                     "sample_rate, steps, max_grad_norm, delta, epsilon_reported, epsilon_budget, accountant, "
                     "status, reason, dp, recorded_at, unit_count) "
                     "VALUES ('run-1', 3, 'm1', '1', 0, 1, 0.1, 1, 1, 1e-5, 1, 8, 'prv', 'accepted', '', 1, 'x', -1)")
    conn.close()


def test_schema_4_ledger_is_migrated_and_its_rows_say_add_remove(tmp_path: Path) -> None:
    # Up to schema 4 every ε was accounted for add/remove neighbours; the column that says so
    # arrives with that value on old rows, and new rows say replace-one (N is public).
    path = tmp_path / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.record_round([spend("m1", 1, noise="fresh-per-call")])
    as_schema_4(path)
    conn = raw(path)
    assert "neighbours" not in [row[1] for row in conn.execute("PRAGMA table_info(spend)")]
    conn.close()
    with PrivacyLedger(path) as ledger:
        ledger.record_round([spend("m1", 2, noise="fresh-per-call")])
        assert [r.event.neighbours for r in ledger.rows()] == ["add-remove", "replace-one"]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute("UPDATE spend SET neighbours = 'replace-one'")
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    conn.close()


def test_schema_5_ledger_gains_an_append_only_merchant_level_table(tmp_path: Path) -> None:
    from shared.privacy.merchant_level import MerchantLevelRound

    path = tmp_path / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.record_round([spend("m1", 1, noise="fresh-per-call")])
    as_schema_5(path)
    conn = raw(path)
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'merchant_level'").fetchone() is None
    conn.close()
    row = MerchantLevelRound(run_id=RUN, round=1, contributors=3, noise_multiplier=3.4, clip_norm=1.0, delta=1e-5,
                             epsilon=2.5)
    with PrivacyLedger(path) as ledger:
        assert ledger.rows() == [spend("m1", 1, noise="fresh-per-call")]  # the spend is untouched
        assert ledger.merchant_level_rows() == []
        assert ledger.record_merchant_level(row) is True
        assert ledger.record_merchant_level(row) is False  # a replay writes nothing
        with pytest.raises(LedgerConflictError, match="already recorded with other values"):
            ledger.record_merchant_level(dataclasses.replace(row, epsilon=1.0))
        ledger.record_merchant_level(dataclasses.replace(row, round=3, epsilon=4.0))
        with pytest.raises(LedgerConflictError, match="comes after round 3"):  # rounds are appended in order
            ledger.record_merchant_level(dataclasses.replace(row, round=2, epsilon=3.0))
        for statement in ("UPDATE merchant_level SET epsilon = 0", "DELETE FROM merchant_level"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                ledger._conn.execute(statement)
        assert ledger.merchant_level_rows() == [row, dataclasses.replace(row, round=3, epsilon=4.0)]
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    conn.close()


EVALUATION = dict(release="evaluation", noise_multiplier=10.0, sample_rate=1.0, steps=1, unit_count=150,
                  expected_batch=150.0)


def test_schema_3_ledger_is_migrated_to_a_key_with_the_release(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.record_round([spend("m1", 1, noise="fresh-per-call"), spend("m2", 1, noise="fresh-per-call")])
        ledger.record_round([spend("m1", 2, noise="fresh-per-call")])
    before = PrivacyLedger(path)
    rows, recorded_at = before.rows(), before._conn.execute("SELECT recorded_at FROM spend ORDER BY rowid").fetchall()
    before.close()
    as_schema_3(path)
    conn = raw(path)
    pk = [row[1] for row in sorted(conn.execute("PRAGMA table_info(spend)"), key=lambda r: r[5]) if row[5]]
    assert pk == ["run_id", "round", "merchant_id"] and conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()

    with PrivacyLedger(path) as ledger:
        # Every row copied as it was, in recording order; nothing rewritten (schema 4's
        # migration then says what they were accounted for: add/remove).
        assert ledger.rows() == [dataclasses.replace(r, event=dataclasses.replace(r.event, neighbours="add-remove"))
                                 for r in rows]
        assert ledger._conn.execute("SELECT recorded_at FROM spend ORDER BY rowid").fetchall() == recorded_at
        ledger.record_round([spend("m1", 2, epsilon_reported=1.25, **EVALUATION)])  # the new key allows it
        for statement in ("UPDATE spend SET steps = 0", "DELETE FROM spend"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):  # the triggers came along
                ledger._conn.execute(statement)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._conn.execute("INSERT OR REPLACE INTO spend SELECT * FROM spend WHERE round = 2 "
                                 "AND release = 'evaluation'")
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    pk = [row[1] for row in sorted(conn.execute("PRAGMA table_info(spend)"), key=lambda r: r[5]) if row[5]]
    assert pk == ["run_id", "round", "merchant_id", "release"]
    assert {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")} >= {
        "spend_no_update", "spend_no_delete", "spend_no_replace"}
    assert conn.execute("SELECT count(*) FROM spend").fetchone()[0] == 4
    conn.close()


def test_a_round_holds_an_update_row_and_an_evaluation_row(ledger: PrivacyLedger) -> None:
    ledger.set_meta("run_id", RUN)
    ledger.record_round([spend("m1", 1), spend("m2", 1)])
    evaluation = spend("m1", 1, epsilon_reported=0.75, **EVALUATION)
    assert ledger.record_round([evaluation]) == 1  # the round's update rows do not close its evaluation rows
    assert ledger.record_round([evaluation]) == 0  # a replay is idempotent per release
    with pytest.raises(LedgerConflictError, match="evaluation"):
        ledger.record_round([spend("m1", 1, epsilon_reported=0.8, **EVALUATION)])
    with pytest.raises(LedgerConflictError, match="already recorded without merchant 'm2'"):
        ledger.record_round([spend("m2", 1, **EVALUATION)])  # a recorded round (of that release) is closed
    with pytest.raises(ValueError, match="one release"):
        ledger.record_round([spend("m1", 2), spend("m2", 2, **EVALUATION)])
    assert [(r.merchant_id, r.event.release) for r in ledger.rows()] == [
        ("m1", "update"), ("m1", "evaluation"), ("m2", "update")]
    # The latest row is the last recorded: the evaluation's cumulative ε, after both releases.
    assert ledger.latest_epsilon() == {"m1": 0.75, "m2": 0.5}
    ledger.record_round([spend("m1", 2)])
    ledger.record_round([spend("m1", 3)])
    ledger.record_round([spend("m1", 3, epsilon_reported=1.75, **EVALUATION)])
    with pytest.raises(LedgerConflictError, match=r"round 2 \(evaluation\) comes after round 3"):
        ledger.record_round([spend("m1", 2, **EVALUATION)])  # evaluation rows are appended in order too
    assert ledger.exhausted() == set()


def test_a_row_stores_the_spend_event_whole(ledger: PrivacyLedger) -> None:
    record = spend("m1", unit_count=333, expected_batch=6.66, noise="fresh-per-call")
    ledger.record_round([record])
    (back,) = ledger.rows()
    assert back == record and back.event == record.event
    conn = raw(ledger.path)
    stored = conn.execute("SELECT unit, unit_count, expected_batch, release, noise FROM spend").fetchone()
    conn.close()
    assert stored == ("record", 333, 6.66, "update", "fresh-per-call")


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    conn = raw(path)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(LedgerError, match="not a fedshop privacy ledger"):
        PrivacyLedger(path)


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="status"):
        spend(status="maybe")
    with pytest.raises(ValueError, match="refused"):
        spend(status="refused", steps=3)
    with pytest.raises(ValueError, match="epsilon_reported"):
        spend(epsilon_reported=math.nan)
    with pytest.raises(ValueError, match="sample_rate"):
        spend(sample_rate=1.5)
    spend(epsilon_reported=math.inf, dp=False)  # no DP: unbounded ε is a legal report


# ------------------------------------------------------------------------------ writing
def test_round_trip_and_queries(ledger: PrivacyLedger) -> None:
    big_node = 2**64 - 1  # Flower node ids are uint64
    assert ledger.record_round([spend("m2"), spend("m1", node_id=big_node)]) == 2
    ledger.record_round([spend("m1", 2), spend("m3", 2, status="refused", steps=0, epsilon_reported=8.0)])
    assert ledger.last_round() == 2
    assert ledger.merchants() == ["m1", "m2", "m3"]
    rows = ledger.rows()
    assert [(r.round, r.merchant_id) for r in rows] == [(1, "m1"), (1, "m2"), (2, "m1"), (2, "m3")]
    assert rows[0] == spend("m1", node_id=big_node)  # every field round-trips exactly
    assert [r.round for r in ledger.rows("m1")] == [1, 2]
    assert ledger.latest_epsilon() == {"m1": 1.0, "m2": 0.5, "m3": 8.0}


def test_empty_ledger(ledger: PrivacyLedger) -> None:
    assert ledger.last_round() == 0
    assert ledger.rows() == [] and ledger.merchants() == []
    assert ledger.latest_epsilon() == {} and ledger.exhausted() == set()
    assert ledger.record_round([]) == 0


def test_exhausted(ledger: PrivacyLedger) -> None:
    ledger.record_round(
        [
            spend("m1", epsilon_reported=8.0),  # reached its budget
            spend("m2", epsilon_reported=7.5),  # within a margin of it
            spend("m3", epsilon_reported=1.0),
            spend("m4", status="refused", steps=0, epsilon_reported=0.0),  # declined
            spend("m5", dp=False, epsilon_reported=math.inf, epsilon_budget=math.inf),  # no DP
        ]
    )
    assert ledger.exhausted() == {"m1", "m4"}
    assert ledger.exhausted(margin=0.6) == {"m1", "m2", "m4"}
    # Only the latest row counts: m4 trained again in round 2.
    ledger.record_round([spend("m4", 2, epsilon_reported=0.5)])
    assert ledger.exhausted() == {"m1"}


def test_round_is_one_transaction_crash_mid_round(
    ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.record_round([spend("m1")])
    calls = []

    def crash_on_second_row(conn: sqlite3.Connection, record: SpendRecord) -> None:
        calls.append(record.merchant_id)
        if len(calls) == 2:  # m1 of round 2 is already inserted inside the transaction
            raise KeyboardInterrupt

    monkeypatch.setattr(PrivacyLedger, "_warn_if_epsilon_fell", staticmethod(crash_on_second_row))
    with pytest.raises(KeyboardInterrupt):
        ledger.record_round([spend("m1", 2), spend("m2", 2), spend("m3", 2)])
    assert calls == ["m1", "m2"]
    assert ledger.last_round() == 1 and ledger.merchants() == ["m1"]
    monkeypatch.undo()
    assert ledger.record_round([spend("m1", 2), spend("m2", 2), spend("m3", 2)]) == 3


def test_round_is_one_transaction_database_error_mid_round(ledger: PrivacyLedger) -> None:
    # A record that slipped past validation: the table's CHECK fails on the 3rd insert,
    # after two rows of the round were already inserted inside the transaction.
    bad = spend("m3", 1)
    object.__setattr__(bad, "status", "bogus")
    with pytest.raises(sqlite3.IntegrityError):
        ledger.record_round([spend("m1"), spend("m2"), bad])
    assert ledger.rows() == []
    # The connection is usable again and the round can be written afterwards.
    assert ledger.record_round([spend("m1"), spend("m2")]) == 2


def test_replay_is_idempotent(ledger: PrivacyLedger) -> None:
    round1 = [spend("m1"), spend("m2")]
    assert ledger.record_round(round1) == 2
    assert ledger.record_round(round1) == 0
    assert ledger.record_round(list(reversed(round1))) == 0
    assert ledger.record_round([spend("m1"), spend("m1")]) == 0  # duplicate in one batch collapses
    assert len(ledger.rows()) == 2


def test_replay_with_different_values_conflicts(ledger: PrivacyLedger) -> None:
    ledger.record_round([spend("m1"), spend("m2")])
    with pytest.raises(LedgerConflictError, match=r"'m2' round 1.*epsilon_reported"):
        ledger.record_round([spend("m1"), spend("m2", epsilon_reported=0.9)])
    with pytest.raises(LedgerConflictError, match="without merchant 'm3'"):
        ledger.record_round([spend("m1"), spend("m3")])
    with pytest.raises(LedgerConflictError, match="twice"):
        ledger.record_round([spend("m4", 2), spend("m4", 2, steps=1)])
    assert ledger.rows() == [spend("m1"), spend("m2")]


def test_rounds_append_in_order_and_one_run(ledger: PrivacyLedger) -> None:
    ledger.record_round([spend("m1", 3)])
    with pytest.raises(LedgerConflictError, match="in order"):
        ledger.record_round([spend("m1", 2)])
    with pytest.raises(LedgerConflictError, match="belongs to run"):
        ledger.record_round([spend("m1", 4, run_id="run-2")])
    with pytest.raises(ValueError, match="one round"):
        ledger.record_round([spend("m1", 4), spend("m2", 5)])


def test_epsilon_decrease_is_logged(ledger: PrivacyLedger, caplog: pytest.LogCaptureFixture) -> None:
    ledger.record_round([spend("m1", 1, epsilon_reported=2.0)])
    with caplog.at_level(logging.WARNING, logger="server.ledger"):
        ledger.record_round([spend("m1", 2, epsilon_reported=0.4)])
    assert "accountant being reset" in caplog.text
    assert ledger.latest_epsilon() == {"m1": 0.4}  # recorded as reported


def test_numpy_scalars_are_accepted(ledger: PrivacyLedger) -> None:
    np = pytest.importorskip("numpy")
    ledger.record_round([spend("m1", steps=np.int64(20), epsilon_reported=np.float64(0.5))])
    assert ledger.rows() == [spend("m1")]


# ------------------------------------------------------------------------------ append-only
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE spend SET epsilon_reported = 0.0",
        "DELETE FROM spend",
        "INSERT OR REPLACE INTO spend SELECT * FROM spend",
        "UPDATE meta SET value = 'x'",
        "DELETE FROM meta",
    ],
)
def test_triggers_forbid_rewriting_history(ledger: PrivacyLedger, statement: str) -> None:
    ledger.record_round([spend("m1"), spend("m2")])
    before = ledger.rows()
    conn = raw(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only|insert-once"):
        conn.execute(statement)
    conn.close()
    assert ledger.rows() == before
    assert "created_at" in ledger.meta()


# ------------------------------------------------------------------------------ meta
def test_meta_insert_once(ledger: PrivacyLedger) -> None:
    ledger.set_meta("run_id", RUN)
    ledger.set_meta("config", '{"dp": true}')
    ledger.set_meta("run_id", RUN)  # same value again: no-op
    with pytest.raises(LedgerConflictError, match="run_id"):
        ledger.set_meta("run_id", "run-2")
    meta = ledger.meta()
    assert meta["run_id"] == RUN and meta["config"] == '{"dp": true}'
    # The meta run_id binds the ledger to one run even before any row exists ...
    with pytest.raises(LedgerConflictError, match="belongs to run"):
        ledger.record_round([spend("m1", run_id="run-2")])
    # ... and, set after rows exist, it must agree with them.
    with PrivacyLedger(ledger.path.with_name("other.sqlite")) as other:
        other.record_round([spend("m1")])
        with pytest.raises(LedgerConflictError, match="belongs to run"):
            other.set_meta("run_id", "run-2")


# ------------------------------------------------------------------------------ durability
def test_reopen_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "nested" / LEDGER_FILE
    with PrivacyLedger(path) as ledger:
        ledger.set_meta("run_id", RUN)
        ledger.record_round([spend("m1"), spend("m2")])
        created_at = ledger.meta()["created_at"]
    with PrivacyLedger(path) as ledger:
        assert ledger.rows() == [spend("m1"), spend("m2")]
        assert ledger.meta() == {"created_at": created_at, "run_id": RUN}
        assert ledger.record_round([spend("m1")]) == 0  # replay after restart is idempotent
        ledger.record_round([spend("m1", 2)])
    # Another process (here: a plain connection) sees committed rows without the API.
    conn = raw(path)
    assert conn.execute("SELECT count(*) FROM spend").fetchone()[0] == 3
    conn.close()


def test_process_killed_mid_round_leaves_previous_rounds_only(tmp_path: Path) -> None:
    # A real process dies (os._exit: no cleanup, no rollback) after inserting part of
    # round 2; the next open must see round 1 whole and nothing of round 2.
    path = tmp_path / LEDGER_FILE
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from server.ledger import PrivacyLedger, SpendRecord
        from shared.privacy.events import MechanismEvent, SpendEvent

        def rec(m, r):
            event = SpendEvent.of(MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5, max_grad_norm=1.0),
                                  unit_count=50, delta=1e-5, noise="fresh-per-call")
            return SpendRecord(run_id="run-1", round=r, merchant_id=m, node_id=1, model_version=0, event=event,
                epsilon_reported=float(r), epsilon_budget=8.0, accountant="prv", status="accepted")

        ledger = PrivacyLedger({str(path)!r})
        ledger.record_round([rec("a", 1), rec("b", 1)])
        seen = []
        def die_on_second(conn, record):
            seen.append(record)
            if len(seen) == 2:
                os._exit(3)
        PrivacyLedger._warn_if_epsilon_fell = staticmethod(die_on_second)
        ledger.record_round([rec("a", 2), rec("b", 2)])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    with PrivacyLedger(path) as ledger:
        assert ledger.last_round() == 1
        assert [(r.round, r.merchant_id) for r in ledger.rows()] == [(1, "a"), (1, "b")]


def test_spend_record_is_frozen_kw_only() -> None:
    record = spend()
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.event = spend(steps=1).event  # type: ignore[misc]
    with pytest.raises(TypeError):
        SpendRecord(RUN, 1, "m1")  # type: ignore[misc,call-arg]
