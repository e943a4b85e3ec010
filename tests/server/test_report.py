"""server.report: the end-of-run summary from a ledger and a run log — its values, text and file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.ledger import PrivacyLedger, SpendRecord
from server.report import format_summary, run_summary, write_summary
from server.round_report import RoundReport, combine_metrics, mean_metrics, pooled_metrics, shown_metrics
from server.run_log import RunLog
from shared import eval_sums
from shared.metrics import SUM_NOISE_SD, is_released_sum
from shared.privacy.events import MechanismEvent, SpendEvent
from shared.run_files import CHECKPOINTS_DIR, LEDGER_FILE, METRICS_FILE, MODEL_DIR, SUMMARY_FILE


def spend(merchant: str, round_: int, epsilon: float, **overrides: Any) -> SpendRecord:
    """A ledger row; overrides name a row field or a field of its spend event (or its mechanism)."""
    mechanism: dict[str, Any] = dict(noise_multiplier=1.0, sample_rate=0.1, steps=3, max_grad_norm=1.0)
    event: dict[str, Any] = dict(delta=1e-5, unit_count=30, expected_batch=3.0, release="update")
    fields: dict[str, Any] = dict(
        run_id="run-1", round=round_, merchant_id=merchant, node_id=round_, model_version=round_ - 1,
        epsilon_reported=epsilon, epsilon_budget=4.0, accountant="prv", status="accepted",
    )
    for name, value in overrides.items():
        (mechanism if name in mechanism else event if name in event else fields)[name] = value
    return SpendRecord(event=SpendEvent(mechanism=MechanismEvent(**mechanism), **event), **fields)


# An evaluation's spend: one Gaussian release of noised sums over the held-out units.
EVALUATION: dict[str, Any] = dict(release="evaluation", noise_multiplier=10.0, sample_rate=1.0, steps=1,
                                  unit_count=120, expected_batch=120.0)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three rounds: shop-a trains in all (once rejected) and releases a noised evaluation in
    rounds 1 and 3 (its own spend rows), shop-b is refused in round 2 and not sampled after,
    shop-c trains without DP in round 1 only."""
    with PrivacyLedger(tmp_path / LEDGER_FILE) as ledger:
        ledger.record_round([
            spend("shop-a", 1, 1.25),
            spend("shop-b", 1, 2.5, epsilon_budget=3.0, delta=1e-6),
            spend("shop-c", 1, math.inf, dp=False, epsilon_budget=math.inf, noise_multiplier=0.0),
        ])
        ledger.record_round([
            spend("shop-a", 2, 2.0, status="rejected", reason="exceeds max-update-norm"),
            spend("shop-b", 2, 2.5, epsilon_budget=3.0, delta=1e-6, status="refused", steps=0,
                  reason="budget spent"),
        ])
        ledger.record_round([spend("shop-a", 1, 1.5, **EVALUATION)])
        ledger.record_round([spend("shop-a", 3, 3.0)])
        ledger.record_round([spend("shop-a", 3, 3.25, **EVALUATION)])
    log = RunLog(tmp_path)
    log.append(RoundReport(round=1, eval_metrics={"ctr_auc": 0.5, "eval-loss": 0.75}))
    log.append(RoundReport(round=2, eval_metrics={"ctr_auc": 0.75, "rating_rmse": 1.0625, "eval-loss": 0.5,
                                                  "relevance_ndcg@10": float("nan")}))
    log.append(RoundReport(round=3))  # evaluation failed: no metrics this round
    return tmp_path


def test_summary_values(run_dir: Path) -> None:
    summary = run_summary(run_dir, stopped_because="all rounds done")
    assert summary["run_dir"] == str(run_dir)
    assert summary["rounds_completed"] == 3
    assert summary["stopped_because"] == "all rounds done"
    # The last round that has metrics; NaN was written as null.
    assert summary["final_eval"] == {"ctr_auc": 0.75, "rating_rmse": 1.0625, "eval-loss": 0.5,
                                     "relevance_ndcg@10": None}
    assert list(summary["privacy"]) == ["shop-a", "shop-b", "shop-c"]
    # Each merchant's latest row (shop-a's: its round-3 evaluation, ε after both of that round's
    # releases); a refused call is not a round it trained in, a rejected one is; evaluations
    # are counted apart.
    assert summary["privacy"]["shop-a"] == {"epsilon": 3.25, "budget": 4.0, "delta": 1e-5, "rounds": 3,
                                            "evaluations": 2}
    assert summary["privacy"]["shop-b"] == {"epsilon": 2.5, "budget": 3.0, "delta": 1e-6, "rounds": 1,
                                            "evaluations": 0}
    assert summary["privacy"]["shop-c"] == {"epsilon": math.inf, "budget": math.inf, "delta": 1e-5, "rounds": 1,
                                            "evaluations": 0}
    assert summary["outputs"] == {
        "metrics": str(run_dir / METRICS_FILE),
        "ledger": str(run_dir / LEDGER_FILE),
        "checkpoints": str(run_dir / CHECKPOINTS_DIR),
        "model": str(run_dir / MODEL_DIR),
    }


