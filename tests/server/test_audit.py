"""server.audit and ``fedshop audit``: re-derive ε from a run's ledger and catch what is wrong.

Run directories are built as a finished run leaves them (tests.helpers.audit_runs): a
PrivacyLedger, each merchant's PrivacyState (whose PRV ε the ledger records) and
metrics.jsonl. Tampering uses raw sqlite3 after dropping the append-only triggers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from statistics import NormalDist

import pytest

from server.audit import (
    AuditInputError,
    AuditReport,
    MerchantAudit,
    audit_node_state,
    audit_run,
    pld_allowance,
    read_rows,
)
from server.ledger import PrivacyLedger
from shared.privacy import accounting
from shared.privacy.accounting import epsilon_pld
from shared.privacy.budget import PrivacyState
from shared.privacy.events import NOISE_SOURCE, MechanismEvent, SpendEvent
from shared.run_files import LEDGER_FILE
from simulations.cli import main
from tests.helpers.audit_runs import (
    BUDGET,
    DELTA,
    EVAL_MECHANISM,
    EVAL_UNIT_COUNTS,
    MECHANISMS,
    MERCHANTS,
    ROUNDS,
    RUN_ID,
    UNIT_COUNTS,
    as_schema_1,
    as_schema_2,
    build_run,
    state_path,
    tamper,
)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["audit", *argv])
    return status, capsys.readouterr().out


def by_merchant(report: AuditReport) -> dict[str, MerchantAudit]:
    return {m.merchant_id: m for m in report.merchants}


def findings_about(report: AuditReport, merchant: str) -> list[str]:
    return [f for f in report.findings if merchant in f]


# ------------------------------------------------------------------------------ clean run
def test_clean_run_passes_and_recorded_epsilon_agrees_with_pld(run_dir: Path) -> None:
    report = audit_run(run_dir)

    assert report.passed, report.findings
    assert report.findings == []
    assert report.rounds == ROUNDS
    assert [m.merchant_id for m in report.merchants] == list(MERCHANTS)
    for m in report.merchants:
        mechanism = MECHANISMS[m.merchant_id]
        events = [mechanism] * ROUNDS
        own = PrivacyState.open(state_path(run_dir, m.merchant_id), merchant_id=m.merchant_id,
                                target_epsilon=BUDGET, target_delta=DELTA)
        assert m.rounds_joined == ROUNDS and m.rounds_refused == 0
        assert m.total_steps == ROUNDS * mechanism.steps
        assert m.delta == DELTA and m.budget == BUDGET and m.dp
        # The recorded ε is the merchant's own; the audit re-derives it from the recorded mechanisms.
        assert m.epsilon_recorded == pytest.approx(own.epsilon(), rel=1e-12)
        assert m.epsilon_pld == pytest.approx(epsilon_pld(events, DELTA), rel=1e-9)
        assert m.epsilon_recorded == pytest.approx(m.epsilon_pld, abs=1e-6)  # the same PLD, replace-one
        # Add/remove (reference only) is cheaper: what stating N costs.
        assert m.epsilon_add_remove == pytest.approx(epsilon_pld(events, DELTA, neighbours="add-remove"), rel=1e-9)
        assert m.epsilon_add_remove < m.epsilon_pld
        assert m.remaining == pytest.approx(BUDGET - m.epsilon_recorded)
        # One point per round, cumulative: ε grows every round and each matches PLD.
        assert [p["round"] for p in m.series] == [1, 2, 3]
        assert all(a["pld"] < b["pld"] and a["recorded"] < b["recorded"] for a, b in itertools.pairwise(m.series))
        for p in m.series:
            assert p["recorded"] == pytest.approx(p["pld"], abs=1e-6)


def test_cli_clean_run_exits_0_and_prints_the_table(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = cli(capsys, str(run_dir))

    assert status == 0, out
    assert "audit PASSED" in out
    for merchant in MERCHANTS:
        assert merchant in out


def test_cli_json_has_every_per_merchant_field(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = cli(capsys, str(run_dir), "--json")

    assert status == 0
    data = json.loads(out)
    assert data["passed"] is True and data["findings"] == [] and data["rounds"] == ROUNDS
    assert data["tolerance"] == {"abs": 0.05, "rel": 0.02}
    merchants = {m["merchant_id"]: m for m in data["merchants"]}
    assert sorted(merchants) == sorted(MERCHANTS)
    for merchant, m in merchants.items():
        mechanism = MECHANISMS[merchant]
        assert m["rounds_joined"] == ROUNDS
        assert m["total_steps"] == ROUNDS * mechanism.steps
        assert m["noise_multipliers"] == [mechanism.noise_multiplier]
        assert m["sample_rates"] == [mechanism.sample_rate]
        assert m["max_grad_norms"] == [mechanism.max_grad_norm]
        assert m["delta"] == DELTA
        assert m["budget"] == BUDGET
        for key in ("epsilon_recorded", "epsilon_pld", "epsilon_add_remove", "remaining"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert m["epsilon_add_remove"] < m["epsilon_pld"]
        assert m["remaining"] == pytest.approx(BUDGET - m["epsilon_recorded"])
        assert len(m["series"]) == ROUNDS
    assert merchants["m3"]["sample_rates"] == [0.02] and merchants["m3"]["total_steps"] == 60


def test_missing_or_foreign_ledger_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AuditInputError, match="no privacy ledger"):
        audit_run(tmp_path)
    (tmp_path / LEDGER_FILE).write_bytes(b"not a database, just some bytes" * 100)
    with pytest.raises(AuditInputError, match="not a readable privacy ledger"):
        audit_run(tmp_path)
    capsys.readouterr()
    assert main(["audit", str(tmp_path)]) == 2
    assert "fedshop: error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------ over budget
def test_over_budget_merchant_fails_and_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # m2's own budget is 2.0; its client committed round 3 anyway (ε ≈ 2.25): the audit must say so.
    run = build_run(tmp_path / "run", budgets={"m2": 2.0})

    report = audit_run(run)

    assert not report.passed
    assert findings_about(report, "m1") == [] and findings_about(report, "m3") == []
    m2 = by_merchant(report)["m2"]
    assert m2.epsilon_recorded > 2.0 and m2.budget == 2.0 and m2.remaining == 0.0
    assert any(f.startswith("m2: over budget: recorded ε") for f in report.findings), report.findings
    status, out = cli(capsys, str(run), "--json")
    assert status == 1
    data = json.loads(out)
    assert data["passed"] is False
    assert any("m2" in f and "over budget" in f for f in data["findings"])
    status, out = cli(capsys, str(run))
    assert status == 1 and "audit FAILED" in out and "m2: over budget" in out


# ------------------------------------------------------------------------------ tampering
def test_tampered_row_removed_is_caught(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tamper(run_dir) as conn:
        conn.execute("DELETE FROM spend WHERE merchant_id = 'm2' AND round = 2")

    report = audit_run(run_dir)

    assert not report.passed
    m2 = findings_about(report, "m2")
    # m2's round-3 ε (3 calls) no longer matches the 2 calls the ledger shows: over-reported,
    # so a warning (recorded above re-derived is safe), not a finding...
    assert any(w.startswith("m2: round 3: recorded ε") and "re-derived" in w for w in report.warnings), report.warnings
    # ...and the run log says m2 trained in round 2.
    assert any("merchant m2 trained in round 2 (run log)" in f for f in m2), m2
    assert findings_about(report, "m1") == [] and findings_about(report, "m3") == []
    assert not any("gap" in f for f in report.findings)  # round 2 still has m1 and m3
    status, out = cli(capsys, str(run_dir))
    assert status == 1 and "audit FAILED" in out


def test_tampered_row_duplicated_is_caught(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tamper(run_dir) as conn:
        conn.execute("CREATE TABLE spend2 AS SELECT * FROM spend")
        conn.execute("INSERT INTO spend2 SELECT * FROM spend WHERE merchant_id = 'm1' AND round = 2")
        conn.execute("DROP TABLE spend")
        conn.execute("ALTER TABLE spend2 RENAME TO spend")
        assert conn.execute("SELECT count(*) FROM spend WHERE merchant_id = 'm1' AND round = 2").fetchone() == (2,)

    report = audit_run(run_dir)

    assert not report.passed
    assert "ledger: merchant m1 recorded 2 times in round 2" in report.findings
    # The duplicate also counts as spend: from then on m1's recorded ε is below the re-derived one.
    assert any(f.startswith("m1: round 3: recorded ε") and "under-reports" in f for f in report.findings)
    assert findings_about(report, "m2") == [] and findings_about(report, "m3") == []
    status, out = cli(capsys, str(run_dir), "--json")
    assert status == 1
    assert "ledger: merchant m1 recorded 2 times in round 2" in json.loads(out)["findings"]


def test_tampered_noise_multiplier_is_caught_for_that_merchant_and_round(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tamper(run_dir) as conn:
        changed = conn.execute(
            "UPDATE spend SET noise_multiplier = 2.0 WHERE merchant_id = 'm1' AND round = 2 AND noise_multiplier = 1.0"
        ).rowcount
    assert changed == 1

    report = audit_run(run_dir)

    # More noise on paper means less ε re-derived: the recorded ε now "exceeds" it. That is
    # over-reporting, safe for the claim: a warning, not a failure (the node-state audit, which
    # compares mechanisms, fails it: test_node_state_catches_a_ledger_mechanism_that_differs).
    assert report.passed, report.findings
    m1 = [w for w in report.warnings if w.startswith("m1: ")]
    assert any(w.startswith("m1: round 2: recorded ε") and "exceeds ε re-derived" in w for w in m1), m1
    assert not any(w.startswith("m1: round 1:") for w in m1)  # round 1 is untouched
    assert by_merchant(report)["m1"].noise_multipliers == [1.0, 2.0]
    assert findings_about(report, "m2") == [] and findings_about(report, "m3") == []
    assert not any(w.startswith(("m2", "m3")) for w in report.warnings)
    status, out = cli(capsys, str(run_dir))
    assert status == 0 and "m1: round 2: recorded ε" in out and "warning(s) (not failures)" in out


def test_tampered_noise_multiplier_lowered_fails_for_that_merchant_and_rounds(run_dir: Path) -> None:
    # Less noise on paper than the merchant accounted: the ledger's own mechanisms give more ε
    # than it records, from that round on.
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 0.8 WHERE merchant_id = 'm1' AND round = 2")

    report = audit_run(run_dir)

    assert [f.split(" recorded ε")[0] for f in report.findings] == ["m1: round 2:", "m1: round 3:"]
    assert all("under-reports ε re-derived" in f for f in report.findings)


def test_tampered_whole_round_removed_is_a_gap(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tamper(run_dir) as conn:
        assert conn.execute("DELETE FROM spend WHERE round = 2").rowcount == len(MERCHANTS)

    report = audit_run(run_dir)

    assert not report.passed
    assert "ledger: no spend recorded for round(s) [2] (gap)" in report.findings
    for merchant in MERCHANTS:
        assert any(f"merchant {merchant} trained in round 2 (run log)" in f for f in report.findings)
    status, out = cli(capsys, str(run_dir))
    assert status == 1 and "(gap)" in out


def test_last_round_removed_is_caught_by_the_run_log(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without the run log nothing in the ledger itself would show a missing last round.
    with tamper(run_dir) as conn:
        conn.execute("DELETE FROM spend WHERE round = 3")

    report = audit_run(run_dir)

    assert report.rounds == 2
    assert sorted(report.findings) == sorted(
        f"ledger: merchant {m} trained in round 3 (run log) but the ledger has no spend for it" for m in MERCHANTS
    )
    assert cli(capsys, str(run_dir))[0] == 1


def test_under_reported_epsilon_is_caught(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The classic accountant bug (DESIGN.md): a fresh accountant per round reports one round's
    # ε as the total. Here m3's round-3 row claims only its round-1 ε.
    with tamper(run_dir) as conn:
        (first,) = conn.execute("SELECT epsilon_reported FROM spend WHERE merchant_id = 'm3' AND round = 1").fetchone()
        conn.execute("UPDATE spend SET epsilon_reported = ? WHERE merchant_id = 'm3' AND round = 3", (first,))

    report = audit_run(run_dir)

    assert len(report.findings) == 1, report.findings
    assert report.findings[0].startswith("m3: round 3: recorded ε") and "under-reports" in report.findings[0]
    assert cli(capsys, str(run_dir))[0] == 1


def test_tolerance_options_are_applied(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An honest row re-derives exactly, so nothing is flagged at any tolerance ...
    assert audit_run(run_dir, tolerance_abs=0.0, tolerance_rel=0.0).warnings == []
    # ... and a row over-reported by 0.01 ε is flagged at zero tolerance, not at the default.
    # Over-reporting is safe, so the flag is a warning: the tolerances set when it is raised.
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET epsilon_reported = epsilon_reported + 0.01 WHERE merchant_id = 'm1' "
                     "AND round = 3")
    strict = audit_run(run_dir, tolerance_abs=0.0, tolerance_rel=0.0)
    assert strict.passed and strict.warnings and all("re-derived" in w for w in strict.warnings)
    status, out = cli(capsys, str(run_dir), "--tolerance-abs", "0", "--tolerance-rel", "0")
    assert status == 0 and "warning(s) (not failures)" in out
    status, out = cli(capsys, str(run_dir))
    assert status == 0 and "warning" not in out
    assert audit_run(run_dir).warnings == []


# ------------------------------------------------------------------------------ node state
def test_node_state_passes_and_agrees_with_the_ledger(run_dir: Path) -> None:
    report = by_merchant(audit_run(run_dir))
    for merchant in MERCHANTS:
        result = audit_node_state(state_path(run_dir, merchant), run_dir=run_dir)

        assert result.passed, result.findings
        assert result.merchant_id == merchant and result.compared_with == str(run_dir)
        assert result.calls == ROUNDS and result.total_steps == ROUNDS * MECHANISMS[merchant].steps
        assert result.budget == BUDGET and result.delta == DELTA
        assert result.epsilon_pld == pytest.approx(report[merchant].epsilon_recorded, rel=1e-9)
        assert result.epsilon_pld == pytest.approx(report[merchant].epsilon_pld, rel=1e-9)
        assert result.epsilon_add_remove < result.epsilon_pld
    alone = audit_node_state(state_path(run_dir, "m1"))
    assert alone.passed and alone.compared_with is None


def test_node_state_catches_a_ledger_mechanism_that_differs(run_dir: Path) -> None:
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 2.0 WHERE merchant_id = 'm1' AND round = 2")

    result = audit_node_state(state_path(run_dir, "m1"), run_dir=run_dir)

    assert not result.passed
    assert any(f.startswith("round 2: mechanism differs") for f in result.findings), result.findings
    assert not any(f.startswith(("round 1", "round 3")) for f in result.findings)
    assert audit_node_state(state_path(run_dir, "m2"), run_dir=run_dir).passed


def test_node_state_catches_spend_the_ledger_lacks(run_dir: Path) -> None:
    # The merchant trained in a round 4 (and recorded it first, as it must) but the ledger has
    # no round 4, e.g. the server died before writing it.
    state = PrivacyState.open(state_path(run_dir, "m2"), merchant_id="m2", target_epsilon=BUDGET,
                              target_delta=DELTA)
    state.commit(MECHANISMS["m2"], unit_count=UNIT_COUNTS["m2"], round=4, model_version=3, run_id=RUN_ID)

    result = audit_node_state(state_path(run_dir, "m2"), run_dir=run_dir)

    assert result.findings == ["round 4: the merchant recorded spend the ledger does not show"]


def test_node_state_catches_a_lost_call_in_a_retried_round(tmp_path: Path) -> None:
    # The server died after m1 trained round 2 but before the ledger recorded it; the resumed
    # run retried round 2 (no checkpoint, no ledger row) and recorded only the retry. The
    # merchant made two round-2 calls; the ledger shows one. Both audits must say so.
    run = build_run(tmp_path / "run", rounds=1, merchants=("m1",))
    state = PrivacyState.open(state_path(run, "m1"), merchant_id="m1", target_epsilon=BUDGET, target_delta=DELTA)
    n = UNIT_COUNTS["m1"]
    state.commit(MECHANISMS["m1"], unit_count=n, round=2, model_version=1, run_id=RUN_ID)  # the lost call
    eps = state.commit(MECHANISMS["m1"], unit_count=n, round=2, model_version=1, run_id=RUN_ID)  # the retry
    with PrivacyLedger(run / LEDGER_FILE) as ledger:
        (first,) = ledger.rows("m1")
        ledger.record_round([dataclasses.replace(first, round=2, model_version=1, epsilon_reported=eps)])

    result = audit_node_state(state_path(run, "m1"), run_dir=run)

    assert not result.passed
    assert any(f.startswith("round 2: the merchant recorded 2 training calls") for f in result.findings)
    # The run audit sees recorded ε above what its rows explain: a warning (over-reporting).
    assert any(w.startswith("m1: round 2: recorded ε") and "exceeds" in w for w in audit_run(run).warnings)


def test_node_state_catches_a_ledger_row_removed(run_dir: Path) -> None:
    with tamper(run_dir) as conn:
        conn.execute("DELETE FROM spend WHERE merchant_id = 'm3' AND round = 2")

    result = audit_node_state(state_path(run_dir, "m3"), run_dir=run_dir)

    assert result.findings == ["round 2: the merchant recorded spend the ledger does not show"]


def test_node_state_catches_ledger_spend_the_merchant_lacks(run_dir: Path) -> None:
    # The node's record ends at round 2 (e.g. its state file was restored from an old backup).
    path = state_path(run_dir, "m1")
    raw = json.loads(path.read_text())
    raw["entries"] = raw["entries"][:2]
    path.write_text(json.dumps(raw))

    result = audit_node_state(path, run_dir=run_dir)

    assert "round 3: the ledger shows spend the merchant's own record lacks" in result.findings


def test_node_state_counts_a_merchants_earlier_runs(tmp_path: Path) -> None:
    # The node's state is lifetime: spend of an earlier run counts towards ε in this run's
    # ledger rows. The node-state comparison matches by run id and agrees; the run audit,
    # seeing only this run's mechanisms, reports the unexplained ε (as its docstring says).
    earlier = PrivacyState.open(state_path(tmp_path / "run", "m1"), merchant_id="m1", target_epsilon=BUDGET,
                                target_delta=DELTA)
    earlier.commit(MECHANISMS["m1"], unit_count=UNIT_COUNTS["m1"], round=1, model_version=0, run_id="run-0")
    run = build_run(tmp_path / "run", merchants=("m1",))

    result = audit_node_state(state_path(run, "m1"), run_dir=run)

    assert result.passed, result.findings
    assert result.calls == ROUNDS + 1
    report = audit_run(run)
    assert report.passed and report.warnings
    assert all(w.startswith("m1: round") and "exceeds" in w for w in report.warnings)


def test_node_state_unreadable_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AuditInputError, match="no privacy state file"):
        audit_node_state(tmp_path / "missing.json")
    bad = tmp_path / "privacy-state.json"
    bad.write_text("{not json")
    with pytest.raises(AuditInputError, match="unreadable privacy state"):
        audit_node_state(bad)
    assert cli(capsys, "--node-state", str(bad))[0] == 2


def test_cli_node_state_exit_codes(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = cli(capsys, "--node-state", str(state_path(run_dir, "m1")), str(run_dir))
    assert status == 0, out
    assert "merchant m1: 3 training call(s), 30 steps" in out and "PASSED" in out
    status, out = cli(capsys, "--node-state", str(state_path(run_dir, "m1")), str(run_dir), "--json")
    assert status == 0 and json.loads(out)["passed"] is True

    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 2.0 WHERE merchant_id = 'm1' AND round = 2")
    status, out = cli(capsys, "--node-state", str(state_path(run_dir, "m1")), str(run_dir))
    assert status == 1
    assert "FAILED" in out and "round 2: mechanism differs" in out
    status, out = cli(capsys, "--node-state", str(state_path(run_dir, "m1")), str(run_dir), "--json")
    assert status == 1 and json.loads(out)["passed"] is False


# ------------------------------------------------------------------------------ the accountant itself
_PHI = NormalDist().cdf


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with sensitivity 1 and noise σ.

    Balle & Wang (ICML 2018), "Improving the Gaussian mechanism for differential privacy",
    Theorem 8: δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ).
    """
    return _PHI(1 / (2 * sigma) - epsilon * sigma) - math.exp(epsilon) * _PHI(-1 / (2 * sigma) - epsilon * sigma)


