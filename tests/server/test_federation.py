"""server.federation under a real Flower simulation (Ray backend): screening, budgets, failure.

Each run is a subprocess in its own session (``tests.helpers.proc``), so Ray and everything
it started is killed whatever the outcome. The faulty-merchant run goes through
``simulations.engine.run_simulation`` with a ClientApp that Ray workers import from
``tests.helpers.faulty_app``; its merchants cover both the screening and the merchant's own
budget, so the two tests share that one run (a Ray start-up costs more than a merchant).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from server import checkpoint as ckpt
from shared.model import MANIFEST_FILE
from shared.privacy.budget import PrivacyState
from shared.privacy.events import NOISE_SOURCE
from shared.run_files import METRICS_FILE, MODEL_DIR, SUMMARY_FILE
from tests.helpers import proc
from tests.helpers.federation import (
    FAST,
    faulty_simulation,
    ledger_rows,
    metrics_rows,
    simulate,
    write_scenario,
)
from tests.helpers.merchants import write_merchants

pytestmark = pytest.mark.slow


FAULTY = ("bad-nan", "bad-norm", "bad-shape")
# Already holds a budget of its own (with its data), far below the run's: its budget wins.
THRIFTY = "thrifty"
RUN_BUDGET = 1000.0


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, proc.Run]:
    """One 2-round run of five merchants, shared by the screening and the budget tests: three
    send malformed updates (``tests.helpers.faulty_app``), one is honest, one is over its own
    budget. (data dir, run dir, result)."""
    root = tmp_path_factory.mktemp("faulty")
    data = root / "data"
    write_merchants(data, [*FAULTY, "good", THRIFTY])
    state_path = data / THRIFTY / ".fedshop" / "privacy-state.json"
    PrivacyState(path=state_path, merchant_id=THRIFTY, target_epsilon=0.01, target_delta=1e-5).save()
    run_dir = root / "run"
    # σ_eval 0.5 under a large budget: over a handful of held-out units σ_eval = 10 leaves each
    # merchant's noised counts ≤ 0 (no metric) about 4 times in 10, and this run must evaluate.
    config = {**FAST, "data-dir": str(data), "run-dir": str(run_dir), "num-server-rounds": 2,
              "merchants-per-round": 5, "eval-noise-multiplier": 0.5, "target-epsilon": RUN_BUDGET}
    return data, run_dir, faulty_simulation(config, num_merchants=5, log_dir=root / "log")


def test_malformed_updates_are_rejected_and_their_spend_recorded(faulty_run: tuple[Path, Path, proc.Run]) -> None:
    data, run_dir, result = faulty_run
    assert result.returncode == 0, result.describe()
    expected_reason = {
        "bad-nan": "non-finite values",
        "bad-norm": "exceeds max-update-norm",
        "bad-shape": "has shape (7, 64), expected (8, 64)",
    }
    every = [r for r in ledger_rows(run_dir) if r.merchant_id != THRIFTY]  # (the budget test's merchant)
    rows = [r for r in every if r.event.release == "update"]
    assert sorted((r.round, r.merchant_id) for r in rows) == [
        (n, m) for n in (1, 2) for m in ("bad-nan", "bad-norm", "bad-shape", "good")]
    # Each merchant's noised evaluation of the aggregate is spend too, on a row of its own.
    evaluations = [r for r in every if r.event.release == "evaluation"]
    assert sorted((r.round, r.merchant_id) for r in evaluations) == sorted((r.round, r.merchant_id) for r in rows)
    assert all(r.event.mechanism.sample_rate == 1.0 and r.event.mechanism.steps == 1 for r in evaluations)
    for r in rows:
        if r.merchant_id == "good":
            assert r.status == "accepted" and r.reason == ""
        else:
            assert r.status == "rejected", r
            assert expected_reason[r.merchant_id] in r.reason, r.reason
        # A rejected merchant did train: its spend is in the ledger like anyone else's.
        # (Steps: at most max-local-steps = 3; fewer when the merchant's few units fill one batch.)
        assert 0 < r.event.mechanism.steps <= 3 and r.epsilon_reported > 0 and r.model_version == r.round - 1
    for merchant in expected_reason:
        eps = [r.epsilon_reported for r in rows if r.merchant_id == merchant]
        assert eps[0] < eps[1]
        state = json.loads((data / merchant / ".fedshop" / "privacy-state.json").read_text())  # with its data
        assert [(e["round"], e["event"]["release"]) for e in state["entries"]] == [
            (1, "update"), (1, "evaluation"), (2, "update"), (2, "evaluation")]
    assert sum(1 for line in result.output.splitlines() if "rejected update from merchant" in line) == 6

    log_rows = metrics_rows(run_dir)
    assert [row["round"] for row in log_rows] == [1, 2]
    for row in log_rows:
        assert row["accepted"] == ["good"]
        assert sorted(row["rejected"]) == sorted(expected_reason)
        for merchant, reason in row["rejected"].items():
            assert expected_reason[merchant] in reason
        assert row["eval_metrics"]  # the run went on to evaluate the aggregate
        # ... from the merchants' pooled noised sums: the round's figures, never the sums themselves;
        # each evaluating merchant's own metrics beside them, for per-merchant views.
        assert not any(k.startswith("sum:") or k == "sum-noise-sd" for k in row["eval_metrics"])
        assert sorted(row["eval_per_merchant"]) == sorted([*FAULTY, "good"])
        assert all(not any(k.startswith("sum") for k in m) for m in row["eval_per_merchant"].values())
    # Only the honest update entered the global model.
    latest = ckpt.load_latest(run_dir)
    assert latest is not None and latest.round == 2
    assert all(np.all(np.isfinite(v)) and np.abs(v).max() < 1e3 for v in latest.parameters.values())


def test_a_merchant_over_its_own_budget_is_refused_then_no_longer_sampled(
        faulty_run: tuple[Path, Path, proc.Run]) -> None:
    data, run_dir, result = faulty_run
    assert result.returncode == 0, result.describe()
    others = sorted([*FAULTY, "good"])
    every = ledger_rows(run_dir)
    rows = [r for r in every if r.event.release == "update"]
    # THRIFTY cannot afford an evaluation either: it released none, so no evaluation row names it.
    assert sorted({r.merchant_id for r in every if r.event.release == "evaluation"}) == others
    round1 = {r.merchant_id: r for r in rows if r.round == 1}
    round2 = {r.merchant_id: r for r in rows if r.round == 2}
    assert sorted(round1) == sorted([*others, THRIFTY])
    refused = round1[THRIFTY]
    assert refused.status == "refused" and refused.event.mechanism.steps == 0
    assert refused.epsilon_budget == 0.01 and refused.epsilon_reported == 0.0
    assert refused.event.noise == ""  # drew no noise, so names no source
    assert "budget" in refused.reason and THRIFTY in refused.reason
    assert round1["good"].status == "accepted"
    assert all(round1[m].event.noise == NOISE_SOURCE for m in others)
    assert round1["good"].epsilon_budget == RUN_BUDGET  # the run's budget, where the merchant set none
    # Round 2: THRIFTY is not sampled at all; the others go on (and train: the faulty ones are
    # rejected only after training).
    assert sorted(round2) == others
    assert round2["good"].status == "accepted" and all(r.event.mechanism.steps > 0 for r in round2.values())
    state_path = data / THRIFTY / ".fedshop" / "privacy-state.json"
    assert json.loads(state_path.read_text())["entries"] == []  # THRIFTY spent nothing

    log_rows = metrics_rows(run_dir)
    assert list(log_rows[0]["refused"]) == [THRIFTY]
    assert THRIFTY not in log_rows[1]["sampled"] and sorted(log_rows[1]["sampled"]) == others
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["rounds_completed"] == 2
    assert summary["privacy"][THRIFTY]["rounds"] == 0


SECRET = "SECRET-4711"  # a cell value the validation error quotes; it must not reach the server


@pytest.fixture(scope="module")
def invalid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, proc.Run]:
    """One run whose three merchants all fail validation: every catalogue lost its title
    column, and shop-a's also holds a price that is not a number. (run dir, result)"""
    root = tmp_path_factory.mktemp("invalid")
    data = root / "data"
    write_merchants(data, ["shop-a", "shop-b", "shop-c"])
    for merchant in ("shop-a", "shop-b", "shop-c"):
        catalog = data / merchant / "catalog.csv"
        rows = [[c for i, c in enumerate(line.split(",")) if i != 1] for line in catalog.read_text().splitlines()]
        if merchant == "shop-a":
            rows[2][-1] = SECRET  # data row 2's price
        catalog.write_text("\n".join(",".join(row) for row in rows) + "\n")
    run_dir = root / "run"
    scenario = write_scenario(root / "scenario.toml", {**FAST, "data-dir": str(data)})
    return run_dir, simulate(scenario, run_dir, log_dir=root / "log")


