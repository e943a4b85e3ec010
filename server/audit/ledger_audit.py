"""Audit of a run's privacy ledger: re-derive every merchant's ε and check the record.

The ledger records *what happened* (each merchant's mechanism per round) next to *what the
merchant's own accountant reported* (Opacus PRV). This module re-derives ε from the
mechanism alone with an independent accountant (Google's dp_accounting PLD; RDP for
reference), and fails the audit when:

- a merchant's recorded ε exceeds its budget;
- recorded and re-derived ε disagree by more than ``tolerance_abs + tolerance_rel · ε_PLD``
  (PRV and PLD agree to ~0.2% on the same mechanism, so a larger gap means a row was
  altered, removed, or spend happened that this run's ledger does not show);
- the ledger is inconsistent: missing rounds, a (round, merchant) recorded twice, or a
  merchant the run log says trained in a round without a spend row there;
- a private update carries no noise-source mark (``shared.privacy.NOISE_SOURCE``): it came
  from a version that did not mark its noise, as every version whose noise repeated did not.

The ledger is read with plain SQL, not through ``server.ledger``: the audit must also see
a file whose constraints were tampered with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.jsonable import finite
from shared.privacy.accounting import epsilon_pld, epsilon_rdp
from shared.privacy.events import NOISE_SOURCE, RELEASE_UPDATE, SPEND_KEYS, UNIT_RECORD, MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE, METRICS_FILE

log = logging.getLogger(__name__)

TOLERANCE_ABS = 0.05
TOLERANCE_REL = 0.02


class AuditInputError(ValueError):
    """The run directory or state file cannot be audited at all; the message names it."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One ledger row as the audit reads it: the merchant's spend and the server's context."""

    round: int
    merchant_id: str
    event: SpendEvent
    epsilon_reported: float
    epsilon_budget: float
    status: str
    dp: bool

    @property
    def spent(self) -> bool:
        return self.dp and self.event.mechanism.steps > 0 and self.status != "refused"


@dataclasses.dataclass
class MerchantAudit:
    merchant_id: str
    rounds_joined: int
    rounds_refused: int
    total_steps: int
    noise_multipliers: list[float]
    sample_rates: list[float]
    max_grad_norms: list[float]
    delta: float
    epsilon_recorded: float
    epsilon_pld: float
    epsilon_rdp: float
    budget: float
    dp: bool
    series: list[dict[str, float]]  # per round: recorded and re-derived ε
    findings: list[str] = dataclasses.field(default_factory=list)

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon_recorded)


@dataclasses.dataclass
class AuditReport:
    run_dir: str
    merchants: list[MerchantAudit]
    ledger_findings: list[str]
    tolerance_abs: float
    tolerance_rel: float
    rounds: int

    @property
    def findings(self) -> list[str]:
        return self.ledger_findings + [f"{m.merchant_id}: {f}" for m in self.merchants for f in m.findings]

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return finite({
            "run_dir": self.run_dir,
            "passed": self.passed,
            "rounds": self.rounds,
            "tolerance": {"abs": self.tolerance_abs, "rel": self.tolerance_rel},
            "findings": self.findings,
            "merchants": [{**dataclasses.asdict(m), "remaining": m.remaining} for m in self.merchants],
        })


# What a column an older ledger lacks reads as (see server.ledger_schema): schema 1 kept no
# noise source (unmarked); schemas 1 and 2 knew one unit and one release and kept no N.
_OLD_SCHEMA_VALUES = {"noise": "''", "unit": f"'{UNIT_RECORD}'", "release": f"'{RELEASE_UPDATE}'",
                      "unit_count": "0", "expected_batch": "0.0"}
_CONTEXT = ("round", "merchant_id", "epsilon_reported", "epsilon_budget", "status", "dp")