def gaussian_epsilon(delta: float, sigma: float) -> float:
    """The ε at which ``gaussian_delta`` equals ``delta`` (it decreases in ε): bisection."""
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta(mid, sigma) > delta else (lo, mid)
    return (lo + hi) / 2


def test_analytic_gaussian_formula_is_sane() -> None:
    # The classical bound σ = sqrt(2 ln(1.25/δ)) / ε (Dwork & Roth, Thm A.1; valid for ε < 1)
    # is sufficient, so the exact ε at that σ must be below the ε it was built for.
    classical_eps = 0.9
    sigma = math.sqrt(2 * math.log(1.25 / DELTA)) / classical_eps
    assert 0.5 < gaussian_epsilon(DELTA, sigma) < classical_eps
    assert gaussian_delta(gaussian_epsilon(DELTA, 1.0), 1.0) == pytest.approx(DELTA, rel=1e-9)


@pytest.mark.parametrize(
    ("sigma", "steps"),
    [(1.0, 1), (3.0, 4)],  # k steps at q = 1 compose to one Gaussian with σ/√k (here 1.5)
    ids=["one-step", "four-steps"],
)
def test_accountants_match_the_exact_gaussian_mechanism(sigma: float, steps: int) -> None:
    # sample_rate = 1: every step uses every record, so DP-SGD is the plain Gaussian mechanism.
    event = MechanismEvent(noise_multiplier=sigma, sample_rate=1.0, steps=steps, max_grad_norm=1.0)
    exact = gaussian_epsilon(DELTA, sigma / math.sqrt(steps))
    assert exact == pytest.approx(4.3772 if steps == 1 else 2.7534, abs=1e-4)

    assert epsilon_pld([event], DELTA, neighbours="add-remove") == pytest.approx(exact, rel=0.01)
    # Replace-one: the released sum moves by up to 2C, so the exact value at σ/2.
    assert epsilon_pld([event], DELTA) == pytest.approx(gaussian_epsilon(DELTA, sigma / 2 / math.sqrt(steps)),
                                                        rel=0.01)
    assert accounting.epsilon([event], DELTA) == epsilon_pld([event], DELTA)