def test_summary_text(run_dir: Path) -> None:
    text = format_summary(run_summary(run_dir, stopped_because="all rounds done"))
    assert text.splitlines() == [
        "fedshop run finished: 3 round(s); all rounds done",
        "utility on merchants' held-out data (last round; DP: from the merchants' pooled noised sums, "
        "shared.eval_sums; baselines in brackets):",
        # Sorted; the loss and the undefined metric are left out.
        "  ctr_auc                0.7500",
        "  rating_rmse            1.0625",
        "privacy spent per merchant (ε at δ, cumulative / budget):",
        "  shop-a                 ε 3.250 / 4.000 at δ 1e-05, 3 round(s), 2 evaluation(s)",
        "  shop-b                 ε 2.500 / 3.000 at δ 1e-06, 1 round(s), 0 evaluation(s)",
        "  shop-c                 ε no DP / inf at δ 1e-05, 1 round(s), 0 evaluation(s)",
        "outputs:",
        f"  metrics      {run_dir / METRICS_FILE}",
        f"  ledger       {run_dir / LEDGER_FILE}",
        f"  checkpoints  {run_dir / CHECKPOINTS_DIR}",
        f"  model        {run_dir / MODEL_DIR}",
    ]


def test_summary_text_shows_each_baseline_beside_its_metric(run_dir: Path) -> None:
    """The released baselines and ctr's threshold go beside the metrics they belong to, not on
    lines of their own; a baseline whose metric the noise left out keeps its own line."""
    RunLog(run_dir).append(RoundReport(round=4, eval_metrics={
        "ctr_logloss": 0.36, "ctr_logloss_baseline": 0.47, "ctr_f1": 0.6, "ctr_precision": 0.9, "ctr_recall": 0.45,
        "ctr_threshold": 0.8176, "rating_rmse": 0.85, "rating_rmse_baseline": 1.02, "relevance_ndcg@10": 0.75,
        "relevance_ndcg@10_baseline": 0.7, "relevance_mrr_baseline": 0.8, "eval-loss": 0.5}))
    lines = format_summary(run_summary(run_dir, stopped_because="all rounds done")).splitlines()
    start = lines.index("privacy spent per merchant (ε at δ, cumulative / budget):")
    assert lines[2:start] == [
        "  ctr_f1                 0.6000  (at p ≥ 0.8176)",
        "  ctr_logloss            0.3600  (constant base rate 0.4700)",
        "  ctr_precision          0.9000  (at p ≥ 0.8176)",
        "  ctr_recall             0.4500  (at p ≥ 0.8176)",
        "  rating_rmse            0.8500  (constant mean 1.0200)",
        "  relevance_mrr_baseline 0.8000",
        "  relevance_ndcg@10      0.7500  (random order 0.7000)",
    ]


def test_the_round_log_line_shows_the_baselines_too() -> None:
    report = RoundReport(round=1, eval_metrics={"ctr_auc": 0.7, "ctr_logloss": 0.36, "ctr_logloss_baseline": 0.47,
                                                "eval-loss": 0.5, "relevance_ndcg@10": float("nan")})
    assert report.eval_text() == "ctr_auc 0.7000, ctr_logloss 0.3600 (constant base rate 0.4700), eval-loss 0.5000"