def read_rows(ledger_path: Path) -> list[Row]:
    if not ledger_path.is_file():
        raise AuditInputError(f"{ledger_path}: no privacy ledger there")
    try:
        conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
        try:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(spend)")}
            spend = [c if c in columns else f"{_OLD_SCHEMA_VALUES[c]} AS {c}" for c in SPEND_KEYS]
            cursor = conn.execute(f"SELECT {', '.join([*_CONTEXT, *spend])} FROM spend ORDER BY round, merchant_id")
            raw = cursor.fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise AuditInputError(f"{ledger_path}: not a readable privacy ledger ({exc})") from exc
    rows = []
    for values in raw:
        context = dict(zip(_CONTEXT, values[:len(_CONTEXT)], strict=True))
        # Read as recorded, not validated: a tampered row must reach the checks, not stop the audit.
        event = SpendEvent.from_dict(dict(zip(SPEND_KEYS, values[len(_CONTEXT):], strict=True)))
        rows.append(Row(round=int(context["round"]), merchant_id=str(context["merchant_id"]), event=event,
                        epsilon_reported=float(context["epsilon_reported"]),
                        epsilon_budget=float(context["epsilon_budget"]), status=str(context["status"]),
                        dp=bool(context["dp"])))
    return rows


def _within(recorded: float, derived: float, *, tol_abs: float, tol_rel: float) -> bool:
    return abs(recorded - derived) <= tol_abs + tol_rel * derived


def audit_merchant(merchant_id: str, rows: list[Row], *, tol_abs: float, tol_rel: float) -> MerchantAudit:
    spent = [r for r in rows if r.spent]
    dp = all(r.dp for r in rows)
    delta = rows[-1].event.delta
    events: list[MechanismEvent] = []
    series: list[dict[str, float]] = []
    findings: list[str] = []
    for row in rows:
        if row.spent:
            events.append(row.event.mechanism)
        if not row.dp:
            continue
        derived = epsilon_pld(events, delta) if events else 0.0
        series.append({"round": row.round, "recorded": row.epsilon_reported, "pld": derived,
                       "budget": row.epsilon_budget})
        if not _within(row.epsilon_reported, derived, tol_abs=tol_abs, tol_rel=tol_rel):
            side = "under-reports" if row.epsilon_reported < derived else "exceeds"
            findings.append(f"round {row.round}: recorded ε {row.epsilon_reported:.4f} {side} ε re-derived "
                            f"from the recorded mechanisms ({derived:.4f}, PLD)")
    if len({r.event.delta for r in rows if r.dp}) > 1:
        findings.append(f"δ changed between rounds: {sorted({r.event.delta for r in rows})}")
    recorded = rows[-1].epsilon_reported if rows else 0.0
    budget = min(r.epsilon_budget for r in rows)
    pld = series[-1]["pld"] if series else 0.0
    if dp and recorded > budget + 1e-9:
        findings.append(f"over budget: recorded ε {recorded:.4f} > budget {budget:.4f}")
    if dp and pld > budget + tol_abs:
        findings.append(f"over budget: re-derived ε {pld:.4f} > budget {budget:.4f}")
    unmarked = [r.round for r in spent if r.event.noise != NOISE_SOURCE]
    if unmarked:
        findings.append(_unmarked(len(unmarked), len(spent), f"round(s) {_spans(unmarked)}", "update(s)"))
    return MerchantAudit(
        merchant_id=merchant_id,
        rounds_joined=len(spent),
        rounds_refused=sum(1 for r in rows if r.status == "refused"),
        total_steps=sum(r.event.mechanism.steps for r in spent),
        noise_multipliers=sorted({r.event.mechanism.noise_multiplier for r in spent}),
        sample_rates=sorted({round(r.event.mechanism.sample_rate, 8) for r in spent}),
        max_grad_norms=sorted({r.event.mechanism.max_grad_norm for r in spent}),
        delta=delta,
        epsilon_recorded=recorded if dp else math.inf,
        epsilon_pld=pld if dp else math.inf,
        epsilon_rdp=(epsilon_rdp(events, delta) if events else 0.0) if dp else math.inf,
        budget=budget,
        dp=dp,
        series=series,
        findings=findings,
    )


def _run_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AuditInputError(f"{path} line {number}: not JSON ({exc.msg})") from exc
    return rows