# What an unmarked call is: unproven (the first versions with fresh noise did not mark it either).
UNMARKED = ("recorded by a version that did not mark its noise, as every version whose noise repeated across "
            "calls was, so the ε reported for them is not shown to hold")


def test_node_state_flags_spend_recorded_without_the_noise_source(run_dir: Path) -> None:
    # Every call recorded today carries the mark; a state written by a version whose noise
    # repeated across calls has none, and the audit must not pass its ε as if it held.
    path = state_path(run_dir, "m1")
    raw = json.loads(path.read_text())
    assert all(e["event"]["noise"] == NOISE_SOURCE for e in raw["entries"])
    for entry in raw["entries"][:2]:
        del entry["event"]["noise"]
    path.write_text(json.dumps(raw))

    result = audit_node_state(path, run_dir=run_dir)

    assert not result.passed
    assert result.findings == [f"2 of {ROUNDS} call(s) (entries 0-1) carry no noise-source mark "
                               f"{NOISE_SOURCE!r}: {UNMARKED}"]
    assert audit_node_state(state_path(run_dir, "m2"), run_dir=run_dir).passed


def test_run_flags_private_updates_sent_without_the_noise_source(run_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A merchant on a version that did not send the mark (or whose noise repeated): its rows
    # keep their ε, which the accountants re-derive fine; only the mark tells them apart.
    with tamper(run_dir) as conn:
        assert conn.execute("UPDATE spend SET noise = '' WHERE merchant_id = 'm2' AND round <= 2").rowcount == 2

    report = audit_run(run_dir)

    assert report.findings == [f"m2: 2 of {ROUNDS} update(s) (round(s) 1-2) carry no noise-source mark "
                               f"{NOISE_SOURCE!r}: {UNMARKED}"]
    status, out = cli(capsys, str(run_dir))
    assert status == 1 and "m2: 2 of 3 update(s)" in out


def test_schema_1_ledger_is_audited_as_unmarked(run_dir: Path) -> None:
    # Ledgers written before the noise source was kept: every private update is unmarked.
    before = audit_run(run_dir)
    as_schema_1(run_dir / LEDGER_FILE)

    report = audit_run(run_dir)

    assert sorted(f for f in report.findings if "neighbours" not in f) == [
        f"{m}: {ROUNDS} of {ROUNDS} update(s) (round(s) 1-{ROUNDS}) carry no noise-source mark {NOISE_SOURCE!r}: "
        f"{UNMARKED}" for m in MERCHANTS]
    assert sorted(f for f in report.findings if "neighbours" in f) == old_relation_findings()
    # Everything else is read as before: same ε recorded and re-derived, nothing else found.
    assert before.passed
    assert [(m.epsilon_recorded, m.epsilon_pld) for m in report.merchants] == [
        (m.epsilon_recorded, m.epsilon_pld) for m in before.merchants]


def old_relation_findings() -> list[str]:
    """What the audit says of every row of a ledger from before ``neighbours`` was kept (schema < 5)."""
    return sorted(f"{m}: round {r}: ε accounted for 'add-remove' neighbours; every reply states N (the unit count) "
                  "exactly, which tells datasets of other sizes apart, so only 'replace-one' neighbours are "
                  'protected (docs/privacy.md, "N is public")' for m in MERCHANTS for r in range(1, ROUNDS + 1))


def test_schema_2_ledger_is_audited_as_before(run_dir: Path) -> None:
    # Ledgers written before the unit, N and the release were kept: the audit reads them as
    # the one unit and release fedshop had, N unrecorded, and finds what it found before, plus
    # that they were accounted for add/remove neighbours (as every ledger before schema 5 was).
    before = audit_run(run_dir)
    as_schema_2(run_dir / LEDGER_FILE)

    report = audit_run(run_dir)

    assert before.passed and sorted(report.findings) == old_relation_findings()
    assert [{**dataclasses.asdict(m), "findings": []} for m in report.merchants] == [
        dataclasses.asdict(m) for m in before.merchants]
    rows = read_rows(run_dir / LEDGER_FILE)
    assert {(r.event.unit, r.event.release, r.event.unit_count, r.event.expected_batch) for r in rows} == {
        ("record", "update", 0, 0.0)}


# ------------------------------------------------------------------------------ facts, not only arithmetic
def test_non_private_run_passes_as_no_dp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A run that is non-private throughout claims nothing: "no DP", not a failure.
    for name, write_config in (("with-config", True), ("without-config", False)):
        run = build_run(tmp_path / name, dp=False, write_config=write_config)

        report = audit_run(run)

        assert report.passed and not report.claims_dp, report.findings
        assert all(not m.dp and m.epsilon_recorded == math.inf for m in report.merchants)
        status, out = cli(capsys, str(run))
        assert status == 0 and "a non-private run" in out and "no DP" in out


def test_config_claiming_dp_fails_every_non_private_row(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", dp=False, config={"dp": True})

    report = audit_run(run)

    assert report.claims_dp
    assert sorted(report.findings) == sorted(
        f"{m}: round {r}: non-private row (dp = 0, σ 0, ε 0) in a run that claims DP (config.json says dp = true)"
        for m in MERCHANTS for r in range(1, ROUNDS + 1))


def test_a_merchants_own_clipping_norm_is_not_a_finding(tmp_path: Path) -> None:
    """A merchant may pin its own C (client.policy); ε does not depend on C, so a C other than
    the run config's is no finding (a C of zero still is: see the impossible-facts cases)."""
    run = build_run(tmp_path / "run", merchants=("m1",), config={"max-grad-norm": 2.0})

    report = audit_run(run)

    assert report.passed and report.findings == []


def test_delta_stricter_than_the_run_configs_passes_and_looser_fails(tmp_path: Path) -> None:
    stricter = build_run(tmp_path / "stricter", merchants=("m1",), config={"target-delta": 1e-4})
    assert audit_run(stricter).passed
    looser = build_run(tmp_path / "looser", merchants=("m1",), config={"target-delta": 1e-6})
    assert audit_run(looser).findings == [
        f"m1: round {r}: δ = 1e-05 above the run config's target-delta 1e-06" for r in (1, 2, 3)]


def test_delta_too_large_for_the_unit_count_fails(run_dir: Path) -> None:
    # m1 trains on N = 200 records: δ must be at most 1/2000. A run config asking for a larger
    # δ than its data allows is no excuse.
    (run_dir / "config.json").unlink()
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET delta = 1e-3 WHERE merchant_id = 'm1'")

    findings = findings_about(audit_run(run_dir), "m1")

    for r in (1, 2, 3):
        assert f"m1: round {r}: δ = 0.001 too large for N = 200 records (must be ≤ 1/(10·N) = 0.0005)" in findings


def test_private_update_without_noise_fails(run_dir: Path) -> None:
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 0 WHERE merchant_id = 'm2' AND round = 3")

    findings = findings_about(audit_run(run_dir), "m2")

    assert "m2: round 3: a private update with σ = 0 (no noise)" in findings
    assert any(f.startswith("m2: round 3: recorded ε") and "under-reports" in f and "(inf, PLD)" in f
               for f in findings), findings


def test_expected_batch_below_one_unit_fails(run_dir: Path) -> None:
    # q and the expected batch rewritten together, consistent with N: a batch of a fifth of a
    # record is no batch the merchant's rule (q = 1/ceil(N / batch), batch >= 1) can give.
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET sample_rate = 0.001, expected_batch = 0.2 "
                     "WHERE merchant_id = 'm1' AND round = 1")

    findings = findings_about(audit_run(run_dir), "m1")

    assert "m1: round 1: expected batch 0.2 outside [1, N = 200]" in findings
    assert not any("is not expected batch / N" in f for f in findings)


def test_private_update_without_unit_count_fails_where_the_ledger_keeps_it(run_dir: Path) -> None:
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET unit_count = 0, expected_batch = 0 WHERE merchant_id = 'm3' AND round = 2")

    assert audit_run(run_dir).findings == [
        "m3: round 2: a private update with N = 0 recorded (its q cannot be checked)"]


def test_unreadable_run_config_is_an_input_error(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(AuditInputError, match="not a readable run config"):
        audit_run(run_dir)
    (run_dir / "config.json").write_text(json.dumps({"dp": "yes"}))
    with pytest.raises(AuditInputError, match="'dp' = 'yes' is not a bool"):
        audit_run(run_dir)
    assert cli(capsys, str(run_dir))[0] == 2


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (3.0, 4), (2.0, 10)])
def test_pld_allowance_bounds_plds_discretisation_error(sigma: float, steps: int) -> None:
    # At q = 1 the exact ε is known (Balle & Wang): PLD is pessimistic (never below it) and
    # sits above it by no more than the allowance the over-budget check grants it.
    event = MechanismEvent(noise_multiplier=sigma, sample_rate=1.0, steps=steps, max_grad_norm=1.0)
    exact = gaussian_epsilon(DELTA, sigma / math.sqrt(steps))
    assert exact <= epsilon_pld([event], DELTA, neighbours="add-remove") <= exact + pld_allowance(steps)
    # Replace-one: sensitivity 2C, the same Gaussian at half the noise; the same allowance holds.
    exact = gaussian_epsilon(DELTA, sigma / 2 / math.sqrt(steps))
    assert exact <= epsilon_pld([event], DELTA) <= exact + pld_allowance(steps)


