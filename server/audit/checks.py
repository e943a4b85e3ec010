"""The ledger audit's checks of facts: what each row says happened must be possible.

``ledger_audit`` re-derives ε from the recorded mechanisms (the arithmetic); these checks ask
whether the mechanisms themselves are what the run and the merchant's rules allow:

- a run that claims DP releases nothing without it (``dp = 0`` row);
- a private release's event is internally consistent: σ > 0, C > 0, 0 < δ ≤ 1/(10·N) where N
  is recorded;
- an update (release ``"update"``, DP-SGD): q in (0, 1], steps ≥ 1, and q is what the
  merchant's rule gives from the facts it sampled on: q = expected batch / N, with
  1 ≤ expected batch ≤ N (no batch below one unit, none above all of them);
- an evaluation (release ``"evaluation"``, ``client.release``): one Gaussian mechanism on the
  whole held-out set, so q = 1 and steps = 1, N > 0 (the held-out units), and its expected
  batch is N (``SpendEvent.of`` records q·N: every unit is in the release);
- its ε was accounted for replace-one neighbours (``neighbours``): every reply states N, so an
  add/remove ε (what a row recorded before the relation was kept says) is not a guarantee;
- δ agrees with the run config (``RUN_DIR/config.json``) where it names it: it may be the
  merchant's own smaller one. C is not compared with the run's max-grad-norm: a merchant may
  pin its own (``client.policy``), and ε does not depend on C (σ scales with it); only C > 0.

The run config is read as plain JSON, not through ``shared.config.RunConfig``: the audit must
also read a file it would refuse to run, and must not fail on keys a newer version added.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.privacy.events import NEIGHBOURS_REPLACE_ONE, NOISE_SOURCE, RELEASE_EVALUATION
from shared.run_files import CONFIG_FILE

if TYPE_CHECKING:
    from server.audit.ledger_audit import Row

# Float error allowed where the merchant computed a value from another: expected_batch = q·N
# is one multiplication, so q and expected_batch / N agree to a few ulps; 1e-9 (relative) is
# far above that and far below any q a merchant could use instead (q = 1/k, k ≤ N).
FLOAT_REL = 1e-9
# δ must be well below 1/N: at δ ≈ 1/N a mechanism that publishes one random record is (0, δ)-DP.
DELTA_PER_UNIT = 10


class ConfigReadError(ValueError):
    """``config.json`` is there but cannot be read; the message names it and the key."""


@dataclasses.dataclass(frozen=True)
class RunClaim:
    """What the run config says about privacy; None where there is no config or no such key."""

    path: str | None
    dp: bool | None = None
    target_delta: float | None = None


def read_run_claim(run_dir: Path) -> RunClaim:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return RunClaim(path=None)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigReadError(f"{path}: not a readable run config ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigReadError(f"{path}: not a run config (a JSON object)")

    def value(key: str, kind: type) -> Any:
        found = raw.get(key, raw.get(key.replace("-", "_")))
        if found is None:
            return None
        if kind is bool and isinstance(found, bool):
            return found
        if kind is float and isinstance(found, int | float) and not isinstance(found, bool) and math.isfinite(found):
            return float(found)
        raise ConfigReadError(f"{path}: run-config key {key!r} = {found!r} is not a {kind.__name__}")

    return RunClaim(path=str(path), dp=value("dp", bool), target_delta=value("target-delta", float))


def claims_dp(claim: RunClaim, rows: list[Row]) -> bool:
    """The run's config says so; without one (or without the key), any private row says so."""
    return claim.dp if claim.dp is not None else any(r.dp for r in rows)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=FLOAT_REL, abs_tol=0.0)