def ledger_findings(rows: list[Row], run_log: list[dict[str, Any]]) -> list[str]:
    findings: list[str] = []
    counts: dict[tuple[int, str], int] = defaultdict(int)
    for row in rows:
        counts[(row.round, row.merchant_id)] += 1
    for (rnd, merchant), n in sorted(counts.items()):
        if n > 1:
            findings.append(f"ledger: merchant {merchant} recorded {n} times in round {rnd}")
    rounds = {r.round for r in rows}
    if rounds:
        missing = sorted(set(range(1, max(rounds) + 1)) - rounds)
        if missing:
            findings.append(f"ledger: no spend recorded for round(s) {missing} (gap)")
    by_round: dict[int, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_round[row.round][row.merchant_id] = row
    for entry in run_log:
        rnd = int(entry.get("round", 0))
        trained = list(entry.get("accepted", [])) + list(entry.get("rejected", {}))
        for merchant in trained:
            found = by_round.get(rnd, {}).get(merchant)
            if found is None:
                findings.append(f"ledger: merchant {merchant} trained in round {rnd} (run log) "
                                "but the ledger has no spend for it")
            elif found.dp and found.event.mechanism.steps == 0:
                findings.append(f"ledger: merchant {merchant} trained in round {rnd} but its row records 0 steps")
    return findings


def audit_run(run_dir: Path, *, tolerance_abs: float = TOLERANCE_ABS,
              tolerance_rel: float = TOLERANCE_REL) -> AuditReport:
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / LEDGER_FILE)
    by_merchant: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_merchant[row.merchant_id].append(row)
    merchants = [audit_merchant(m, sorted(rs, key=lambda r: r.round), tol_abs=tolerance_abs, tol_rel=tolerance_rel)
                 for m, rs in sorted(by_merchant.items())]
    return AuditReport(run_dir=str(run_dir), merchants=merchants,
                       ledger_findings=ledger_findings(rows, _run_log(run_dir)),
                       tolerance_abs=tolerance_abs, tolerance_rel=tolerance_rel,
                       rounds=max((r.round for r in rows), default=0))


# ---------------------------------------------------------------- a merchant's own state
@dataclasses.dataclass
class NodeStateAudit:
    path: str
    merchant_id: str
    budget: float
    delta: float
    calls: int
    total_steps: int
    epsilon_prv: float
    epsilon_pld: float
    epsilon_rdp: float
    compared_with: str | None
    findings: list[str]

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return finite({**dataclasses.asdict(self), "passed": self.passed})


def audit_node_state(state_path: Path, *, run_dir: Path | None = None, tolerance_abs: float = TOLERANCE_ABS,
                     tolerance_rel: float = TOLERANCE_REL) -> NodeStateAudit:
    """Re-account a merchant's own persisted state; with ``run_dir``, compare it with the ledger.

    The node's state is the merchant's lifetime record; the ledger covers one run. They must
    agree on every call of that run (matched by run id and round): same mechanism, same ε.
    """
    from shared.privacy import accounting
    from shared.privacy.budget import PrivacyState, PrivacyStateError

    state_path = Path(state_path)
    if not state_path.is_file():
        raise AuditInputError(f"{state_path}: no privacy state file there")
    try:
        raw = json.loads(state_path.read_text(encoding="utf-8"))
        merchant_id = str(raw["merchant_id"])
        state = PrivacyState.open(state_path, merchant_id=merchant_id, target_epsilon=float(raw["target_epsilon"]),
                                  target_delta=float(raw["target_delta"]))
    except (KeyError, ValueError, PrivacyStateError) as exc:
        raise AuditInputError(f"{state_path}: unreadable privacy state ({exc})") from exc
    events = state.events
    findings: list[str] = []
    eps_prv = accounting.epsilon_prv(events, state.target_delta)
    eps_pld = epsilon_pld(events, state.target_delta)
    if not _within(eps_prv, eps_pld, tol_abs=tolerance_abs, tol_rel=tolerance_rel):
        findings.append(f"PRV ε {eps_prv:.4f} and PLD ε {eps_pld:.4f} disagree beyond tolerance")
    if eps_prv > state.target_epsilon + 1e-9:
        findings.append(f"over budget: ε {eps_prv:.4f} > budget {state.target_epsilon:.4f}")
    unmarked = [i for i, e in enumerate(state.entries) if e.event.noise != NOISE_SOURCE]
    if unmarked:
        findings.append(_unmarked(len(unmarked), len(state.entries), f"entries {_spans(unmarked)}", "call(s)"))
    if run_dir is not None:
        findings += _compare_with_ledger(state, Path(run_dir), tolerance_abs=tolerance_abs,
                                         tolerance_rel=tolerance_rel)
    return NodeStateAudit(path=str(state_path), merchant_id=merchant_id, budget=state.target_epsilon,
                          delta=state.target_delta, calls=len(state.entries), total_steps=state.total_steps,
                          epsilon_prv=eps_prv, epsilon_pld=eps_pld,
                          epsilon_rdp=epsilon_rdp(events, state.target_delta),
                          compared_with=str(run_dir) if run_dir else None, findings=findings)


