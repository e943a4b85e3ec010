"""Audit of a run's merchant-level DP (``aggregation = "secagg+"`` with ``merchant-epsilon``).

The ledger's ``merchant_level`` table holds one row per secure round whose sum the server
unmasked: the noise multiplier σ_m and clipping norm C_m of that release, how many merchants'
vectors the sum held, and the run's merchant-level ε the server recorded after it. This module
re-derives that ε from the rows alone (``shared.privacy.merchant_level``: PLD, replace-one,
one Gaussian release per row) and fails the audit when:

- a recorded ε is below the re-derived one by more than ``UNDER_REPORT_TOLERANCE``;
- the re-derived ε exceeds the run config's ``merchant-epsilon`` (beyond PLD's own
  discretisation allowance), or a row's σ_m, C_m or δ is not what that config plans;
- a row's sum held fewer merchants than one (nothing was unmasked) or the run config has no
  merchant-level DP while the ledger has rows, or the reverse: the config asks for it, the run
  log shows secure rounds that aggregated, and no row records them.

The table is read with plain SQL, as the spend table is (``server.audit.ledger_audit``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

from shared.config import ConfigError, RunConfig
from shared.privacy import merchant_level
from shared.run_files import CONFIG_FILE, LEDGER_FILE, METRICS_FILE

UNDER_REPORT_TOLERANCE = 0.001  # as for the spend rows: the server computes the very same PLD
ALLOWANCE = 1e-3  # PLD's discretisation: one step per row on a 1e-3 grid


@dataclasses.dataclass
class MerchantLevelAudit:
    rounds: list[int]
    noise_multiplier: float
    clip_norm: float
    delta: float
    epsilon_recorded: float
    epsilon_derived: float
    target: float
    findings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_rows(ledger_path: Path) -> list[merchant_level.MerchantLevelRound]:
    """The table's rows in round order; none when the ledger predates the table."""
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'merchant_level'").fetchone():
            return []
        names = ("run_id", "round", "contributors", "noise_multiplier", "clip_norm", "delta", "neighbours", "epsilon")
        cursor = conn.execute(f"SELECT {', '.join(names)} FROM merchant_level ORDER BY round")
        return [merchant_level.MerchantLevelRound(**dict(zip(names, values, strict=True))) for values in cursor]
    finally:
        conn.close()


def _config(run_dir: Path) -> RunConfig | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return RunConfig.from_mapping(json.loads(path.read_text(encoding="utf-8")))
    except (ConfigError, ValueError):
        return None  # the spend audit reports an unreadable config; this part then has no plan to compare


def _aggregated_rounds(run_dir: Path) -> list[int]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [int(r["round"]) for r in rows if r.get("aggregated")]


def audit_merchant_level(run_dir: Path) -> MerchantLevelAudit | None:
    """The merchant-level audit of ``run_dir``; None when the run neither claims nor records it."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / LEDGER_FILE)
    config = _config(run_dir)
    target = config.merchant_epsilon if config is not None else 0.0
    if not rows and target <= 0:
        return None
    findings: list[str] = []
    derived = 0.0
    for i, row in enumerate(rows):
        derived = merchant_level.epsilon(rows[: i + 1], row.delta)
        if row.epsilon < derived - UNDER_REPORT_TOLERANCE:
            findings.append(f"merchant-level round {row.round}: recorded ε {row.epsilon:.4f} is below the re-derived "
                            f"{derived:.4f}")
        if row.contributors < 1:
            findings.append(f"merchant-level round {row.round}: the sum held {row.contributors} merchants' vectors")
    if rows and target <= 0:
        findings.append("merchant-level rows recorded, but the run config asks for no merchant-level DP "
                        "(merchant-epsilon = 0)")
    if config is not None and target > 0:
        planned = merchant_level.noise_multiplier(config)
        for row in rows:
            if (row.noise_multiplier, row.clip_norm, row.delta) != (planned, config.merchant_clip_norm,
                                                                    config.merchant_delta):
                findings.append(f"merchant-level round {row.round}: σ_m {row.noise_multiplier:g}, "
                                f"C_m {row.clip_norm:g}, δ {row.delta:g}; the run config plans σ_m {planned:g}, C_m "
                                f"{config.merchant_clip_norm:g}, δ {config.merchant_delta:g}")
        if derived > target + ALLOWANCE * max(1, len(rows)):
            findings.append(f"merchant-level ε {derived:.4f} re-derived exceeds the run's merchant-epsilon {target:g}")
        unrecorded = sorted(set(_aggregated_rounds(run_dir)) - {r.round for r in rows})
        if unrecorded:
            findings.append(f"merchant-level DP: round(s) {unrecorded} aggregated (run log) with no merchant-level row")
    last = rows[-1] if rows else None
    return MerchantLevelAudit(
        rounds=[r.round for r in rows], noise_multiplier=last.noise_multiplier if last else 0.0,
        clip_norm=last.clip_norm if last else 0.0, delta=last.delta if last else 0.0,
        epsilon_recorded=last.epsilon if last else 0.0, epsilon_derived=derived, target=target, findings=findings)
