"""Task definitions: what each head predicts, its target range, and its per-example loss.

Every head scores one (context text, product text) pair. The context is a search query
(relevance, and clicks that came from a search), the user's recent products
(history-based recommendation), or empty.

All losses are *pointwise* and per record. A pairwise or listwise ranking loss would mix
records inside a batch, and then the DP unit would have to be the whole query group;
keeping every loss pointwise keeps the guarantee record-level (one judgment or one
interaction), which is what the accountant assumes. A record with targets for several
tasks (an interaction with a click label and a star rating) is *one* training sample whose
loss sums its tasks' losses: were its tasks separate samples, Poisson sampling could pick
the record twice in a step and the accounted ε would understate its privacy loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

TaskName = Literal["ctr", "rating", "relevance"]
TASKS: tuple[TaskName, ...] = ("ctr", "rating", "relevance")
TASK_INDEX: dict[str, int] = {name: i for i, name in enumerate(TASKS)}

RATING_MIN, RATING_MAX = 1.0, 5.0
RELEVANCE_MAX = 3.0  # graded judgments 0..3 (ESCI: Exact 3, Substitute 2, Complement 1, Irrelevant 0)


@dataclasses.dataclass(frozen=True)
class Example:
    """One task's target for one (context, product) pair of a data record."""

    task: TaskName
    context: str
    product: str
    target: float  # ctr: 0/1, rating: 1..5, relevance: 0..3
    group: str = ""  # query or user the record belongs to (ranking metrics group by it)
    product_id: str = ""
    # The data record (merchant and file row) this example comes from: an interaction row with a rating
    # gives a ctr *and* a rating example. Examples sharing a non-empty record id are one DP
    # unit and train as one sample; an empty id makes the example a record of its own.
    record: str = ""
    # The privacy unit the record belongs to under ``privacy-unit = "user"``: ``user:<user_id>``
    # for an interaction, ``query:<query>`` for a judgment (``client.data.build_examples``). A
    # neighbouring dataset lacks all of one unit's records. Empty: the record is its own unit.
    unit: str = ""


def pack_targets(examples: Sequence[Example]) -> list[float]:
    """One record's targets in ``TASKS`` order, NaN for the tasks it has no target for."""
    targets = [math.nan] * len(TASKS)
    for example in examples:
        if not math.isnan(targets[TASK_INDEX[example.task]]):
            raise ValueError(f"record {example.record!r} has two {example.task} targets")
        targets[TASK_INDEX[example.task]] = float(example.target)
    return targets


def group_records(examples: Sequence[Example]) -> list[list[Example]]:
    """Examples grouped by record, in order of first appearance; a record's pair must agree."""
    records: dict[str | int, list[Example]] = {}
    for i, example in enumerate(examples):
        key: str | int = example.record or i  # no record id: a record of its own
        members = records.setdefault(key, [])
        if members and (members[0].context, members[0].product) != (example.context, example.product):
            raise ValueError(f"record {example.record!r}: its examples score different (context, product) pairs")
        members.append(example)
    return list(records.values())


def count_records(examples: Sequence[Example]) -> int:
    """How many DP units ``examples`` hold: what a sample rate must be computed from."""
    return len(group_records(examples))


def per_example_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of each record: the sum of its tasks' losses, each under its own head; ``[batch]``.

    ``scores`` is ``[batch, len(TASKS)]`` (every head's raw output), ``targets`` the packed
    ``[batch, len(TASKS)]`` targets with NaN where a record has no target for a task. Every
    head is a cross-entropy on a [0, 1] target, so no task dominates the clipped gradient: the
    click label; the rating as ``(stars - 1) / 4``; relevance as ``label / 3``. A soft-target
    cross-entropy is minimised by the conditional mean, as squared error is, but its gradient
    is ``sigmoid(s) - target``; squared error through the sigmoid scales that by
    ``2 sigmoid(s)(1 - sigmoid(s)) <= 1/2``, and under DP-SGD's clipping and noise the rating
    head then barely learned (RMSE 1.29 vs 1.03 on one merchant at ε = 8).
    """
    present = ~torch.isnan(targets)
    # NaN targets become 0 *before* the losses: masking a NaN loss afterwards would still
    # send NaN through the backward pass (0 * NaN).
    safe = torch.where(present, targets, torch.zeros_like(targets))
    ctr_i, rating_i, relevance_i = TASK_INDEX["ctr"], TASK_INDEX["rating"], TASK_INDEX["relevance"]
    ctr = F.binary_cross_entropy_with_logits(scores[:, ctr_i], safe[:, ctr_i], reduction="none")
    rating_unit = ((safe[:, rating_i] - RATING_MIN) / (RATING_MAX - RATING_MIN)).clamp(0.0, 1.0)
    rating = F.binary_cross_entropy_with_logits(scores[:, rating_i], rating_unit, reduction="none")
    relevance = F.binary_cross_entropy_with_logits(
        scores[:, relevance_i], (safe[:, relevance_i] / RELEVANCE_MAX).clamp(0.0, 1.0), reduction="none"
    )
    losses = torch.stack([ctr, rating, relevance], dim=1)
    return (losses * present.to(losses.dtype)).sum(dim=1)


def predictions(scores: torch.Tensor) -> torch.Tensor:
    """Every head's output on its task's natural scale, ``[batch, len(TASKS)]``.

    ctr -> probability, rating -> stars in [1, 5], relevance -> expected grade in [0, 3].
    """
    unit = torch.sigmoid(scores)
    scale = torch.tensor([1.0, RATING_MAX - RATING_MIN, RELEVANCE_MAX], dtype=unit.dtype, device=unit.device)
    offset = torch.tensor([0.0, RATING_MIN, 0.0], dtype=unit.dtype, device=unit.device)
    return unit * scale + offset


def task_of(targets: torch.Tensor) -> torch.Tensor:
    """The task index of each single-task row of packed targets (its one non-NaN column)."""
    present = ~torch.isnan(targets)
    if not bool((present.sum(dim=1) == 1).all()):
        raise ValueError("task_of needs rows with exactly one target")
    return present.to(torch.int64).argmax(dim=1)


class PerExampleLoss(torch.nn.Module):
    """``per_example_loss`` as a criterion over (scores, packed targets).

    Opacus' ghost clipping wraps the criterion and sets ``reduction = "none"`` on it; the
    mean is taken only when asked for, so the same object serves both modes.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        losses = per_example_loss(scores, packed)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()