def _unmarked(count: int, total: int, where: str, what: str) -> str:
    # Versions whose noise repeated across calls never marked their spend; neither did the
    # first versions with fresh noise, so an unmarked call is unproven, not proven bad.
    return (f"{count} of {total} {what} ({where}) carry no noise-source mark {NOISE_SOURCE!r}: recorded by a "
            "version that did not mark its noise, as every version whose noise repeated across calls was, "
            "so the ε reported for them is not shown to hold")


def _spans(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def _compare_with_ledger(state: Any, run_dir: Path, *, tolerance_abs: float, tolerance_rel: float) -> list[str]:
    from shared.privacy import accounting

    findings: list[str] = []
    rows = [r for r in read_rows(run_dir / LEDGER_FILE) if r.merchant_id == state.merchant_id]
    conn = sqlite3.connect(f"file:{run_dir / LEDGER_FILE}?mode=ro", uri=True)
    try:
        found = conn.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
    finally:
        conn.close()
    run_id = found[0] if found else ""
    if not rows:
        return [f"the ledger in {run_dir} has no rows for merchant {state.merchant_id}"]
    # A round can hold several of the merchant's calls: one whose reply never reached the
    # ledger (server crash) and the retry of that round. Every call is spend; the ledger has
    # one row per round, so extra calls are spend it does not show.
    mine: dict[int, list[tuple[int, Any]]] = defaultdict(list)
    for i, e in enumerate(state.entries):
        if e.run_id == run_id:
            mine[e.round].append((i, e))
    ledger_spent = {r.round: r for r in rows if r.spent}
    for rnd in sorted(set(mine) | set(ledger_spent)):
        if rnd not in ledger_spent:
            findings.append(f"round {rnd}: the merchant recorded spend the ledger does not show")
            continue
        if rnd not in mine:
            findings.append(f"round {rnd}: the ledger shows spend the merchant's own record lacks")
            continue
        if len(mine[rnd]) > 1:
            findings.append(f"round {rnd}: the merchant recorded {len(mine[rnd])} training calls; the ledger shows "
                            f"one, so {len(mine[rnd]) - 1} call(s) of spend are not on the ledger")
        index, entry = mine[rnd][-1]  # a retried round's ledger row is the last call's
        row = ledger_spent[rnd]
        if entry.event.mechanism != row.event.mechanism:
            findings.append(f"round {rnd}: mechanism differs (merchant {entry.event.mechanism}, "
                            f"ledger {row.event.mechanism})")
        own = accounting.epsilon(state.events[: index + 1], state.target_delta, state.accountant)
        if not _within(row.epsilon_reported, own, tol_abs=tolerance_abs, tol_rel=tolerance_rel):
            findings.append(f"round {rnd}: ledger ε {row.epsilon_reported:.4f} != merchant's own ε {own:.4f}")
    return findings
