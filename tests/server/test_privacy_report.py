"""server.audit.report and ``fedshop audit --plot/--report``: the table, the ε plot, the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.audit import audit_run
from server.audit.report import audit_table, plot_epsilon, write_privacy_report
from simulations.cli import main
from tests.helpers.audit_runs import DELTA, MERCHANTS, tamper

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CANARY = {"m": 1000, "r": 200, "v": 130, "epsilon_lower_bound": 0.412, "epsilon_claimed": 2.254,
          "confidence": 0.95, "delta": DELTA, "dp": True, "k_plus": 100, "k_minus": 100,
          "noise_multiplier": 1.0, "steps": 30}




def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["audit", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------ table
def test_table_lists_every_merchant_and_the_verdict(run_dir: Path) -> None:
    report = audit_run(run_dir)
    table = audit_table(report)

    lines = table.splitlines()
    assert lines[0].split()[:3] == ["merchant", "rounds", "steps"]
    for merchant in MERCHANTS:
        (row,) = [line for line in lines if line.startswith(merchant + " ")]
        m = next(m for m in report.merchants if m.merchant_id == merchant)
        for value in (m.epsilon_recorded, m.epsilon_pld, m.epsilon_add_remove):
            assert f"{value:.3f}" in row
        assert "1e-05" in row
    assert "audit PASSED: 3 round(s)" in table

    with tamper(run_dir) as conn:
        conn.execute("DELETE FROM spend WHERE round = 2")
    failed = audit_table(audit_run(run_dir))
    assert "audit FAILED" in failed and "  - ledger: no spend recorded for round(s) [2] (gap)" in failed


# ------------------------------------------------------------------------------ plot
def test_plot_writes_a_png(run_dir: Path, tmp_path: Path) -> None:
    path = plot_epsilon(audit_run(run_dir), tmp_path / "plots" / "eps.png")
    assert path == tmp_path / "plots" / "eps.png"
    assert_png(path)


def test_cli_plot_writes_a_png(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "epsilon.png"
    status, out, err = audit(capsys, str(run_dir), "--plot", str(plot))

    assert status == 0, out
    assert_png(plot)
    assert f"plot: {plot}" in err


# ------------------------------------------------------------------------------ report
def test_cli_report_names_every_merchant_delta_guarantee_and_plot(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_md = tmp_path / "out" / "privacy.md"
    status, out, err = audit(capsys, str(run_dir), "--report", str(out_md))

    assert status == 0, out
    assert f"report: {out_md}" in err
    text = out_md.read_text(encoding="utf-8")
    assert text.startswith("# Privacy report")
    assert "(ε, δ)-differential privacy *per merchant*, per privacy unit" in text
    assert "replacing one unit's data by any other (the number of units N is public" in text
    assert "- **δ:** 1e-05" in text
    assert "PLD for replace-one neighbours" in text
    report = audit_run(run_dir)
    for m in report.merchants:
        (row,) = [line for line in text.splitlines() if line.startswith(f"| {m.merchant_id} |")]
        cells = f"| {m.epsilon_recorded:.3f} | {m.epsilon_pld:.3f} | {m.epsilon_add_remove:.3f} | {m.budget:.3f} |"
        assert cells in row
    # The plot sits next to the report and the Markdown links it by its (relative) name.
    png = out_md.with_suffix(".png")
    assert_png(png)
    assert f"]({png.name})" in text
    assert "**PASSED.**" in text
    assert "Not run for this report" in text  # no canary_audit.json in this run


def test_report_includes_the_empirical_result_from_the_run_dir(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir / "canary_audit.json").write_text(json.dumps(CANARY))
    out_md = tmp_path / "privacy.md"

    status, _, _ = audit(capsys, str(run_dir), "--report", str(out_md))

    assert status == 0
    text = out_md.read_text(encoding="utf-8")
    empirical = text.split("## Empirical audit", 1)[1]
    assert "1000 canaries" in empirical and "200 guesses" in empirical and "130 correct" in empirical
    assert "ε ≥ 0.412" in empirical and "95% confidence" in empirical and "claimed ε of 2.254" in empirical
    assert "consistent with the claim" in empirical
    assert "Not run for this report" not in text


def test_report_says_so_when_the_empirical_bound_violates_the_claim(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An explicit --empirical-result FILE wins over RUN_DIR/canary_audit.json.
    (run_dir / "canary_audit.json").write_text(json.dumps(CANARY))
    violated = tmp_path / "no-noise.json"
    violated.write_text(json.dumps({**CANARY, "v": 200, "epsilon_lower_bound": 3.49, "dp": False}))
    out_md = tmp_path / "privacy.md"

    status, _, _ = audit(capsys, str(run_dir), "--report", str(out_md), "--empirical-result", str(violated))

    assert status == 0  # the ledger audit itself passed; the report carries the empirical verdict
    text = out_md.read_text(encoding="utf-8")
    assert "ε ≥ 3.490" in text and "**the claim is violated**" in text


def test_report_of_a_failed_audit_lists_the_findings(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # σ lowered on paper: the ledger's own mechanisms give more ε than m1 recorded (a raised σ
    # would be over-reporting, a warning since over-reporting is safe).
    with tamper(run_dir) as conn:
        conn.execute("UPDATE spend SET noise_multiplier = 0.8 WHERE merchant_id = 'm1' AND round = 2")
    out_md = tmp_path / "privacy.md"

    status, _, _ = audit(capsys, str(run_dir), "--report", str(out_md), "--plot", str(tmp_path / "p.png"))

    assert status == 1
    text = out_md.read_text(encoding="utf-8")
    assert re.search(r"\*\*FAILED\*\* — \d+ finding\(s\):", text)
    assert "- m1: round 2: recorded ε" in text
    assert_png(tmp_path / "p.png")
    assert_png(out_md.with_suffix(".png"))


def test_write_privacy_report_directly(run_dir: Path, tmp_path: Path) -> None:
    path = write_privacy_report(audit_run(run_dir), tmp_path / "r.md", empirical=CANARY)
    assert path == tmp_path / "r.md"
    text = path.read_text(encoding="utf-8")
    for merchant in MERCHANTS:
        assert f"| {merchant} |" in text
    assert "One-run canary audit" in text
    assert_png(tmp_path / "r.png")


def test_the_report_gives_both_one_run_bounds_and_their_power(run_dir: Path, tmp_path: Path) -> None:
    both = {**CANARY, "calls": 2, "epsilon_lower_bound_steinke": 0.301, "epsilon_lower_bound_fdp": 0.412,
            "power_steinke": 5.088, "power_fdp": 9.919}
    text = write_privacy_report(audit_run(run_dir), tmp_path / "r.md", empirical=both).read_text(encoding="utf-8")
    assert "2 consecutive call(s)" in text
    assert "0.301 (Steinke, Nasr & Jagielski 2023)" in text and "0.412 (f-DP" in text
    assert "5.088 / 9.919" in text
