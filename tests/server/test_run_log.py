"""server.run_log: one strict-JSON line per round, appended, read back in order."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from server.round_report import RoundReport
from server.run_log import RunLog
from shared.run_files import METRICS_FILE


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in {METRICS_FILE}: not strict JSON")

    return json.loads(text, parse_constant=refuse)


def test_no_file_reads_as_no_rows(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    assert log.path == tmp_path / METRICS_FILE
    assert log.rows() == []
    assert not log.path.exists()  # reading creates nothing


def test_rows_come_back_in_order_with_every_field(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.append(RoundReport(round=1, sampled=["a", "b"], accepted=["a"], refused={"b": "budget spent"},
                           bytes_received=4096, eval_metrics={"ctr_auc": 0.625},
                           eval_per_merchant={"a": {"ctr_auc": 0.5, "ctr_auc_sd": 0.25}},
                           epsilon={"a": 1.5, "b": 8.0}, aggregated=True))
    log.append(RoundReport(round=2, accepted=["a"], aggregated=True))

    rows = log.rows()
    assert [r["round"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["sampled"] == ["a", "b"] and first["accepted"] == ["a"]
    assert first["refused"] == {"b": "budget spent"} and first["rejected"] == {} and first["failed"] == {}
    assert first["bytes_received"] == 4096 and first["aggregated"] is True
    assert "train_loss" not in first  # no merchant's raw loss reaches the server (docs/privacy.md)
    assert first["eval_metrics"] == {"ctr_auc": 0.625} and first["epsilon"] == {"a": 1.5, "b": 8.0}
    assert first["eval_per_merchant"] == {"a": {"ctr_auc": 0.5, "ctr_auc_sd": 0.25}}  # for per-merchant views
    assert set(first) == {f.name for f in dataclasses.fields(RoundReport)}  # every field, no more
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2
    parsed = _strict(lines[0])
    assert isinstance(parsed, dict) and list(parsed) == sorted(first)  # one line per round, keys sorted


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    # A non-private merchant's ε is infinite; an undefined metric (one class only) is NaN.
    # Neither is JSON.
    log.append(RoundReport(round=1, epsilon={"plain": math.inf, "dp": 2.0},
                           eval_metrics={"ctr_auc": float("nan"), "rating_rmse": 1.25}))
    (line,) = log.path.read_text().splitlines()
    row = _strict(line)
    assert isinstance(row, dict)
    assert row["eval_metrics"]["ctr_auc"] is None
    assert row["epsilon"] == {"plain": None, "dp": 2.0}
    assert row["eval_metrics"] == {"ctr_auc": None, "rating_rmse": 1.25}
    assert log.rows() == [row]


def test_a_resumed_run_appends_to_the_same_file(tmp_path: Path) -> None:
    RunLog(tmp_path).append(RoundReport(round=1))
    RunLog(tmp_path).append(RoundReport(round=2))  # a new process, the same run dir
    assert [r["round"] for r in RunLog(tmp_path).rows()] == [1, 2]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    log.append(RoundReport(round=1))
    with log.path.open("a") as fh:
        fh.write("\n  \n")
    log.append(RoundReport(round=2))
    assert [r["round"] for r in log.rows()] == [1, 2]
