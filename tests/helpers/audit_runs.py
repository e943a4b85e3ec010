"""Realistic run directories for the privacy audit, built without running a federation.

``build_run`` writes what a finished run leaves behind: ``ledger.sqlite`` (a
``server.ledger.PrivacyLedger`` with its ``run_id`` meta), each merchant's own
``nodes/<m>/privacy-state.json`` (``shared.privacy.budget.PrivacyState``, whose ``commit`` returns
the PLD ε, for replace-one neighbours, the ledger records as ``epsilon_reported``), ``metrics.jsonl`` (the
shape ``server.run_log`` writes for a ``RoundReport``) and ``config.json`` (the run config as
``server.federation`` writes it; ``RUN_CONFIG``'s batch size and epochs give the mechanisms'
q and steps by the trainer's rule). ``dp=False`` builds a non-private run: rows as
``client.merchant`` records a non-private call (``dp = 0``, σ = q = δ = 0, ε 0).
``evaluations=True`` adds, after each round's updates, each merchant's evaluation release as
``client.merchant`` commits it and ``server.federation`` records it: its own spend (release
``"evaluation"``, ``EVAL_MECHANISM``: a Gaussian mechanism, q = 1, one step) on its held-out
units (``EVAL_UNIT_COUNTS``), committed after the update, its row written after the round's
update rows, carrying the merchant's cumulative ε after both.

``as_schema_1`` ... ``as_schema_4`` rewrite a ledger as schema 1 (before the noise source was
kept), 2 (before the unit, N and the release were kept), 3 (before the release joined the
key) or 4 (before the neighbouring relation was kept) left it.

``tamper`` opens a ledger with raw ``sqlite3`` after dropping the append-only triggers,
the only way to rewrite history the ledger's docstring admits.

"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server import ledger_schema
from server.ledger import PrivacyLedger, SpendRecord
from shared.config import RunConfig
from shared.privacy import accounting
from shared.privacy.budget import PrivacyState
from shared.privacy.events import RELEASE_EVALUATION, MechanismEvent, SpendEvent
from shared.run_files import CONFIG_FILE, LEDGER_FILE, METRICS_FILE

RUN_ID = "run-audit-1"
DELTA = 1e-5
BUDGET = 8.0
ROUNDS = 3
MERCHANTS = ("m1", "m2", "m3")
# m1 and m2 train alike; m3 samples less often for more steps, so per-merchant fields differ.
MECHANISMS: dict[str, MechanismEvent] = {
    "m1": MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=10, max_grad_norm=1.0),
    "m2": MechanismEvent(noise_multiplier=1.0, sample_rate=0.05, steps=10, max_grad_norm=1.0),
    "m3": MechanismEvent(noise_multiplier=1.0, sample_rate=0.02, steps=20, max_grad_norm=1.0),
}
# Records each merchant trains on (N): q·N is the expected batch its spend records.
UNIT_COUNTS: dict[str, int] = {"m1": 200, "m2": 200, "m3": 500}
# An evaluation release as client.release.EvalSettings.mechanism builds it (σ_eval the run
# config's default 10, C_eval 1), on each merchant's held-out units.
EVAL_MECHANISM = MechanismEvent(noise_multiplier=10.0, sample_rate=1.0, steps=1, max_grad_norm=1.0)
EVAL_UNIT_COUNTS: dict[str, int] = {"m1": 20, "m2": 20, "m3": 50}
TRIGGERS = ("spend_no_update", "spend_no_delete", "spend_no_replace")
# The run config's keys that differ from RunConfig's defaults: batch 10 gives q = 1/ceil(N/10)
# (m1, m2: 1/20; m3: 1/50) and half an epoch, capped at 20, gives their steps (10; 20).
RUN_CONFIG: dict[str, Any] = {"batch-size": 10, "local-epochs": 0.5, "max-local-steps": 20,
                              "target-epsilon": BUDGET, "target-delta": DELTA}


def state_path(run_dir: Path, merchant: str) -> Path:
    return run_dir / "nodes" / merchant / "privacy-state.json"


def metrics_line(round_: int, accepted: Sequence[str]) -> dict[str, Any]:
    """One ``metrics.jsonl`` row, with the fields of ``server.round_report.RoundReport``."""
    return {
        "round": round_, "sampled": list(accepted), "accepted": list(accepted), "rejected": {}, "refused": {},
        "failed": {}, "bytes_received": 1000 * len(accepted), "train_loss": 0.5, "slowest_train_s": 1.0,
        "wall_s": 2.0, "eval_metrics": {}, "epsilon": {}, "aggregated": True,
    }


def build_run(
    run_dir: Path,
    *,
    budgets: Mapping[str, float] | None = None,
    rounds: int = ROUNDS,
    merchants: Sequence[str] = MERCHANTS,
    mechanisms: Mapping[str, MechanismEvent] | None = None,
    dp: bool = True,
    config: Mapping[str, Any] | None = None,
    write_config: bool = True,
    evaluations: bool = False,
    eval_mechanism: MechanismEvent = EVAL_MECHANISM,
) -> Path:
    """A finished run of ``rounds`` rounds in which every merchant trained and was accepted.

    ``mechanisms``: each merchant's mechanism (default ``MECHANISMS``); ``config``: run-config
    keys over ``RUN_CONFIG``; ``write_config=False`` leaves no ``config.json`` (older runs);
    ``evaluations``: each merchant also releases an evaluation (``eval_mechanism``) after each
    round's update (private runs only: a non-private evaluation records no spend)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    budgets = dict(budgets or {})
    mechanisms = {**MECHANISMS, **(mechanisms or {})}
    if write_config:
        settings = {**RunConfig().to_mapping(), **RUN_CONFIG, "dp": dp, **(config or {})}
        (run_dir / CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
    states = {
        m: PrivacyState.open(state_path(run_dir, m), merchant_id=m, target_epsilon=budgets.get(m, BUDGET),
                             target_delta=DELTA)
        for m in merchants
    }
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        ledger.set_meta("run_id", RUN_ID)
        for rnd in range(1, rounds + 1):
            records = []
            for i, m in enumerate(merchants):
                if dp:
                    eps = states[m].commit(mechanisms[m], unit_count=UNIT_COUNTS[m], round=rnd,
                                           model_version=rnd - 1, run_id=RUN_ID)
                    event = states[m].entries[-1].event
                else:
                    eps, event = 0.0, non_private_event(mechanisms[m], UNIT_COUNTS[m])
                records.append(SpendRecord(
                    run_id=RUN_ID, round=rnd, merchant_id=m, node_id=1000 + i, model_version=rnd - 1,
                    event=event, epsilon_reported=eps, epsilon_budget=states[m].target_epsilon,
                    accountant=accounting.ACCOUNTANT, status="accepted", dp=dp))
            ledger.record_round(records)
            if dp and evaluations:
                evaluated = []
                for i, m in enumerate(merchants):
                    eps = states[m].commit(eval_mechanism, unit_count=EVAL_UNIT_COUNTS[m], round=rnd,
                                           model_version=rnd, run_id=RUN_ID, release=RELEASE_EVALUATION)
                    evaluated.append(SpendRecord(
                        run_id=RUN_ID, round=rnd, merchant_id=m, node_id=1000 + i, model_version=rnd,
                        event=states[m].entries[-1].event, epsilon_reported=eps,
                        epsilon_budget=states[m].target_epsilon, accountant=accounting.ACCOUNTANT,
                        status="accepted", dp=True))
                ledger.record_round(evaluated)
            with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(metrics_line(rnd, merchants), sort_keys=True) + "\n")
    return run_dir


