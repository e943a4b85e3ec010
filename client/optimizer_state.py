"""A merchant's optimizer state carried from one training call of a run to the next
(``keep-optimizer-state``).

Every call otherwise starts Adam afresh: its first steps, bias-corrected from nothing, are
as large as the rate allows in every coordinate, and in a federation of short calls that
restart is a good part of each call. Kept, the moments continue where the merchant's last
call left them. They are computed from the gradients the optimizer was given — under DP the
clipped, noised ones, already accounted — so carrying them releases nothing new; they stay
in the node's state folder, beside the privacy state, and never travel.

A state belongs to one run (a new run starts from a new model) and one parameter layout; any
other is ignored and the call starts afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from shared import atomic

log = logging.getLogger(__name__)


def _layout(optimizer: torch.optim.Optimizer) -> list[list[int]]:
    return [list(p.shape) for group in optimizer.param_groups for p in group["params"]]


def load(optimizer: torch.optim.Optimizer, path: Path, *, run_id: str) -> bool:
    """Restore ``path``'s state into ``optimizer`` if it is this run's and fits; True if it did."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("run_id") != run_id or saved.get("layout") != _layout(optimizer):
            log.info("optimizer state %s is another run's or layout's; starting afresh", path)
            return False
        optimizer.load_state_dict(saved["state"])
    except Exception as exc:  # a damaged file costs only the warm start
        log.warning("optimizer state %s unreadable (%s); starting afresh", path, exc)
        return False
    return True


def save(optimizer: torch.optim.Optimizer, path: Path, *, run_id: str) -> None:
    atomic.torch_save({"run_id": run_id, "layout": _layout(optimizer), "state": optimizer.state_dict()}, path)
