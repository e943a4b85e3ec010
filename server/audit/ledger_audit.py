"""Audit of a run's privacy ledger: re-derive every merchant's ε and check the record.

The ledger records *what happened* (each merchant's mechanism per round and release: its
update, and its evaluation when it released noised metrics) next to *what the merchant's own
accountant reported* (its cumulative ε after that release). This module re-derives ε from the
recorded mechanism alone (dp_accounting's PLD for replace-one neighbours, the merchant's own
accountant, so an honest row matches to float error; the add/remove ε beside it for reference),
checks that those mechanisms are possible and the run's (``server.audit.checks``: q from the
recorded N and expected batch, σ > 0, δ ≤ 1/(10·N), the neighbouring relation, ...), and fails
the audit
(each finding names the merchant and, where there is one, the round) when:

- a run that claims DP (its ``config.json`` says ``dp = true``; without one, any private row
  says so) has a non-private row (``dp = 0``);
- a recorded ε is below the one re-derived from the recorded mechanisms by more than
  ``UNDER_REPORT_TOLERANCE`` (0.001): the merchant computes the very same PLD, so
  under-reporting is never tolerated;
- a recorded or re-derived ε exceeds the merchant's budget: no slack, except PLD's own
  discretisation error for the re-derived one (``pld_allowance``);
- a private release's facts are impossible or not the run's: σ = 0, C ≤ 0, δ > 1/(10·N), δ
  above the run config's ``target-delta``; for an update steps < 1, q ≠ expected batch / N, C
  other than the run config's ``max-grad-norm``; for an evaluation q ≠ 1 or steps ≠ 1 (a
  Gaussian release) or no N; or δ changed between rounds;
- the ledger is inconsistent: missing rounds (no update rows), a (round, merchant, release)
  recorded twice, or a merchant the run log says trained in a round without an update row there;
- a private release carries no noise-source mark (``shared.privacy.NOISE_SOURCE``): it came
  from a version that did not mark its noise, as every version whose noise repeated did not.

A recorded ε *above* the re-derived one by more than ``tolerance_abs + tolerance_rel · ε_PLD``
is a warning, not a failure: over-reporting is safe, but that gap means spend this run's
ledger does not show (a removed row, an earlier run on the same data: the merchant's ε counts
its whole history) or another accountant.

Each merchant's rows are audited in the order recorded (round, then rowid: a round's update
before its evaluation), and every spent row, update or evaluation, composes into the ε
re-derived for the rows after it.

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

from server.audit.checks import (
    ConfigReadError,
    RunClaim,
    claims_dp,
    read_run_claim,
    row_findings,
    spans,
    unit_count_missing,
    unmarked_finding,
)
from server.audit.merchant_level import MerchantLevelAudit, audit_merchant_level
from shared.jsonable import finite
from shared.privacy.accounting import DISCRETIZATION, epsilon_pld
from shared.privacy.events import (
    NEIGHBOURS_ADD_REMOVE,
    NOISE_SOURCE,
    RELEASE_EVALUATION,
    RELEASE_UPDATE,
    SPEND_KEYS,
    UNIT_RECORD,
    MechanismEvent,
    SpendEvent,
)
from shared.run_files import LEDGER_FILE, METRICS_FILE

log = logging.getLogger(__name__)

# Over-reporting beyond this is a warning (see the module docstring); it is never a failure.
TOLERANCE_ABS = 0.05
TOLERANCE_REL = 0.02
# Under-reporting beyond this fails. The merchant's accountant is this PLD on the same grid, so
# an honest row re-derives to the same value; 0.001 absorbs only float noise.
UNDER_REPORT_TOLERANCE = 0.001
PLD_DISCRETIZATION = DISCRETIZATION  # epsilon_pld's grid (its default): what pld_allowance bounds


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
    unit_count_kept: bool = True  # the ledger has the unit_count column (schema >= 3)

    @property
    def spent(self) -> bool:
        return self.dp and self.event.mechanism.steps > 0 and self.status != "refused"

    @property
    def release(self) -> str:
        return self.event.release


@dataclasses.dataclass
class MerchantAudit:
    """One merchant's audit. ``rounds_joined``, ``total_steps`` and the σ / q / C lists describe
    its updates (DP-SGD); ``evaluations`` and ``eval_noise_multipliers`` its evaluation releases.
    ε (recorded, PLD replace-one, PLD add/remove) composes both."""

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
    epsilon_add_remove: float  # what the same mechanisms give add/remove neighbours (N kept secret): reference
    budget: float
    dp: bool
    series: list[dict[str, Any]]  # per private row, in recorded order: round, release, recorded and re-derived ε
    findings: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    evaluations: int = 0
    eval_noise_multipliers: list[float] = dataclasses.field(default_factory=list)

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
    claims_dp: bool = True
    config: str | None = None  # the run config read, if there was one
    # Merchant-level DP under secagg+ (server.audit.merchant_level); None when the run has none.
    merchant_level: MerchantLevelAudit | None = None

    @property
    def findings(self) -> list[str]:
        own = self.merchant_level.findings if self.merchant_level is not None else []
        return self.ledger_findings + [f"{m.merchant_id}: {f}" for m in self.merchants for f in m.findings] + own

    @property
    def warnings(self) -> list[str]:
        return [f"{m.merchant_id}: {w}" for m in self.merchants for w in m.warnings]

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return finite({
            "run_dir": self.run_dir,
            "passed": self.passed,
            "rounds": self.rounds,
            "tolerance": {"abs": self.tolerance_abs, "rel": self.tolerance_rel},
            "under_report_tolerance": UNDER_REPORT_TOLERANCE,
            "claims_dp": self.claims_dp,
            "config": self.config,
            "findings": self.findings,
            "warnings": self.warnings,
            "merchants": [{**dataclasses.asdict(m), "remaining": m.remaining} for m in self.merchants],
            "merchant_level": self.merchant_level.to_dict() if self.merchant_level is not None else None,
        })


# What a column an older ledger lacks reads as (see server.ledger_schema): schema 1 kept no
# noise source (unmarked); schemas 1 and 2 knew one unit and one release and kept no N; up to
# 4, every ε was accounted for add/remove neighbours.
_OLD_SCHEMA_VALUES = {"noise": "''", "unit": f"'{UNIT_RECORD}'", "release": f"'{RELEASE_UPDATE}'",
                      "unit_count": "0", "expected_batch": "0.0", "neighbours": f"'{NEIGHBOURS_ADD_REMOVE}'"}
_CONTEXT = ("round", "merchant_id", "epsilon_reported", "epsilon_budget", "status", "dp")


def read_rows(ledger_path: Path) -> list[Row]:
    if not ledger_path.is_file():
        raise AuditInputError(f"{ledger_path}: no privacy ledger there")
    try:
        conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
        try:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(spend)")}
            spend = [c if c in columns else f"{_OLD_SCHEMA_VALUES[c]} AS {c}" for c in SPEND_KEYS]
            # rowid order is recording order (the migration to schema 4 kept it): a round's update
            # row comes before its evaluation row, whose ε is the cumulative one after both.
            cursor = conn.execute(f"SELECT {', '.join([*_CONTEXT, *spend])} FROM spend ORDER BY round, rowid")
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
                        dp=bool(context["dp"]), unit_count_kept="unit_count" in columns))
    return rows


def within(recorded: float, derived: float, *, tol_abs: float, tol_rel: float) -> bool:
    return abs(recorded - derived) <= tol_abs + tol_rel * derived


def pld_allowance(steps: int, discretization: float = PLD_DISCRETIZATION) -> float:
    """How far PLD's ε may sit above the true ε of ``steps`` composed steps.

    dp_accounting's PLD is pessimistic: each step's privacy-loss distribution is discretised
    on a grid of Δ = ``discretization`` so that it dominates the true one; rounding each loss
    up moves it by at most Δ, and connect-the-dots (its default) is shown at least as tight
    as that rounding (Doroshenko et al., PETS 2022); truncated tail mass goes to the infinite
    loss. Over k steps the losses add, so δ_PLD(ε) ≤ δ_true(ε - k·Δ): ε_PLD ≤ ε_true + k·Δ,
    and a re-derived ε above budget + k·Δ is truly above budget. Checked against the exact
    Gaussian mechanism (q = 1) in tests/server/test_audit.py.
    """
    return steps * discretization


def _first(rows: list[Row], values: list[float], limit: float) -> int:
    return next(r.round for r, v in zip(rows, values, strict=True) if v > limit)


def audit_merchant(merchant_id: str, rows: list[Row], *, tol_abs: float, tol_rel: float, run_dp: bool | None = None,
                   claim: RunClaim | None = None) -> MerchantAudit:
    """``rows`` in the order recorded (round, then rowid: an update before its round's
    evaluation); every spent row, of either release, composes into the ε re-derived for it and
    the rows after it. ``run_dp``: whether the run claims DP (default: any of these rows is
    private); ``claim``: the run config's privacy keys (default: none known)."""
    claim = claim or RunClaim(path=None)
    run_dp = claims_dp(claim, rows) if run_dp is None else run_dp
    spent = [r for r in rows if r.spent]
    updates = [r for r in spent if r.release != RELEASE_EVALUATION]
    evaluations = [r for r in spent if r.release == RELEASE_EVALUATION]
    private = [r for r in rows if r.dp]
    dp = bool(private)
    delta = (private or rows)[-1].event.delta
    events: list[MechanismEvent] = []
    series: list[dict[str, Any]] = []
    findings: list[str] = []
    warnings: list[str] = []
    unbounded = False  # a spent row's mechanism no accountant can bound (row_findings says which fact)
    for row in rows:
        findings += row_findings(row, run_dp=run_dp, claim=claim)
        missing = unit_count_missing(row) if row.unit_count_kept else None
        if missing:
            findings.append(missing)
        if row.spent:
            try:
                row.event.mechanism.validate()
                events.append(row.event.mechanism)
            except ValueError:
                unbounded = True
        if not row.dp:
            continue
        derived = math.inf if unbounded else epsilon_pld(events, delta) if events else 0.0
        series.append({"round": row.round, "release": row.release, "recorded": row.epsilon_reported,
                       "pld": derived, "budget": row.epsilon_budget})
        gap = row.epsilon_reported - derived
        where = f"round {row.round}" + (" (evaluation)" if row.release == RELEASE_EVALUATION else "")
        said = (f"{where}: recorded ε {row.epsilon_reported:.4f} {{}} ε re-derived from the recorded "
                f"mechanisms ({derived:.4f}, PLD) by {abs(gap):.4f}")
        if not gap >= -UNDER_REPORT_TOLERANCE:  # also NaN, and a private row PLD finds unbounded
            findings.append(said.format("under-reports") + f" (more than {UNDER_REPORT_TOLERANCE} is never allowed)")
        elif not within(row.epsilon_reported, derived, tol_abs=tol_abs, tol_rel=tol_rel):
            warnings.append(said.format("exceeds") + " (over-reported: safe; spend this ledger does not show, "
                            "such as an earlier run on the same data, or another accountant)")
    if len({r.event.delta for r in private}) > 1:
        findings.append(f"δ changed between rounds: {sorted({r.event.delta for r in private})}")
    recorded = private[-1].epsilon_reported if private else 0.0
    budget = min(r.epsilon_budget for r in rows)
    pld = series[-1]["pld"] if series else 0.0
    steps = sum(r.event.mechanism.steps for r in updates)
    composed = sum(r.event.mechanism.steps for r in spent)  # every step PLD composed, evaluations included
    reported = [r.epsilon_reported for r in private]
    if dp and max(reported) > budget:  # no slack: the merchant's own check refuses at > budget
        findings.append(f"over budget: recorded ε {max(reported):.4f} > budget {budget:.4f} "
                        f"(from round {_first(private, reported, budget)})")
    if dp and pld > budget + pld_allowance(composed):
        over = _first(private, [p["pld"] for p in series], budget + pld_allowance(composed))
        findings.append(f"over budget: re-derived ε {pld:.4f} > budget {budget:.4f} (from round {over}; PLD's "
                        f"discretisation accounts for at most {pld_allowance(composed):.4f} of it)")
    unmarked = [r.round for r in spent if r.event.noise != NOISE_SOURCE]
    if unmarked:
        what = "release(s) (updates and evaluations)" if evaluations else "update(s)"
        findings.append(unmarked_finding(len(unmarked), len(spent), f"round(s) {spans(sorted(set(unmarked)))}",
                                         what))
    return MerchantAudit(
        merchant_id=merchant_id,
        rounds_joined=len(updates),
        rounds_refused=sum(1 for r in rows if r.status == "refused"),
        total_steps=steps,
        noise_multipliers=sorted({r.event.mechanism.noise_multiplier for r in updates}),
        sample_rates=sorted({round(r.event.mechanism.sample_rate, 8) for r in updates}),
        max_grad_norms=sorted({r.event.mechanism.max_grad_norm for r in updates}),
        delta=delta,
        epsilon_recorded=recorded if dp else math.inf,
        epsilon_pld=pld if dp else math.inf,
        epsilon_add_remove=((math.inf if unbounded else epsilon_pld(events, delta, neighbours=NEIGHBOURS_ADD_REMOVE)
                             if events else 0.0) if dp else math.inf),
        budget=budget,
        dp=dp,
        series=series,
        findings=findings,
        warnings=warnings,
        evaluations=len(evaluations),
        eval_noise_multipliers=sorted({r.event.mechanism.noise_multiplier for r in evaluations}),
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
    """A merchant's round holds at most one row per release (its update's; its evaluation's);
    every round up to the last holds updates; every merchant the run log says trained in a
    round has an update row there (evaluations are not in the run log's lists)."""
    findings: list[str] = []
    counts: dict[tuple[int, str, str], int] = defaultdict(int)
    for row in rows:
        counts[(row.round, row.merchant_id, row.release)] += 1
    for (rnd, merchant, release), n in sorted(counts.items()):
        if n > 1:
            what = "" if release == RELEASE_UPDATE else f" ({release})"
            findings.append(f"ledger: merchant {merchant} recorded {n} times in round {rnd}{what}")
    updates = [r for r in rows if r.release == RELEASE_UPDATE]
    rounds = {r.round for r in rows}
    if rounds:
        missing = sorted(set(range(1, max(rounds) + 1)) - {r.round for r in updates})
        empty = [rnd for rnd in missing if rnd not in rounds]
        if empty:
            findings.append(f"ledger: no spend recorded for round(s) {empty} (gap)")
        others = [rnd for rnd in missing if rnd in rounds]
        if others:
            findings.append(f"ledger: no update recorded for round(s) {others}, only other releases (gap)")
    by_round: dict[int, dict[str, Row]] = defaultdict(dict)
    for row in updates:
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
    try:
        claim = read_run_claim(run_dir)
    except ConfigReadError as exc:
        raise AuditInputError(str(exc)) from exc
    run_dp = claims_dp(claim, rows)
    by_merchant: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_merchant[row.merchant_id].append(row)
    # sorted() is stable: within a round, the rows keep read_rows' recording order.
    merchants = [audit_merchant(m, sorted(rs, key=lambda r: r.round), tol_abs=tolerance_abs, tol_rel=tolerance_rel,
                                run_dp=run_dp, claim=claim)
                 for m, rs in sorted(by_merchant.items())]
    return AuditReport(run_dir=str(run_dir), merchants=merchants,
                       ledger_findings=ledger_findings(rows, _run_log(run_dir)),
                       tolerance_abs=tolerance_abs, tolerance_rel=tolerance_rel,
                       rounds=max((r.round for r in rows), default=0), claims_dp=run_dp, config=claim.path,
                       merchant_level=audit_merchant_level(run_dir))
