"""``python -m tests.helpers.run_faulty RUN_CONFIG.json NUM_MERCHANTS``: a simulation with the
faulty ClientApp (``tests.helpers.faulty_app``) through ``simulations.engine.run_simulation``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from shared.config import RunConfig
from simulations.engine import run_simulation
from tests.helpers.faulty_app import app


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    config = RunConfig.from_mapping(json.loads(Path(argv[0]).read_text()))
    run_simulation(config, num_merchants=int(argv[1]), client_app=app)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