def test_each_figure_shows_the_spread_the_noise_alone_gives_it(run_dir: Path) -> None:
    """A released noise scale (``<key>_sd``) goes beside its figure as ``± sd`` — the metric's,
    its baseline's, the threshold's — never on a line of its own; a scale whose figure is
    missing is left out, and the header says what ± means."""
    RunLog(run_dir).append(RoundReport(round=4, eval_metrics={
        "rating_rmse": 0.6962, "rating_rmse_sd": 0.25, "rating_rmse_baseline": 0.5469,
        "rating_rmse_baseline_sd": 0.3, "ctr_f1": 0.6, "ctr_f1_sd": 0.1, "ctr_threshold": 0.8176,
        "ctr_threshold_sd": 0.05, "ctr_auc": 0.7, "relevance_mrr_sd": 0.2, "eval-loss": 0.5, "eval-loss_sd": 0.1}))
    lines = format_summary(run_summary(run_dir, stopped_because="all rounds done")).splitlines()
    start = lines.index("privacy spent per merchant (ε at δ, cumulative / budget):")
    assert lines[1].endswith("baselines in brackets; ± one standard deviation of the noise alone, ± ? where the "
                             "noise could leave the figure undefined, so no spread is estimated):")
    assert lines[2:start] == [
        "  ctr_auc                0.7000 ± ?",  # noised, but no scale came with it: not exact
        "  ctr_f1                 0.6000 ± 0.1000  (at p ≥ 0.8176 ± 0.0500)",
        "  rating_rmse            0.6962 ± 0.2500  (constant mean 0.5469 ± 0.3000)",
    ]
    # Exact figures (a non-private run's: no scales at all) stand as they are.
    assert shown_metrics({"ctr_auc": 0.7, "ctr_f1": 0.6}) == [("ctr_auc", "0.7000", ""), ("ctr_f1", "0.6000", "")]
    report = RoundReport(round=4, eval_metrics={"rating_rmse": 0.6962, "rating_rmse_sd": 0.25,
                                                "rating_rmse_baseline": 0.5469, "rating_rmse_baseline_sd": 0.3})
    assert report.eval_text() == "rating_rmse 0.6962 ± 0.2500 (constant mean 0.5469 ± 0.3000)"
    assert not any(key.endswith("_sd") for key, _, _ in shown_metrics({"ctr_auc_sd": 0.1, "eval-loss_sd": 0.2}))
    # A figure smaller than its noise scale says so (a constant's RMSE clamped at 0 by the noise).
    lost = RoundReport(round=8, eval_metrics={"rating_rmse": 0.7452, "rating_rmse_sd": 0.2891,
                                              "rating_rmse_baseline": 0.0, "rating_rmse_baseline_sd": 0.3799})
    assert lost.eval_text() == "rating_rmse 0.7452 ± 0.2891 (constant mean 0.0000 ± 0.3799, within its noise)"


def test_merchants_noise_scales_combine_as_their_weighted_means() -> None:
    """Two merchants' figures combine weighted by their public held-out unit counts, their noise
    scales as that mean's: sqrt(Σ w² sd²) / Σ w (independent noise), not a weighted mean of the
    scales. A figure one merchant released without its scale gets none."""
    a = {"num-examples": 300.0, "rating_rmse": 0.8, "rating_rmse_sd": 0.3, "ctr_auc": 0.7, "ctr_auc_sd": 0.1,
         "ctr_f1": 0.5, "ctr_f1_sd": 0.2}
    b = {"num-examples": 100.0, "rating_rmse": 1.2, "rating_rmse_sd": 0.5, "ctr_auc": 0.6,
         "ctr_f1": 0.3, "ctr_f1_sd": 0.4}
    c = {"num-examples": 0.0, "rating_rmse": 9.0, "rating_rmse_sd": 9.0}  # no weight, no say
    got = combine_metrics([a, b, c])
    assert got["rating_rmse"] == pytest.approx((300 * 0.8 + 100 * 1.2) / 400)
    assert got["rating_rmse_sd"] == pytest.approx(math.sqrt((300 * 0.3) ** 2 + (100 * 0.5) ** 2) / 400)
    assert got["rating_rmse_sd"] < (300 * 0.3 + 100 * 0.5) / 400  # less than the mean of the scales
    assert got["ctr_f1_sd"] == pytest.approx(math.sqrt((300 * 0.2) ** 2 + (100 * 0.4) ** 2) / 400)
    assert got["ctr_auc"] == pytest.approx(0.675) and "ctr_auc_sd" not in got
    assert "num-examples" not in got and "num-examples_sd" not in got
    # One merchant: its own figures and scales back.
    assert combine_metrics([a]) == pytest.approx({k: v for k, v in a.items() if k != "num-examples"})
    assert combine_metrics([]) == {}


POOLED_TASKS = ("ctr", "rating")