def test_refused_call_passes_the_fact_checks(run_dir: Path) -> None:
    # A refused call released nothing: the merchant records its δ, the run's σ floor and C, no
    # sampling, no steps, no units (client.merchant); none of that is a finding.
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        last = ledger.rows("m1")[-1]
        refused = SpendEvent.of(MechanismEvent(noise_multiplier=1.0, sample_rate=0.0, steps=0, max_grad_norm=1.0),
                                unit_count=0, delta=DELTA, noise="")
        ledger.record_round([dataclasses.replace(last, round=ROUNDS + 1, event=refused, status="refused",
                                                 reason="budget")])

    report = audit_run(run_dir)

    assert report.passed, report.findings
    m1 = by_merchant(report)["m1"]
    assert m1.rounds_refused == 1 and m1.rounds_joined == ROUNDS


def test_sample_rate_above_one_is_a_finding_not_a_crash(run_dir: Path) -> None:
    # The ledger's CHECK keeps q <= 1; a file rebuilt without it reaches the audit anyway.
    with tamper(run_dir) as conn:
        conn.execute("CREATE TABLE spend2 AS SELECT * FROM spend")
        conn.execute("DROP TABLE spend")
        conn.execute("ALTER TABLE spend2 RENAME TO spend")
        conn.execute("UPDATE spend SET sample_rate = 1.5 WHERE merchant_id = 'm2' AND round = 2")

    report = audit_run(run_dir)

    m2 = findings_about(report, "m2")
    assert "m2: round 2: sample rate q = 1.5 outside (0, 1]" in m2
    assert any(f.startswith("m2: round 3: recorded ε") and "(inf, PLD)" in f for f in m2), m2
    assert by_merchant(report)["m2"].epsilon_pld == math.inf


