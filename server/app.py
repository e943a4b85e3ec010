"""The ServerApp: read the run config, run the federation, export the model. Nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from server.report import format_summary, run_summary, write_summary
from server.report_html import write_report_or_warn
from shared import flower_pulls
from shared.config import RunConfig
from shared.model import ModelSpec, build_model, export_model, get_trainable, load_tokenizer, set_trainable
from shared.run_files import MODEL_DIR

log = logging.getLogger(__name__)

app = ServerApp()


def _fast_reply_pulls(grid: Grid) -> None:
    """A deployed ServerApp (Flower's HTTP grid) pulls each reply's objects from the SuperLink:
    retry from 50 ms, not 1 s (shared.flower_pulls). The simulation's in-memory grid pulls nothing."""
    from flwr.superlink.grid import http_grid

    if isinstance(grid, http_grid.HttpGrid):
        flower_pulls.bind_backoff(http_grid, "pull_objects")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    _fast_reply_pulls(grid)
    spec = ModelSpec.from_config(config)
    model = build_model(spec)
    federation = Federation(grid, config, dict(get_trainable(model)))
    try:
        result = federation.run()
    finally:
        federation.close()
    set_trainable(model, result.params)
    export_model(model, load_tokenizer(spec), Path(config.run_dir) / MODEL_DIR, spec=spec)
    summary = run_summary(Path(config.run_dir), stopped_because=result.stopped_because)
    write_summary(Path(config.run_dir), summary)
    log.info("\n%s", format_summary(summary))
    write_report_or_warn(Path(config.run_dir))  # after the summary, which it reads; never fails the run
