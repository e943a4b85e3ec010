"""server.federation with merchants that report their timings and merchants that do not.

``duration-s`` / ``client-s`` leave a merchant only when its ``report-timings`` is on
(``client.policy``); a deployment can mix both. The server must aggregate such a round (Flower
needs the same metric keys in every reply), keep what was reported, and read 0 for the rest,
down to ``metrics.jsonl``, the summary and the HTML report. The grid here answers at once,
without Ray: the replies are what ``client.merchant`` sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.report import run_summary
from server.report_html import render_report
from shared.wire import CLIENT_S, DURATION_S, TrainReply
from tests.helpers.answering_grid import AnsweringGrid, run_federation, task_identity, train_reply
from tests.helpers.federation import metrics_rows

__all__ = ["task_identity"]  # the fixture Messages built outside a ServerApp need


def run(tmp_path: Path, replies: dict[int, TrainReply]) -> dict[str, Any]:
    result = run_federation(AnsweringGrid(replies), tmp_path / "run")
    assert result.rounds_completed == 1 and result.reports[0].aggregated
    assert np.allclose(result.params["w"], 0.1)  # both updates aggregated
    (row,) = metrics_rows(tmp_path / "run")
    return row


def test_a_round_mixing_merchants_with_and_without_timings_aggregates_and_keeps_what_was_sent(
    tmp_path: Path,
) -> None:
    row = run(tmp_path, {1: train_reply("shop-a", {DURATION_S: 2.0, CLIENT_S: 3.0}), 2: train_reply("shop-b", {})})
    assert sorted(row["accepted"]) == ["shop-a", "shop-b"] and row["failed"] == {}
    assert (row["slowest_train_s"], row["slowest_client_s"], row["total_client_s"]) == (2.0, 3.0, 3.0)


def test_without_timings_the_run_reads_zero_and_its_reports_still_render(tmp_path: Path) -> None:
    row = run(tmp_path, {1: train_reply("shop-a", {}), 2: train_reply("shop-b", {})})
    assert (row["slowest_train_s"], row["slowest_client_s"], row["total_client_s"]) == (0.0, 0.0, 0.0)
    assert row["wall_s"] > 0  # the server's own clock, not the merchants'
    summary = run_summary(tmp_path / "run", stopped_because="all rounds done")
    assert summary["rounds_completed"] == 1
    assert "shop-a" in render_report(tmp_path / "run")