def test_node_state_counts_a_crashed_calls_reservation_from_when_it_was_made(tmp_path: Path) -> None:
    """A call that died between reserve and commit stays counted in the merchant's ε from then
    on: the audit compares each later ledger row with the ε the merchant had counted when it
    reported it (its calls so far plus that reservation), so an honest ledger passes."""
    from server.ledger import SpendRecord
    from tests.helpers.audit_runs import MECHANISMS, RUN_ID, UNIT_COUNTS

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = state_path(run_dir, "m1")
    mechanism = MECHANISMS["m1"]
    PrivacyState.create(path, merchant_id="m1", target_epsilon=BUDGET, target_delta=DELTA)
    reported = []
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        ledger.set_meta("run_id", RUN_ID)
        for rnd in (1, 2):
            if rnd == 2:  # a call that reserved its spend, then ended without committing (a crash)
                with PrivacyState.locked(path, merchant_id="m1", target_epsilon=BUDGET, target_delta=DELTA) as s:
                    s.check(mechanism)
            with PrivacyState.locked(path, merchant_id="m1", target_epsilon=BUDGET, target_delta=DELTA) as s:
                s.check(mechanism)
                eps = s.commit(mechanism, unit_count=UNIT_COUNTS["m1"], round=rnd, model_version=rnd - 1,
                               run_id=RUN_ID)
                event = s.entries[-1].event
            reported.append(eps)
            ledger.record_round([SpendRecord(
                run_id=RUN_ID, round=rnd, merchant_id="m1", node_id=1000, model_version=rnd - 1, event=event,
                epsilon_reported=eps, epsilon_budget=BUDGET, accountant="pld", status="accepted", dp=True)])

    assert len(json.loads(path.read_text())["reservations"]) == 1
    # Round 2's ε counts three calls (two committed, one reserved), not two.
    assert reported[1] == pytest.approx(accounting.epsilon([mechanism] * 3, DELTA), rel=1e-6)
    result = audit_node_state(path, run_dir=run_dir)
    assert result.findings == [], result.findings