def test_a_round_without_an_accepted_update_fails_the_run(invalid_run: tuple[Path, proc.Run]) -> None:
    run_dir, result = invalid_run
    assert result.returncode not in (0, None), result.describe()
    error = result.stderr
    assert "round 1: no update was accepted" in error, result.describe()
    assert error.count("failed (DataValidationError in the train call") == 3, result.describe()
    # No spend happened (validation refuses before training), and nothing pretends the run completed.
    assert ledger_rows(run_dir) == []
    assert ckpt.list_checkpoints(run_dir) == []
    assert not (run_dir / MODEL_DIR).exists() and not (run_dir / SUMMARY_FILE).exists()
    assert len(metrics_rows(run_dir)[0]["failed"]) == 3


def test_a_failed_calls_values_stay_in_the_merchants_log(invalid_run: tuple[Path, proc.Run]) -> None:
    """The server's record of a failed call names the exception's class and the merchant; where
    its data is invalid, and the value the validation error quotes, stay in the merchant's log."""
    run_dir, result = invalid_run
    (row,) = metrics_rows(run_dir)
    # Keyed by node (no reply ever said who it is); the public text names the merchant.
    reasons = {re.search(r"of merchant '([^']+)'", r).group(1): r for r in row["failed"].values()}  # type: ignore[union-attr]
    assert sorted(reasons) == ["shop-a", "shop-b", "shop-c"], row["failed"]
    for reason in reasons.values():
        assert reason.startswith("DataValidationError in the train call of merchant"), reason
        assert "merchant's own log" in reason and "title" not in reason, reason
    assert SECRET not in (run_dir / METRICS_FILE).read_text()
    # In simulation the merchants' log is this run's console: the ClientApp logged the whole error there.
    lines = result.stderr.splitlines()
    logged = [i for i, line in enumerate(lines) if "merchant shop-a: the train call raised an error" in line]
    assert logged and any(SECRET in line for line in lines[logged[0]:logged[0] + 4]), result.describe()
    server_log = [line for line in result.stderr.splitlines() if "server.federation" in line]
    assert server_log and not any(SECRET in line for line in server_log), result.describe()


def test_a_federation_whose_budgets_are_all_spent_ends_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_merchants(data, ["shop-a", "shop-b", "shop-c"])
    run_dir = tmp_path / "run"
    scenario = write_scenario(tmp_path / "scenario.toml", {**FAST, "data-dir": str(data)})

    result = simulate(scenario, run_dir, log_dir=tmp_path / "log", sets={"target-epsilon": 0.0001})

    assert result.returncode == 0, result.describe()
    rows = ledger_rows(run_dir)
    # Round 1: everyone refuses (recorded, nothing spent); round 2 samples no one and the run stops.
    assert [(r.round, r.status, r.event.mechanism.steps) for r in rows] == [(1, "refused", 0)] * 3
    for r in rows:
        assert "over the budget" in r.reason, r.reason
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["stopped_because"] == "every merchant's privacy budget is spent"
    assert (run_dir / MODEL_DIR / MANIFEST_FILE).is_file()  # the (unchanged) model is still exported
