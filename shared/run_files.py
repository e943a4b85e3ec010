"""The run folder's layout: the names of what a federated run leaves in ``RUN_DIR``.

The server writes these, ``fedshop simulate --resume`` and the auditor read them, tests and
benchmarks look into them; each name is spelt here once. What lies *inside* the checkpoints
folder is the checkpoint's own business (``server.checkpoint``).
"""

from __future__ import annotations

LEDGER_FILE = "ledger.sqlite"  # the privacy ledger: one row per merchant per round (server.ledger)
METRICS_FILE = "metrics.jsonl"  # one JSON line per round, appended as rounds end (server.run_log)
SUMMARY_FILE = "summary.json"  # the end-of-run summary (server.report)
REPORT_FILE = "report.html"  # the one-page run report (server.report_html)
CONFIG_FILE = "config.json"  # the run config as run, so a run can be resumed with the same settings
CHECKPOINTS_DIR = "checkpoints"  # round checkpoints (server.checkpoint)
MODEL_DIR = "model"  # the exported global model (shared.model.export_model)