# ------------------------------------------------------------------------------ evaluation releases
def released_in_order(merchant: str, rounds: int = ROUNDS) -> list[MechanismEvent]:
    """A merchant's mechanisms as ``build_run(evaluations=True)`` released them: each round's
    update, then that round's evaluation."""
    return [e for _ in range(rounds) for e in (MECHANISMS[merchant], EVAL_MECHANISM)]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_run_with_evaluations_passes_and_composes_both_releases(eval_run_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    report = audit_run(eval_run_dir)

    assert report.passed, report.findings
    assert report.warnings == [] and report.rounds == ROUNDS
    # Read in the order recorded: each round's update row, then its evaluation row.
    rows = read_rows(eval_run_dir / LEDGER_FILE)
    assert [(r.round, r.release) for r in rows if r.merchant_id == "m1"] == [
        (n, release) for n in range(1, ROUNDS + 1) for release in ("update", "evaluation")]
    for m in report.merchants:
        mechanism = MECHANISMS[m.merchant_id]
        own = PrivacyState.open(state_path(eval_run_dir, m.merchant_id), merchant_id=m.merchant_id,
                                target_epsilon=BUDGET, target_delta=DELTA)
        assert m.rounds_joined == ROUNDS and m.evaluations == ROUNDS and m.rounds_refused == 0
        assert m.total_steps == ROUNDS * mechanism.steps  # DP-SGD steps; the evaluations are listed apart
        assert m.noise_multipliers == [mechanism.noise_multiplier] and m.sample_rates == [mechanism.sample_rate]
        assert m.eval_noise_multipliers == [EVAL_MECHANISM.noise_multiplier]
        # The last row is round 3's evaluation: the merchant's ε after every release.
        assert m.epsilon_recorded == pytest.approx(own.epsilon(), rel=1e-12)
        assert m.epsilon_pld == pytest.approx(epsilon_pld(released_in_order(m.merchant_id), DELTA), rel=1e-9)
        assert m.epsilon_pld > epsilon_pld([mechanism] * ROUNDS, DELTA) + 0.02  # the evaluations are spend
        assert [(p["round"], p["release"]) for p in m.series] == [
            (n, release) for n in range(1, ROUNDS + 1) for release in ("update", "evaluation")]
        assert all(a["pld"] < b["pld"] and a["recorded"] < b["recorded"] for a, b in itertools.pairwise(m.series))
        for p in m.series:
            assert p["recorded"] == pytest.approx(p["pld"], abs=1e-6)
    status, out = cli(capsys, str(eval_run_dir))
    assert status == 0 and "audit PASSED" in out and f"{ROUNDS * len(MERCHANTS)} noised metric release(s)" in out


def test_an_evaluation_duplicated_is_caught_as_its_release(eval_run_dir: Path) -> None:
    with tamper(eval_run_dir) as conn:
        conn.execute("CREATE TABLE spend2 AS SELECT * FROM spend")
        conn.execute("INSERT INTO spend2 SELECT * FROM spend "
                     "WHERE merchant_id = 'm1' AND round = 2 AND release = 'evaluation'")
        conn.execute("DROP TABLE spend")
        conn.execute("ALTER TABLE spend2 RENAME TO spend")

    report = audit_run(eval_run_dir)

    assert "ledger: merchant m1 recorded 2 times in round 2 (evaluation)" in report.findings
    assert not any(f.startswith("ledger:") and "(evaluation)" not in f for f in report.findings), report.findings
    assert findings_about(report, "m2") == [] and findings_about(report, "m3") == []


def test_an_update_removed_is_caught_though_its_evaluation_remains(eval_run_dir: Path) -> None:
    # The run log lists who trained: it is held against update rows, not any row of the round.
    with tamper(eval_run_dir) as conn:
        conn.execute("DELETE FROM spend WHERE merchant_id = 'm1' AND round = 2 AND release = 'update'")

    report = audit_run(eval_run_dir)

    assert "ledger: merchant m1 trained in round 2 (run log) but the ledger has no spend for it" in report.findings
    assert by_merchant(report)["m1"].rounds_joined == ROUNDS - 1 and by_merchant(report)["m1"].evaluations == ROUNDS


def test_a_round_with_evaluations_but_no_updates_is_a_gap(eval_run_dir: Path) -> None:
    (eval_run_dir / "metrics.jsonl").unlink()  # the ledger alone must show it
    with tamper(eval_run_dir) as conn:
        assert conn.execute("DELETE FROM spend WHERE round = 2 AND release = 'update'").rowcount == len(MERCHANTS)

    report = audit_run(eval_run_dir)

    assert "ledger: no update recorded for round(s) [2], only other releases (gap)" in report.findings


_EVALUATION_TAMPERED = [
    ("sample_rate = 0.5", "an evaluation with sample rate q = 0.5; a Gaussian release of the whole held-out set "
                          "has q = 1"),
    ("steps = 2", "an evaluation with 2 steps; a Gaussian release is one step"),
    ("noise_multiplier = 0", "a private evaluation with σ = 0 (no noise)"),
    ("max_grad_norm = 0", "clipping norm C = 0 (no clipping bound)"),
    ("unit_count = 0, expected_batch = 0", "an evaluation with N = 0 held-out records recorded"),
    ("expected_batch = 5", f"expected batch 5 is not N = {EVAL_UNIT_COUNTS['m1']} (an evaluation releases every "
                           "held-out unit: q·N = N)"),
    ("delta = 0.01", f"δ = 0.01 too large for N = {EVAL_UNIT_COUNTS['m1']} records"),
    ("delta = 2e-05", "δ = 2e-05 above the run config's target-delta 1e-05"),
]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize(("change", "finding"), _EVALUATION_TAMPERED, ids=[c for c, _ in _EVALUATION_TAMPERED])
def test_an_evaluations_impossible_facts_fail(eval_run_dir: Path, change: str, finding: str) -> None:
    with tamper(eval_run_dir) as conn:
        conn.execute(f"UPDATE spend SET {change} WHERE merchant_id = 'm1' AND round = 2 AND release = 'evaluation'")

    report = audit_run(eval_run_dir)

    assert any(f.startswith(f"m1: round 2 (evaluation): {finding}") for f in report.findings), report.findings
    assert findings_about(report, "m2") == [] and findings_about(report, "m3") == []


def test_an_evaluation_keeps_its_own_clipping_norm_and_its_q_of_1(eval_run_dir: Path) -> None:
    # C_eval is the evaluation's own bound (client.release), not the run's max-grad-norm; and
    # an update's rule q = expected batch / N with 1 <= expected batch <= N is not asked of it
    # (q = 1, expected batch = N). The ε of a Gaussian release does not depend on C.
    with tamper(eval_run_dir) as conn:
        conn.execute("UPDATE spend SET max_grad_norm = 0.5 WHERE release = 'evaluation'")

    report = audit_run(eval_run_dir)

    assert report.passed, report.findings
    assert json.loads((eval_run_dir / "config.json").read_text())["max-grad-norm"] != 0.5


def test_node_state_with_evaluations_matches_each_release(eval_run_dir: Path) -> None:
    for merchant in MERCHANTS:
        result = audit_node_state(state_path(eval_run_dir, merchant), run_dir=eval_run_dir)
        assert result.passed, result.findings
        assert result.calls == 2 * ROUNDS
    with tamper(eval_run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 5.0 "
                     "WHERE merchant_id = 'm1' AND round = 2 AND release = 'evaluation'")
        conn.execute("DELETE FROM spend WHERE merchant_id = 'm2' AND round = 3 AND release = 'evaluation'")

    m1 = audit_node_state(state_path(eval_run_dir, "m1"), run_dir=eval_run_dir).findings
    m2 = audit_node_state(state_path(eval_run_dir, "m2"), run_dir=eval_run_dir).findings

    assert len(m1) == 1 and m1[0].startswith("round 2 (evaluation): mechanism differs"), m1
    assert m2 == ["round 3 (evaluation): the merchant recorded spend the ledger does not show"]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_node_state_catches_a_second_evaluation_call_in_a_round(eval_run_dir: Path) -> None:
    state = PrivacyState.open(state_path(eval_run_dir, "m3"), merchant_id="m3", target_epsilon=BUDGET,
                              target_delta=DELTA)
    state.commit(EVAL_MECHANISM, unit_count=EVAL_UNIT_COUNTS["m3"], round=ROUNDS, model_version=ROUNDS,
                 run_id=RUN_ID, release="evaluation")

    findings = audit_node_state(state_path(eval_run_dir, "m3"), run_dir=eval_run_dir).findings

    assert any(f.startswith(f"round {ROUNDS} (evaluation): the merchant recorded 2 evaluation calls")
               for f in findings), findings

