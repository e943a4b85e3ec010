"""``metrics.jsonl``: one JSON line per round, appended and flushed as each round ends."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from shared.jsonable import finite
from shared.run_files import METRICS_FILE


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, report: Any) -> None:
        row = finite(dataclasses.asdict(report))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
