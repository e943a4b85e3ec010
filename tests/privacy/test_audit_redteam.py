"""Red team for ``fedshop audit RUN_DIR``: tampered ledgers the audit must fail, by name.

Each scenario builds a realistic finished run (``tests.helpers.audit_runs.build_run``: ledger,
each merchant's own state, run log, run config), then rewrites the SQLite file directly as an
attacker with file access could: the append-only triggers are dropped first
(``audit_runs.tamper``). The ``scenario_*`` functions return the tampered run folder, so the
same attacks can be replayed against another version of the audit. Every tampered scenario
here passed the audit before it checked facts (server/audit at 58d0b79); the untampered run
must keep passing. The evaluation scenarios hold two releases per merchant per round (an
update, then its evaluation): an audit that counted (round, merchant) failed even the honest
one, so what they test is that honesty passes and a left-out evaluation does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.audit import audit_run
from shared.privacy import accounting
from shared.privacy.events import MechanismEvent
from simulations.cli import main
from tests.helpers.audit_runs import MECHANISMS, ROUNDS, build_run, tamper

# A mechanism whose third round lands at ε 7.6239 (PLD, replace-one) against a budget of 8.
NEAR_BUDGET = MechanismEvent(noise_multiplier=0.619, sample_rate=0.05, steps=10, max_grad_norm=1.0)


def audit_exit(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["audit", str(run)])
    return status, capsys.readouterr().out


# ------------------------------------------------------------------------------ the attacks
def scenario_untampered(tmp_path: Path) -> Path:
    return build_run(tmp_path / "run")


def scenario_non_private_row_appended(tmp_path: Path) -> Path:
    """m1's round-3 row copied as a round 4 that says: no DP, σ 0, ε 0."""
    run = build_run(tmp_path / "run")
    with tamper(run) as conn:
        conn.execute("CREATE TEMP TABLE copied AS SELECT * FROM spend WHERE merchant_id = 'm1' AND round = 3")
        conn.execute("UPDATE copied SET round = 4, dp = 0, noise_multiplier = 0.0, epsilon_reported = 0.0")
        conn.execute("INSERT INTO spend SELECT * FROM copied")
    return run


def scenario_last_row_epsilon_times_099(tmp_path: Path) -> Path:
    """The ledger's last row (m3, round 3) records 99 % of its ε."""
    run = build_run(tmp_path / "run")
    with tamper(run) as conn:
        conn.execute("UPDATE spend SET epsilon_reported = epsilon_reported * 0.99 "
                     "WHERE rowid = (SELECT max(rowid) FROM spend)")
    return run


def scenario_epsilon_762_recorded_as_743(tmp_path: Path) -> Path:
    """m1 spent ε 7.62 by round 3; its row says 7.43 (within the old 0.05 + 2 %)."""
    run = build_run(tmp_path / "run", mechanisms={"m1": NEAR_BUDGET})
    with tamper(run) as conn:
        query = "SELECT epsilon_reported FROM spend WHERE merchant_id = 'm1' AND round = 3"
        (recorded,) = conn.execute(query).fetchone()
        assert round(recorded, 2) == 7.62
        conn.execute("UPDATE spend SET epsilon_reported = 7.43 WHERE merchant_id = 'm1' AND round = 3")
    return run


def scenario_over_budget_by_004(tmp_path: Path) -> Path:
    """m2 spent ε 0.04 more than its budget (by PLD); its last row records exactly the budget."""
    spent = accounting.epsilon_pld([MECHANISMS["m2"]] * ROUNDS, 1e-5)
    budget = round(spent - 0.04, 4)
    run = build_run(tmp_path / "run", budgets={"m2": budget})
    with tamper(run) as conn:
        conn.execute("UPDATE spend SET epsilon_reported = ? WHERE merchant_id = 'm2' AND round = ?", (budget, ROUNDS))
    return run


def scenario_sample_rate_halved(tmp_path: Path) -> Path:
    """m3's rows claim q = 0.01 where it sampled 10 of 500 (q = 0.02), with ε re-computed to match:
    the arithmetic is consistent, only the facts give it away."""
    run = build_run(tmp_path / "run")
    halved = MechanismEvent(noise_multiplier=1.0, sample_rate=0.01, steps=20, max_grad_norm=1.0)
    with tamper(run) as conn:
        for rnd in range(1, ROUNDS + 1):
            eps = accounting.epsilon([halved] * rnd, 1e-5)
            conn.execute("UPDATE spend SET sample_rate = 0.01, epsilon_reported = ? "
                         "WHERE merchant_id = 'm3' AND round = ?", (eps, rnd))
    return run