def merchant_release(units: int, noise_sd: float, seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """One merchant's noised sums (about ``units`` one-record units) and what it sends: its own
    metrics and their scales, its sums (``sum:``) and their noise sd, its unit count."""
    rng = np.random.default_rng(seed)
    names = eval_sums.layout(POOLED_TASKS)
    # Each count ``units``, every other statistic 5 % of it (histogram bins alike), scaled.
    exact = np.where([n.endswith("/count") for n in names], units, 0.05 * units) / 3.0
    sums = exact + rng.normal(0.0, noise_sd, len(names))
    released = {"num-examples": float(units), **eval_sums.metrics_from_sums(sums, POOLED_TASKS),
                **eval_sums.noise_scales(sums, POOLED_TASKS, noise_sd, seed=seed),
                **eval_sums.as_metrics(sums, POOLED_TASKS, noise_sd)}
    return sums, released


def test_merchants_sums_are_pooled_and_the_metrics_computed_from_them() -> None:
    """When every merchant sent its noised sums the round's metrics are those of Σ sums, their
    noise scales at the pooled sd sqrt(Σ sd²), not a mean of the merchants' metrics; the sums
    themselves are no figures of the round's."""
    # Well above the ctr histogram's estimability floor (3 pooled noise sds over 20 bins), so no
    # figure or scale sits on its edge.
    parts = [merchant_release(3000, 10.0, 1), merchant_release(1200, 10.0, 2), merchant_release(5000, 4.0, 3)]
    released = [r for _, r in parts]
    total = sum(s for s, _ in parts)
    pooled = pooled_metrics(released, seed=7)
    assert pooled is not None
    want = eval_sums.metrics_from_sums(total, POOLED_TASKS)
    assert {k: v for k, v in pooled.items() if not k.endswith("_sd")} == pytest.approx(want)
    assert pooled == pytest.approx(
        want | eval_sums.noise_scales(total, POOLED_TASKS, math.sqrt(10.0**2 + 10.0**2 + 4.0**2), seed=7))
    got = combine_metrics(released)
    assert {k: v for k, v in got.items() if not k.endswith("_sd")} == pytest.approx(want)
    assert got.keys() == pooled.keys() and not any(is_released_sum(k) for k in got)
    assert got["ctr_auc"] != pytest.approx(mean_metrics(released)["ctr_auc"])  # not the mean of the AUCs
    for _, r in parts[:2]:
        assert any(is_released_sum(k) for k in r) and SUM_NOISE_SD in r


def test_without_every_merchants_sums_the_metrics_are_the_weighted_mean() -> None:
    """A merchant that sent no sums (a non-private run's exact metrics, an older merchant): the
    unit-weighted mean of the metrics, the other merchants' sums left out of it."""
    _, with_sums = merchant_release(300, 10.0, 1)
    exact = {"num-examples": 100.0, "ctr_auc": 0.9, "rating_rmse": 1.1}
    got = combine_metrics([with_sums, exact])
    assert got == mean_metrics([with_sums, exact])
    assert got["ctr_auc"] == pytest.approx((300 * with_sums["ctr_auc"] + 100 * 0.9) / 400)
    assert not any(is_released_sum(k) for k in got)
    assert combine_metrics([exact]) == {"ctr_auc": 0.9, "rating_rmse": 1.1}  # a non-private run


def test_released_sums_are_never_shown_or_stopped_on(run_dir: Path) -> None:
    _, released = merchant_release(300, 10.0, 1)
    report = RoundReport(round=4, eval_metrics=released)
    assert not any(is_released_sum(key) for key, _, _ in shown_metrics(released))
    assert "sum" not in report.eval_text().replace("eval-loss", "")
    assert report.stopping_value("sum:ctr/count") is None and report.stopping_value(SUM_NOISE_SD) is None
    RunLog(run_dir).append(report)
    text = format_summary(run_summary(run_dir, stopped_because="all rounds done"))
    assert "sum:" not in text and SUM_NOISE_SD not in text


def test_a_noise_scale_is_never_an_early_stopping_value() -> None:
    report = RoundReport(round=1, eval_metrics={"ctr_auc": 0.7, "ctr_auc_sd": 0.1})
    assert report.stopping_value("ctr_auc") == 0.7
    assert report.stopping_value("ctr_auc_sd") is None
    assert report.stopping_value("rating_rmse") is None


def test_a_run_that_recorded_nothing(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path / LEDGER_FILE).close()
    summary = run_summary(tmp_path, stopped_because="every merchant's privacy budget is spent")
    assert (summary["rounds_completed"], summary["final_eval"], summary["privacy"]) == (0, {}, {})
    lines = format_summary(summary).splitlines()
    assert lines[0] == "fedshop run finished: 0 round(s); every merchant's privacy budget is spent"
    assert lines[1] == "privacy spent per merchant (ε at δ, cumulative / budget):"  # no utility section
    assert lines[2] == "outputs:"


def test_summary_file_is_strict_json(run_dir: Path) -> None:
    summary = run_summary(run_dir, stopped_because="all rounds done")
    path = write_summary(run_dir, summary)
    assert path == run_dir / SUMMARY_FILE

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in {SUMMARY_FILE}")

    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written["privacy"]["shop-c"] == {"epsilon": None, "budget": None, "delta": 1e-5, "rounds": 1,
                                            "evaluations": 0}
    assert written["privacy"]["shop-a"] == summary["privacy"]["shop-a"]
    assert written["final_eval"]["relevance_ndcg@10"] is None
    assert summary["privacy"]["shop-c"]["epsilon"] == math.inf  # the caller's dict is not changed
    # Written again (a resumed run finishing): replaced whole, nothing left beside it.
    write_summary(run_dir, {**summary, "stopped_because": "early stopping"})
    assert json.loads(path.read_text())["stopped_because"] == "early stopping"
    assert sorted(os.listdir(run_dir)) == sorted([LEDGER_FILE, METRICS_FILE, SUMMARY_FILE])