def row_findings(row: Row, *, run_dp: bool, claim: RunClaim) -> list[str]:
    """What is wrong with one row's facts; each finding starts with its round (the caller
    prefixes the merchant)."""
    evaluation = row.event.release == RELEASE_EVALUATION
    what = "evaluation" if evaluation else "update"
    where = f"round {row.round}" + (" (evaluation)" if evaluation else "")
    if not row.dp:
        if not run_dp:
            return []
        said = f"{CONFIG_FILE} says dp = true" if claim.dp else "other rows of this run are private"
        return [f"{where}: non-private row (dp = 0, σ {row.event.mechanism.noise_multiplier:g}, "
                f"ε {row.epsilon_reported:g}) in a run that claims DP ({said})"]
    if row.status == "refused":
        return []  # nothing released, nothing to check (the ledger's CHECKs keep steps = 0)
    e, m = row.event, row.event.mechanism
    findings = []
    if not (math.isfinite(m.noise_multiplier) and m.noise_multiplier > 0):
        findings.append(f"{where}: a private {what} with σ = {m.noise_multiplier:g} (no noise)")
    if evaluation:
        # client.release: one Gaussian mechanism on the whole held-out set (EvalSettings.mechanism).
        if m.sample_rate != 1.0:
            findings.append(f"{where}: an evaluation with sample rate q = {m.sample_rate:g}; a Gaussian release "
                            "of the whole held-out set has q = 1")
        if m.steps != 1:
            findings.append(f"{where}: an evaluation with {m.steps} steps; a Gaussian release is one step")
    else:
        if not 0 < m.sample_rate <= 1:
            findings.append(f"{where}: sample rate q = {m.sample_rate:g} outside (0, 1]")
        if m.steps < 1:
            findings.append(f"{where}: a released update with {m.steps} steps")
    if not (math.isfinite(m.max_grad_norm) and m.max_grad_norm > 0):
        findings.append(f"{where}: clipping norm C = {m.max_grad_norm:g} (no clipping bound)")
    if not 0 < e.delta < 1:
        findings.append(f"{where}: δ = {e.delta:g} outside (0, 1)")
    if e.neighbours != NEIGHBOURS_REPLACE_ONE:
        findings.append(f"{where}: ε accounted for {e.neighbours!r} neighbours; every reply states N (the unit "
                        "count) exactly, which tells datasets of other sizes apart, so only "
                        f"{NEIGHBOURS_REPLACE_ONE!r} neighbours are protected (docs/privacy.md, \"N is public\")")
    n = e.unit_count
    if evaluation and n <= 0:
        # Evaluation rows exist from schema 4 on, which keeps N: none recorded is not an old row.
        findings.append(f"{where}: an evaluation with N = {n} held-out {e.unit}s recorded")
    if n > 0:
        if e.delta > 1 / (DELTA_PER_UNIT * n):
            findings.append(f"{where}: δ = {e.delta:g} too large for N = {n} {e.unit}s "
                            f"(must be ≤ 1/({DELTA_PER_UNIT}·N) = {1 / (DELTA_PER_UNIT * n):.3g})")
        if evaluation:
            if not _close(e.expected_batch, n):
                findings.append(f"{where}: expected batch {e.expected_batch:g} is not N = {n} (an evaluation "
                                "releases every held-out unit: q·N = N)")
        else:
            if not _close(m.sample_rate, e.expected_batch / n):
                findings.append(f"{where}: sample rate q = {m.sample_rate:.6g} is not expected batch / N = "
                                f"{e.expected_batch:g} / {n} = {e.expected_batch / n:.6g}")
            if not 1 - FLOAT_REL <= e.expected_batch <= n * (1 + FLOAT_REL):
                findings.append(f"{where}: expected batch {e.expected_batch:g} outside [1, N = {n}]")
    if claim.target_delta is not None and e.delta > claim.target_delta * (1 + FLOAT_REL):
        findings.append(f"{where}: δ = {e.delta:g} above the run config's target-delta {claim.target_delta:g}")
    return findings


def unit_count_missing(row: Row) -> str | None:
    """A private update in a ledger that keeps N but recorded none: its q cannot be checked.
    (An evaluation without N is ``row_findings``'s: its rows always keep N.)"""
    if (row.dp and row.status != "refused" and row.event.unit_count == 0
            and row.event.release != RELEASE_EVALUATION):
        return f"round {row.round}: a private update with N = 0 recorded (its q cannot be checked)"
    return None


def unmarked_finding(count: int, total: int, where: str, what: str) -> str:
    # Versions whose noise repeated across calls never marked their spend; neither did the
    # first versions with fresh noise, so an unmarked call is unproven, not proven bad.
    return (f"{count} of {total} {what} ({where}) carry no noise-source mark {NOISE_SOURCE!r}: recorded by a "
            "version that did not mark its noise, as every version whose noise repeated across calls was, "
            "so the ε reported for them is not shown to hold")


def spans(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