def non_private_event(mechanism: MechanismEvent, unit_count: int) -> SpendEvent:
    """What ``client.merchant`` records for a non-private call: no noise, no sampling, no δ."""
    return SpendEvent.of(MechanismEvent(noise_multiplier=0.0, sample_rate=0.0, steps=mechanism.steps,
                                        max_grad_norm=mechanism.max_grad_norm),
                         unit_count=unit_count, delta=0.0, noise="")


@contextmanager
def tamper(run_dir: Path) -> Iterator[sqlite3.Connection]:
    """A raw connection to the run's ledger with the append-only triggers dropped."""
    conn = sqlite3.connect(run_dir / LEDGER_FILE, isolation_level=None)
    try:
        for trigger in TRIGGERS:
            conn.execute(f"DROP TRIGGER {trigger}")
        yield conn
    finally:
        conn.close()


def as_schema_1(ledger: Path) -> None:
    """Turn a ledger into what schema 1 wrote: the same rows, no noise source, no unit, N or release."""
    as_schema_2(ledger)
    _drop_columns(ledger, ("noise",), version=1)


def as_schema_5(ledger: Path) -> None:
    """Turn a ledger into what schema 5 wrote: no ``merchant_level`` table (nor its triggers)."""
    conn = sqlite3.connect(ledger, isolation_level=None)
    try:
        conn.execute("DROP TABLE merchant_level")  # its triggers go with it
        conn.execute("PRAGMA user_version = 5")
    finally:
        conn.close()


def as_schema_4(ledger: Path) -> None:
    """Turn a ledger into what schema 4 wrote: the same rows, without ``neighbours``."""
    as_schema_5(ledger)
    _drop_columns(ledger, ("neighbours",), version=4)


def as_schema_3(ledger: Path) -> None:
    """Turn a ledger into what schema 3 wrote: the same rows, the primary key without ``release``
    (rebuilt as ``server.ledger_schema``'s migration to 4 does, the other way round)."""
    as_schema_4(ledger)
    conn = sqlite3.connect(ledger, isolation_level=None)
    try:
        table = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'spend'").fetchone()[0]
        create = re.sub(r'^CREATE TABLE "?spend"?', "CREATE TABLE spend_v3", table).replace(
            "PRIMARY KEY (run_id, round, merchant_id, release)", "PRIMARY KEY (run_id, round, merchant_id)")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(spend)")]
        guards = ledger_schema._SPEND_GUARDS.replace("\n               AND release = NEW.release", "")
        conn.execute("BEGIN")
        conn.execute(create)
        conn.execute(f"INSERT INTO spend_v3 SELECT {', '.join(columns)} FROM spend ORDER BY rowid")
        for trigger in TRIGGERS:
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE spend")
        conn.execute("ALTER TABLE spend_v3 RENAME TO spend")
        for statement in (part.strip() for part in guards.split("\n\n") if part.strip()):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 3")
        conn.execute("COMMIT")
    finally:
        conn.close()


def as_schema_2(ledger: Path) -> None:
    """Turn a ledger into what schema 2 wrote: the same rows, without what the spend was of
    (unit, unit_count, expected_batch, release)."""
    as_schema_3(ledger)
    _drop_columns(ledger, ("unit", "unit_count", "expected_batch", "release"), version=2)


def _drop_columns(ledger: Path, columns: Sequence[str], *, version: int) -> None:
    """The columns a later schema added, dropped (rows kept), and the file marked ``version``."""
    conn = sqlite3.connect(ledger, isolation_level=None)
    try:
        for column in columns:
            conn.execute(f"ALTER TABLE spend DROP COLUMN {column}")
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()