def scenario_untampered_with_evaluations(tmp_path: Path) -> Path:
    return build_run(tmp_path / "run", evaluations=True)


def scenario_evaluation_left_out_of_epsilon(tmp_path: Path) -> Path:
    """m2's round-2 evaluation row records the ε of its round-2 update alone, as if the noised
    metrics had cost nothing; every other row (round 3's included) is honest."""
    run = build_run(tmp_path / "run", evaluations=True)
    with tamper(run) as conn:
        (update_eps,) = conn.execute("SELECT epsilon_reported FROM spend "
                                     "WHERE merchant_id = 'm2' AND round = 2 AND release = 'update'").fetchone()
        conn.execute("UPDATE spend SET epsilon_reported = ? "
                     "WHERE merchant_id = 'm2' AND round = 2 AND release = 'evaluation'", (update_eps,))
    return run


# ------------------------------------------------------------------------------ the verdicts
def test_untampered_run_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = audit_run(scenario_untampered(tmp_path))

    assert report.passed and report.findings == [] and report.warnings == []
    assert report.claims_dp and report.config is not None
    assert audit_exit(tmp_path / "run", capsys)[0] == 0


def test_non_private_row_appended_fails_naming_merchant_and_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = scenario_non_private_row_appended(tmp_path)

    report = audit_run(run)

    assert not report.passed
    assert [f for f in report.findings if "non-private" in f] == [
        "m1: round 4: non-private row (dp = 0, σ 0, ε 0) in a run that claims DP (config.json says dp = true)"]
    m1 = next(m for m in report.merchants if m.merchant_id == "m1")
    assert m1.dp and m1.rounds_joined == ROUNDS  # still audited as the private merchant it was
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m1: round 4: non-private row" in out


def test_non_private_row_appended_fails_without_a_run_config(tmp_path: Path) -> None:
    # An older run folder has no config.json: the run's private rows are its claim.
    run = scenario_non_private_row_appended(tmp_path)
    (run / "config.json").unlink()

    report = audit_run(run)

    assert any(f.startswith("m1: round 4: non-private row") and "other rows of this run are private" in f
               for f in report.findings), report.findings


def test_last_row_epsilon_times_099_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = scenario_last_row_epsilon_times_099(tmp_path)

    report = audit_run(run)

    assert len(report.findings) == 1, report.findings
    assert report.findings[0].startswith("m3: round 3: recorded ε") and "under-reports" in report.findings[0]
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m3: round 3: recorded ε" in out


def test_epsilon_762_recorded_as_743_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = scenario_epsilon_762_recorded_as_743(tmp_path)

    report = audit_run(run)

    assert report.findings == [report.findings[0]]
    assert report.findings[0].startswith("m1: round 3: recorded ε 7.4300 under-reports ε re-derived from the "
                                         "recorded mechanisms (7.62")
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m1: round 3: recorded ε 7.4300 under-reports" in out


def test_over_budget_by_004_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = scenario_over_budget_by_004(tmp_path)

    report = audit_run(run)

    over = [f for f in report.findings if "over budget" in f]
    assert len(over) == 1 and over[0].startswith("m2: over budget: re-derived ε 2.7790 > budget 2.7390 (from round 3;")
    assert all(f.startswith("m2: ") for f in report.findings)
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m2: over budget: re-derived ε" in out


def test_sample_rate_inconsistent_with_unit_count_and_batch_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = scenario_sample_rate_halved(tmp_path)

    report = audit_run(run)

    assert report.findings == [
        f"m3: round {rnd}: sample rate q = 0.01 is not expected batch / N = 10 / 500 = 0.02" for rnd in (1, 2, 3)]
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m3: round 2: sample rate q = 0.01" in out


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_untampered_run_with_evaluations_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = audit_run(scenario_untampered_with_evaluations(tmp_path))

    assert report.passed and report.findings == [] and report.warnings == []
    assert all(m.evaluations == ROUNDS for m in report.merchants)
    assert audit_exit(tmp_path / "run", capsys)[0] == 0


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_evaluation_left_out_of_epsilon_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = scenario_evaluation_left_out_of_epsilon(tmp_path)

    report = audit_run(run)

    assert len(report.findings) == 1, report.findings
    assert report.findings[0].startswith("m2: round 2 (evaluation): recorded ε")
    assert "under-reports ε re-derived" in report.findings[0]
    status, out = audit_exit(run, capsys)
    assert status == 1 and "m2: round 2 (evaluation): recorded ε" in out

