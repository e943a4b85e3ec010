"""A merchant's local offsets (``local-offsets``): one intercept per trained task, added to that
task's head score, trained and kept at the node.

Merchants differ in base rate (conversion) and mean rating, and one global model predicts the
federation's average: on generated merchants whose base rates differ by design, the global
model's log-loss was worse than each merchant's own constant on half of them. An offset moves
a merchant's scores by its own constant, so the model it serves is calibrated to its own data.

How they train: as extra parameters of the module a training call trains (``attached``), in
the same DP-SGD steps as the heads. Each record's gradient with respect to them is clipped
together with the heads' (one norm C for the whole record; under ``clipping = heads-apart`` in
the heads' group, ``shared.model.is_head``) and noised with it: they are part of the call's
accounted output, and cost no privacy and no mechanism of their own. They train at the heads'
rate, with the heads' weight decay.

They never travel: they are not parameters of the model, ``shared.model.get_trainable`` leaves
``local_offsets.*`` out even while they are attached, so neither a train reply nor an
aggregate holds them. They stay in the node's state folder (``OFFSETS_FILE``, beside
``client.optimizer_state``'s file; in simulation ``RUN_DIR/nodes/<merchant>/``), written only
after the call's spend is committed, so they never come from a call whose spend was not
recorded. Like the optimizer state, a file belongs to one run (a new run starts from a new
global model, whose heads another run's offsets do not fit) and one task list; any other is
ignored and the call starts from zero.

They feed what the merchant evaluates and releases (``client.evaluation``, ``client.release``):
its released metrics describe the model it serves, the global model plus its offsets. Outside
the node, ``for_node`` reads a state folder's offsets: the benchmarks score each merchant with
its own, and ``fedshop rank`` / ``recommend --offsets STATE_DIR`` serve with them (a constant
per task: the order of the products is the global model's, the scores the merchant's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared import atomic
from shared.model import LOCAL_OFFSETS
from shared.tasks import TASK_INDEX, TASKS

log = logging.getLogger(__name__)

OFFSETS_FILE = "local-offsets.json"
FORMAT = "fedshop-local-offsets/1"


class OffsetsError(ValueError):
    """A state folder's offsets cannot be used as asked; the message names the file and why."""


class Offsets(nn.Module):
    """One intercept per task of ``tasks``, added to that task's column of ``[batch, len(TASKS)]``
    scores; the other columns pass unchanged.

    The intercepts are the weight of a ``Linear(1, len(tasks))`` applied to a column of ones:
    a layer every per-sample gradient mode supports (Opacus' hooks and expanded weights,
    ``client.bookkeeping``), so each record's gradient is clipped with the rest of its own."""

    def __init__(self, tasks: Sequence[str], values: Mapping[str, float] | None = None) -> None:
        super().__init__()
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise OffsetsError(f"local offsets for tasks {list(tasks)}: expected a non-empty subset of {list(TASKS)}")
        self.tasks = tuple(t for t in TASKS if t in set(tasks))  # the model's column order
        self.intercept = nn.Linear(1, len(self.tasks), bias=False)
        spread = torch.zeros(len(self.tasks), len(TASKS))
        for row, task in enumerate(self.tasks):
            spread[row, TASK_INDEX[task]] = 1.0
        self.register_buffer("spread", spread)
        with torch.no_grad():
            self.intercept.weight.copy_(torch.tensor([[float((values or {}).get(t, 0.0))] for t in self.tasks]))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(scores.shape[0], 1, dtype=scores.dtype, device=scores.device)
        return scores + self.intercept(ones) @ self.spread

    def values(self) -> dict[str, float]:
        weights = self.intercept.weight.detach().cpu().flatten().tolist()
        return dict(zip(self.tasks, (float(w) for w in weights), strict=True))


@contextlib.contextmanager
def attached(module: nn.Module, offsets: Offsets | None) -> Iterator[None]:
    """``offsets`` on ``module``'s scores, as a child of it (``shared.model.LOCAL_OFFSETS``) and a
    forward hook, for one training call: an optimizer or Opacus wrapper built inside the block
    sees their parameters as the module's own, the other parameters' names unchanged. Both are
    removed on the way out, whatever happened. ``offsets`` None: nothing is attached."""
    if offsets is None:
        yield
        return
    if hasattr(module, LOCAL_OFFSETS):
        raise OffsetsError(f"{type(module).__name__} already has a {LOCAL_OFFSETS!r} attribute")
    module.add_module(LOCAL_OFFSETS, offsets)

    def add(_: nn.Module, __: Any, scores: torch.Tensor) -> torch.Tensor:
        return offsets(scores)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
        delattr(module, LOCAL_OFFSETS)


def load(path: Path, *, tasks: Sequence[str], run_id: str) -> Offsets | None:
    """``path``'s offsets if they are this run's and these tasks'; None otherwise (no file,
    another run or task list, a damaged file: the caller starts from zero)."""
    if not Path(path).is_file():
        return None
    try:
        saved = _read(Path(path))
    except OffsetsError as exc:  # a damaged file costs only the offsets learnt so far
        log.warning("%s; starting from zero", exc)
        return None
    wanted = Offsets(tasks).tasks
    if saved["run_id"] != run_id or tuple(saved["tasks"]) != wanted:
        log.info("local offsets %s are another run's or task list's; starting from zero", path)
        return None
    return Offsets(wanted, saved["offsets"])


def resume(path: Path, *, tasks: Sequence[str], run_id: str) -> Offsets:
    """What a training call starts from: ``load``'s offsets, or zeros (the global model's scores)."""
    return load(path, tasks=tasks, run_id=run_id) or Offsets(tasks)


def save(offsets: Offsets, path: Path, *, run_id: str) -> None:
    atomic.write_json(path, {"format": FORMAT, "run_id": run_id, "tasks": list(offsets.tasks),
                             "offsets": offsets.values()})


def for_node(state_dir: Path, tasks: Sequence[str]) -> Offsets | None:
    """The offsets a node's state folder holds, for a model whose trained tasks are ``tasks``:
    what the benchmarks score each merchant with, and what serving applies. None when the folder
    holds none (local offsets off, or the merchant never trained); ``OffsetsError`` when the file
    is damaged or holds another task list's (another run's model)."""
    path = Path(state_dir) / OFFSETS_FILE
    if not path.is_file():
        return None
    saved = _read(path)
    wanted = Offsets(tasks).tasks
    if tuple(saved["tasks"]) != wanted:
        raise OffsetsError(f"{path}: offsets for tasks {saved['tasks']}, but the model trained {list(wanted)}")
    return Offsets(wanted, saved["offsets"])


def _read(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
        tasks = [str(t) for t in saved["tasks"]]
        offsets = {str(t): float(v) for t, v in saved["offsets"].items()}
        run_id = str(saved["run_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OffsetsError(f"local offsets {path} unreadable ({exc})") from None
    if saved.get("format") != FORMAT or set(offsets) != set(tasks) or not all(map(math.isfinite, offsets.values())):
        raise OffsetsError(f"local offsets {path}: not a {FORMAT} file with one finite offset per task")
    return {"run_id": run_id, "tasks": tasks, "offsets": offsets}
