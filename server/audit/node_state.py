"""Audit of a merchant's own persisted privacy state, alone or against a run's ledger.

The node's state (``shared.privacy.budget.PrivacyState``) is the merchant's lifetime record;
the ledger covers one run. ``audit_node_state`` re-accounts the state (PLD for replace-one
neighbours, as the merchant does; add/remove beside it for reference) and, given a run
folder, checks that the ledger holds exactly the spend the node recorded in that run: each
of the node's entries of that run (its update's, its evaluation's;
``SpendEntry.event.release``) against the ledger's row of the same round and release.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.audit.checks import spans, unmarked_finding
from server.audit.ledger_audit import TOLERANCE_ABS, TOLERANCE_REL, AuditInputError, read_rows, within
from shared.jsonable import finite
from shared.privacy.accounting import epsilon_pld
from shared.privacy.events import NEIGHBOURS_ADD_REMOVE, NEIGHBOURS_REPLACE_ONE, NOISE_SOURCE, RELEASE_UPDATE
from shared.run_files import LEDGER_FILE


@dataclasses.dataclass
class NodeStateAudit:
    path: str
    merchant_id: str
    budget: float
    delta: float
    calls: int
    total_steps: int
    epsilon_pld: float  # replace-one neighbours: the guarantee
    epsilon_add_remove: float  # reference only
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
    agree on every call of that run (matched by run id, round and release): same mechanism,
    same ε.
    """
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
    eps_pld = epsilon_pld(events, state.target_delta)
    if eps_pld > state.target_epsilon + 1e-9:
        findings.append(f"over budget: ε {eps_pld:.4f} > budget {state.target_epsilon:.4f}")
    old = [i for i, e in enumerate(state.entries) if e.event.neighbours != NEIGHBOURS_REPLACE_ONE]
    if old:
        findings.append(f"{len(old)} of {len(state.entries)} entries (entries {spans(old)}) were accounted for "
                        f"{NEIGHBOURS_ADD_REMOVE!r} neighbours when recorded, which the stated N does not allow; "
                        f"the ε above re-accounts them for {NEIGHBOURS_REPLACE_ONE!r} (the replies then reported "
                        "less)")
    unmarked = [i for i, e in enumerate(state.entries) if e.event.noise != NOISE_SOURCE]
    if unmarked:
        findings.append(unmarked_finding(len(unmarked), len(state.entries), f"entries {spans(unmarked)}", "call(s)"))
    if run_dir is not None:
        findings += _compare_with_ledger(state, Path(run_dir), tolerance_abs=tolerance_abs,
                                         tolerance_rel=tolerance_rel)
    return NodeStateAudit(path=str(state_path), merchant_id=merchant_id, budget=state.target_epsilon,
                          delta=state.target_delta, calls=len(state.entries), total_steps=state.total_steps,
                          epsilon_pld=eps_pld,
                          epsilon_add_remove=epsilon_pld(events, state.target_delta, neighbours=NEIGHBOURS_ADD_REMOVE),
                          compared_with=str(run_dir) if run_dir else None, findings=findings)


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
    # A (round, release) can hold several of the merchant's calls: one whose reply never reached
    # the ledger (server crash) and the retry of that round. Every call is spend; the ledger has
    # one row per round and release, so extra calls are spend it does not show.
    mine: dict[tuple[int, str], list[tuple[int, Any]]] = defaultdict(list)
    for i, e in enumerate(state.entries):
        if e.run_id == run_id:
            mine[(e.round, e.event.release)].append((i, e))
    ledger_spent = {(r.round, r.release): r for r in rows if r.spent}
    for key in sorted(set(mine) | set(ledger_spent), key=lambda k: (k[0], k[1] != RELEASE_UPDATE, k[1])):
        rnd, release = key
        where = f"round {rnd}" if release == RELEASE_UPDATE else f"round {rnd} ({release})"
        calls = "training calls" if release == RELEASE_UPDATE else f"{release} calls"
        if key not in ledger_spent:
            findings.append(f"{where}: the merchant recorded spend the ledger does not show")
            continue
        if key not in mine:
            findings.append(f"{where}: the ledger shows spend the merchant's own record lacks")
            continue
        if len(mine[key]) > 1:
            findings.append(f"{where}: the merchant recorded {len(mine[key])} {calls}; the ledger shows "
                            f"one, so {len(mine[key]) - 1} call(s) of spend are not on the ledger")
        index, entry = mine[key][-1]  # a retried round's ledger row is the last call's
        row = ledger_spent[key]
        if entry.event.mechanism != row.event.mechanism:
            findings.append(f"{where}: mechanism differs (merchant {entry.event.mechanism}, "
                            f"ledger {row.event.mechanism})")
        # What the merchant had counted when it reported this call: its calls so far, plus any
        # reservation a crashed call left before it (counted as spent from then on).
        counted = [e.event.mechanism for e in state.entries[: index + 1]]
        counted += [r.mechanism for r in state.reservations if r.reserved_at <= entry.recorded_at]
        own = accounting.epsilon(counted, state.target_delta)
        if not within(row.epsilon_reported, own, tol_abs=tolerance_abs, tol_rel=tolerance_rel):
            findings.append(f"{where}: ledger ε {row.epsilon_reported:.4f} != merchant's own ε {own:.4f}")
    return findings
