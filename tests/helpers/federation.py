"""A small, fast federation for real-process tests: scenario files, runs, and their outputs."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.ledger import PrivacyLedger, SpendRecord
from shared.run_files import LEDGER_FILE, METRICS_FILE
from tests.helpers import proc

# Tiny encoder, short local training, bounded waits: one round of 3 merchants takes a few
# seconds of compute; Ray start-up dominates a run. ε after a round is ~3 (σ = 1, q ≈ 1/5,
# 3 steps, δ = 1e-5), so three rounds stay within the default budget of 8.
FAST: dict[str, Any] = {
    "encoder": "tiny",
    "trainable": "lora",
    "num-server-rounds": 2,
    "merchants-per-round": 3,
    "max-local-steps": 3,
    "batch-size": 16,
    "max-seq-len": 32,
    "eval-max-examples": 32,
    # The test merchants hold a handful of held-out units: evaluate anyway (noised, accounted).
    "eval-min-units": 1,
    # Tiny merchants sample all their units each step (q = 1): under replace-one accounting a
    # call at σ = 1 costs more than a whole budget of 8; σ = 2 lets them train a few rounds.
    "noise-multiplier": 2.0,
    "round-timeout-s": 180.0,
    "node-wait-timeout-s": 60.0,
}


def write_scenario(path: Path, settings: Mapping[str, Any]) -> Path:
    """A flat TOML scenario file (what ``fedshop simulate --scenario FILE`` reads)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str):
            shown = json.dumps(value)
        else:
            shown = repr(value)
        lines.append(f"{key} = {shown}")
    path.write_text("\n".join(lines) + "\n")
    return path


def simulate(scenario: Path, run_dir: Path, *, log_dir: Path, timeout_s: float = 240.0,
             sets: Mapping[str, Any] | None = None, flags: Sequence[str] = ()) -> proc.Run:
    """``fedshop simulate --scenario FILE --out RUN_DIR [FLAGS ...] [--set k=v ...]`` in its own session."""
    args = ["simulate", "--scenario", str(scenario), "--out", str(run_dir), *flags]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return proc.run(proc.fedshop_command(*args), log_dir=log_dir, timeout_s=timeout_s)


def resume(run_dir: Path, *, log_dir: Path, timeout_s: float = 240.0) -> proc.Run:
    return proc.run(proc.fedshop_command("simulate", "--resume", str(run_dir)), log_dir=log_dir,
                    timeout_s=timeout_s)


def faulty_simulation(config: Mapping[str, Any], *, num_merchants: int, log_dir: Path,
                      timeout_s: float = 240.0) -> proc.Run:
    """``simulations.engine.run_simulation`` with the faulty ClientApp, in its own session."""
    log_dir.mkdir(parents=True, exist_ok=True)
    config_path = log_dir / "run-config.json"
    config_path.write_text(json.dumps(dict(config)))
    cmd = [sys.executable, "-m", "tests.helpers.run_faulty", str(config_path), str(num_merchants)]
    return proc.run(cmd, log_dir=log_dir, timeout_s=timeout_s)


def ledger_rows(run_dir: Path) -> list[SpendRecord]:
    with PrivacyLedger(run_dir / LEDGER_FILE) as ledger:
        return ledger.rows()


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
